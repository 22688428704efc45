-- The dashboards' materialized views over the demo schema. Each has a unique index, so that the gateway
-- refreshes it CONCURRENTLY (readers keep the old contents until the refresh commits). The gateway's
-- `views:` section names them (without `query`) to schedule their refreshes.

-- Revenue and orders per day and region.
CREATE MATERIALIZED VIEW daily_sales_by_region AS
SELECT date_trunc('day', o.created_at)::date AS day,
       o.region,
       count(DISTINCT o.id) AS orders,
       sum(oi.quantity) AS units,
       sum(oi.quantity * oi.unit_price) AS revenue
FROM orders o
JOIN order_items oi ON oi.order_id = o.id
GROUP BY 1, 2;
CREATE UNIQUE INDEX daily_sales_by_region_key ON daily_sales_by_region (day, region);

-- Units and revenue per product, for "top products" lists.
CREATE MATERIALIZED VIEW top_products AS
SELECT p.id AS product_id,
       p.name,
       p.category,
       sum(oi.quantity) AS units,
       sum(oi.quantity * oi.unit_price) AS revenue
FROM order_items oi
JOIN products p ON p.id = oi.product_id
GROUP BY p.id, p.name, p.category;
CREATE UNIQUE INDEX top_products_key ON top_products (product_id);

-- Customers who ordered in the last 30 days (as of the refresh).
CREATE MATERIALIZED VIEW active_customers AS
SELECT c.id AS customer_id,
       c.region,
       count(*) AS orders_30d,
       max(o.created_at) AS last_order_at
FROM customers c
JOIN orders o ON o.customer_id = c.id
WHERE o.created_at > now() - interval '30 days'
GROUP BY c.id, c.region;
CREATE UNIQUE INDEX active_customers_key ON active_customers (customer_id);
-- "Most active customers of a region" reads a few index entries instead of sorting the region's customers.
CREATE INDEX active_customers_by_region ON active_customers (region, orders_30d DESC, customer_id);

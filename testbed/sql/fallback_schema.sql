-- Used by `testbed up` only while `regiongate migrate` and migrations/ are not on this branch: the demo
-- e-commerce tables and dashboard views as agreed with the migrations work (same names and columns).
-- Once migrations/ lands, the testbed applies it instead and this file can go.
CREATE TABLE IF NOT EXISTS customers (
    id bigserial PRIMARY KEY, name text NOT NULL, email text NOT NULL UNIQUE, region text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS products (
    id bigserial PRIMARY KEY, name text NOT NULL, category text NOT NULL, price numeric(10,2) NOT NULL);
CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers, region text NOT NULL,
    status text NOT NULL DEFAULT 'placed', created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS order_items (
    order_id bigint NOT NULL REFERENCES orders, product_id bigint NOT NULL REFERENCES products,
    quantity int NOT NULL, unit_price numeric(10,2) NOT NULL, PRIMARY KEY (order_id, product_id));
CREATE TABLE IF NOT EXISTS events (
    id bigserial PRIMARY KEY, customer_id bigint, kind text NOT NULL, payload jsonb,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS orders_customer_id ON orders (customer_id);
CREATE INDEX IF NOT EXISTS orders_created_at ON orders (created_at);

CREATE MATERIALIZED VIEW IF NOT EXISTS daily_sales_by_region AS
SELECT date_trunc('day', o.created_at)::date AS day, o.region, count(DISTINCT o.id) AS orders,
       sum(oi.quantity) AS units, sum(oi.quantity * oi.unit_price) AS revenue
FROM orders o JOIN order_items oi ON oi.order_id = o.id GROUP BY 1, 2;
CREATE MATERIALIZED VIEW IF NOT EXISTS top_products AS
SELECT p.id AS product_id, p.name, p.category, sum(oi.quantity) AS units,
       sum(oi.quantity * oi.unit_price) AS revenue
FROM order_items oi JOIN products p ON p.id = oi.product_id GROUP BY p.id, p.name, p.category;
CREATE MATERIALIZED VIEW IF NOT EXISTS active_customers AS
SELECT c.id AS customer_id, c.region, count(*) AS orders_30d, max(o.created_at) AS last_order_at
FROM customers c JOIN orders o ON o.customer_id = c.id
WHERE o.created_at > now() - interval '30 days' GROUP BY c.id, c.region;

-- Used by `testbed up` only while testbed/sql/demo_data.sql (the demo data generator) is not on this
-- branch. Same sizes: scale 1 = 100k customers, 1k products, 1M orders, ~3M order items, 1M events.
--     psql -v scale=N -f testbed/sql/fallback_data.sql CONNINFO
\set ON_ERROR_STOP on
\if :{?scale}
\else
\set scale 1
\endif
BEGIN;
SELECT setseed(0.42);
TRUNCATE customers, products, orders, order_items, events RESTART IDENTITY;
INSERT INTO customers (name, email, region, created_at)
SELECT 'customer ' || i, 'customer' || i || '@example.com', (ARRAY['us-east', 'eu-west', 'ap-south'])[1 + i % 3],
       now() - interval '730 days' * random()
FROM generate_series(1, greatest(1, (100000 * :scale)::bigint)) AS i;
INSERT INTO products (name, category, price)
SELECT 'product ' || i, (ARRAY['books', 'games', 'garden', 'kitchen', 'music', 'toys'])[1 + i % 6],
       round((1 + random() * 199)::numeric, 2)
FROM generate_series(1, greatest(10, (1000 * :scale)::bigint)) AS i;
INSERT INTO orders (customer_id, region, status, created_at)
SELECT c, (ARRAY['us-east', 'eu-west', 'ap-south'])[1 + c % 3], 'delivered', now() - interval '365 days' * random()
FROM (SELECT 1 + floor(random() * greatest(1, (100000 * :scale)::bigint))::bigint AS c
      FROM generate_series(1, greatest(1, (1000000 * :scale)::bigint))) AS o;
INSERT INTO order_items (order_id, product_id, quantity, unit_price)
SELECT o.id, p.id, 1 + o.id % 3, p.price
FROM orders o CROSS JOIN LATERAL generate_series(0, o.id % 5) AS k
JOIN products p ON p.id = 1 + (o.id + k * 7) % greatest(10, (1000 * :scale)::bigint);
INSERT INTO events (customer_id, kind, payload, created_at)
SELECT 1 + i % greatest(1, (100000 * :scale)::bigint), 'page_view', jsonb_build_object('path', '/p/' || (i % 1000)),
       now() - interval '365 days' * random()
FROM generate_series(1, greatest(1, (1000000 * :scale)::bigint)) AS i;
COMMIT;
REFRESH MATERIALIZED VIEW daily_sales_by_region;
REFRESH MATERIALIZED VIEW top_products;
REFRESH MATERIALIZED VIEW active_customers;
ANALYZE;

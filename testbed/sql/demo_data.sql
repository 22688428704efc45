-- Demo data for the e-commerce schema (migrations/0002_demo_schema.sql), generated in the server:
--
--     regiongate migrate --config FILE
--     psql -v scale=N -f testbed/sql/demo_data.sql CONNINFO
--
-- scale 1 (the default): 100k customers, 1k products, 1M orders, ~3M order items (1 to 5 per order) and 1M
-- events over the last 365 days; every count grows linearly with the scale, and fractions work (0.01). It
-- takes 26 to 45 s at scale 1 on 2 cores. The script replaces whatever the tables held, and is deterministic
-- for a given scale and day (setseed; times are relative to today's midnight, so that "the last 30 days"
-- always has data). Foreign keys are dropped during the load and re-added afterwards: one validating join is
-- much faster than a trigger call per row. The demo views are refreshed at the end.
\set ON_ERROR_STOP on
\if :{?scale}
\else
\set scale 1
\endif
\timing on

BEGIN;
SELECT setseed(0.42);
TRUNCATE customers, products, orders, order_items, events RESTART IDENTITY;
ALTER TABLE order_items DROP CONSTRAINT IF EXISTS order_items_order_id_fkey;
ALTER TABLE order_items DROP CONSTRAINT IF EXISTS order_items_product_id_fkey;
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_customer_id_fkey;

INSERT INTO customers (id, name, email, region, created_at)
SELECT i,
       'customer ' || i,
       'customer' || i || '@example.com',
       (ARRAY['us-east', 'eu-west', 'ap-south'])[1 + i % 3],
       date_trunc('day', now()) - interval '730 days' * random()
FROM generate_series(1, (100000 * :scale)::bigint) AS i;

INSERT INTO products (id, name, category, price)
SELECT i,
       'product ' || i,
       (ARRAY['books', 'games', 'garden', 'kitchen', 'music', 'outdoor', 'sports', 'toys'])[1 + i % 8],
       round((1 + random() * 199)::numeric, 2)
FROM generate_series(1, (1000 * :scale)::bigint) AS i;

-- Orders: customers drawn uniformly, times uniform over the last year, most of them delivered.
INSERT INTO orders (id, customer_id, region, status, created_at)
SELECT i,
       c,
       (ARRAY['us-east', 'eu-west', 'ap-south'])[1 + c % 3],
       CASE WHEN r < 0.85 THEN 'delivered' WHEN r < 0.95 THEN 'shipped' ELSE 'placed' END,
       date_trunc('day', now()) - interval '365 days' * random()
FROM (SELECT i, 1 + floor(random() * (100000 * :scale)::bigint)::bigint AS c, random() AS r
      FROM generate_series(1, (1000000 * :scale)::bigint) AS i) AS o;

-- Items: 1 to 5 per order (3 on average). Products are skewed towards low ids (popular products); within an
-- order they are 7 apart (modulo the product count), so they are distinct unless there are 28 products or
-- fewer and the count divides 7, 14, 21 or 28.
INSERT INTO order_items (order_id, product_id, quantity, unit_price)
SELECT o.id,
       1 + (o.base + k * 7) % ((1000 * :scale)::bigint),
       1 + floor(random() * 3)::int,
       p.price
FROM (SELECT id, floor(power(random(), 2) * (1000 * :scale)::bigint)::bigint AS base
      FROM generate_series(1, (1000000 * :scale)::bigint) AS id) AS o
CROSS JOIN LATERAL generate_series(0, o.id % 5) AS k
JOIN products p ON p.id = 1 + (o.base + k * 7) % ((1000 * :scale)::bigint);

INSERT INTO events (id, customer_id, kind, payload, created_at)
SELECT i,
       1 + floor(random() * (100000 * :scale)::bigint)::bigint,
       (ARRAY['page_view', 'page_view', 'page_view', 'search', 'add_to_cart', 'checkout'])[1 + floor(random() * 6)::int],
       jsonb_build_object('path', '/p/' || (i % 1000)),
       date_trunc('day', now()) - interval '365 days' * random()
FROM generate_series(1, (1000000 * :scale)::bigint) AS i;

ALTER TABLE orders ADD CONSTRAINT orders_customer_id_fkey FOREIGN KEY (customer_id) REFERENCES customers;
ALTER TABLE order_items ADD CONSTRAINT order_items_order_id_fkey FOREIGN KEY (order_id) REFERENCES orders;
ALTER TABLE order_items ADD CONSTRAINT order_items_product_id_fkey FOREIGN KEY (product_id) REFERENCES products;
SELECT setval(pg_get_serial_sequence('customers', 'id'), (100000 * :scale)::bigint + 1, false);
SELECT setval(pg_get_serial_sequence('products', 'id'), (1000 * :scale)::bigint + 1, false);
SELECT setval(pg_get_serial_sequence('orders', 'id'), (1000000 * :scale)::bigint + 1, false);
SELECT setval(pg_get_serial_sequence('events', 'id'), (1000000 * :scale)::bigint + 1, false);
COMMIT;

-- The demo views (migrations/0003_demo_views.sql) now match the data.
REFRESH MATERIALIZED VIEW daily_sales_by_region;
REFRESH MATERIALIZED VIEW top_products;
REFRESH MATERIALIZED VIEW active_customers;
-- Only the demo's relations: a whole-database ANALYZE warns about shared catalogs unless run by a superuser.
ANALYZE customers, products, orders, order_items, events, daily_sales_by_region, top_products, active_customers;

SELECT 'customers' AS "table", count(*) AS rows FROM customers
UNION ALL SELECT 'products', count(*) FROM products
UNION ALL SELECT 'orders', count(*) FROM orders
UNION ALL SELECT 'order_items', count(*) FROM order_items
UNION ALL SELECT 'events', count(*) FROM events;

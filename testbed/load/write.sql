-- Checkout: an order with one item, in one statement (a write: the primary, from any region).
\set c random(1, :customers)
\set p random(1, :products)
WITH o AS (INSERT INTO orders (customer_id, region) SELECT id, region FROM customers WHERE id = :c RETURNING id)
INSERT INTO order_items (order_id, product_id, quantity, unit_price)
SELECT o.id, p.id, 1, p.price FROM o, products p WHERE p.id = :p;

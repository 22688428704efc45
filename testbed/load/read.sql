-- A customer page: the customer and their latest orders (reads, served in the gateway's region).
\set c random(1, :customers)
SELECT id, name, email, region FROM customers WHERE id = :c;
SELECT id, status, created_at FROM orders WHERE customer_id = :c ORDER BY created_at DESC LIMIT 10;

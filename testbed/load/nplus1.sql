-- What an ORM's lazy loading does: load a customer, then each of "their" orders one query at a time
-- (six statements of one shape with different values right after a parent: the gateway's N+1 detector
-- reports it).
\set c random(1, :customers)
\set o1 random(1, :orders)
\set o2 random(1, :orders)
\set o3 random(1, :orders)
\set o4 random(1, :orders)
\set o5 random(1, :orders)
\set o6 random(1, :orders)
SELECT id, name FROM customers WHERE id = :c;
SELECT id, status, created_at FROM orders WHERE id = :o1;
SELECT id, status, created_at FROM orders WHERE id = :o2;
SELECT id, status, created_at FROM orders WHERE id = :o3;
SELECT id, status, created_at FROM orders WHERE id = :o4;
SELECT id, status, created_at FROM orders WHERE id = :o5;
SELECT id, status, created_at FROM orders WHERE id = :o6;

-- A tracking event: one single-row insert per transaction, from many clients at once.
\set c random(1, :customers)
INSERT INTO events (customer_id, kind, payload) VALUES (:c, 'page_view', '{"path": "/p/1"}');

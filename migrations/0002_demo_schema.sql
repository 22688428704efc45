-- The demo e-commerce schema. Regions are 'us-east', 'eu-west' and 'ap-south'.
-- testbed/sql/demo_data.sql fills it; the load generator and the dashboards' views use these names.
CREATE TABLE customers (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE,
    region text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE products (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    category text NOT NULL,
    price numeric(10,2) NOT NULL
);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers,
    region text NOT NULL,
    status text NOT NULL DEFAULT 'placed',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE order_items (
    order_id bigint NOT NULL REFERENCES orders,
    product_id bigint NOT NULL REFERENCES products,
    quantity int NOT NULL,
    unit_price numeric(10,2) NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
CREATE TABLE events (
    id bigserial PRIMARY KEY,
    customer_id bigint,
    kind text NOT NULL,
    payload jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- The indexes an application of this shape would have (foreign keys and time ranges), so that the
-- benchmark's raw-table queries are as fast as plain tables allow.
CREATE INDEX orders_customer_id ON orders (customer_id);
CREATE INDEX orders_created_at ON orders (created_at);
CREATE INDEX order_items_product_id ON order_items (product_id);
CREATE INDEX events_customer_id ON events (customer_id);

"""The demo dashboards, as a Python dashboard tool runs them (SQLAlchemy over psycopg 3), through the gateway.

    python3 dashboard.py URL

Reflects the three demo materialized views, runs each dashboard query on the view and the same aggregate on
the raw tables, and fails unless they agree (the views were just refreshed and nothing writes meanwhile).
Prints one JSON object with each panel's rows.
"""
import json
import sys
from datetime import date

from sqlalchemy import MetaData, Table, create_engine, desc, func, select


def main(url: str) -> None:
    engine = create_engine(url)
    metadata = MetaData()
    daily = Table("daily_sales_by_region", metadata, autoload_with=engine)
    top = Table("top_products", metadata, autoload_with=engine)
    active = Table("active_customers", metadata, autoload_with=engine)
    orders = Table("orders", metadata, autoload_with=engine)
    items = Table("order_items", metadata, autoload_with=engine)
    products = Table("products", metadata, autoload_with=engine)
    customers = Table("customers", metadata, autoload_with=engine)

    panels = {}
    with engine.connect() as conn:
        # Revenue per region over the whole history.
        by_view = conn.execute(
            select(daily.c.region, func.sum(daily.c.revenue)).group_by(daily.c.region).order_by(daily.c.region)
        ).all()
        by_tables = conn.execute(
            select(orders.c.region, func.sum(items.c.quantity * items.c.unit_price))
            .select_from(orders.join(items, items.c.order_id == orders.c.id))
            .group_by(orders.c.region)
            .order_by(orders.c.region)
        ).all()
        check("revenue by region", by_view, by_tables)
        panels["revenue_by_region"] = [[r, str(v)] for r, v in by_view]

        # The ten best-selling products by revenue.
        by_view = conn.execute(
            select(top.c.product_id, top.c.revenue).order_by(desc(top.c.revenue), top.c.product_id).limit(10)
        ).all()
        revenue = func.sum(items.c.quantity * items.c.unit_price).label("revenue")
        by_tables = conn.execute(
            select(products.c.id, revenue)
            .select_from(products.join(items, items.c.product_id == products.c.id))
            .group_by(products.c.id)
            .order_by(desc(revenue), products.c.id)
            .limit(10)
        ).all()
        check("top products", by_view, by_tables)
        panels["top_products"] = [[p, str(v)] for p, v in by_view]

        # Active customers per region.
        by_view = conn.execute(
            select(active.c.region, func.count()).group_by(active.c.region).order_by(active.c.region)
        ).all()
        recent = (
            select(customers.c.id, customers.c.region)
            .select_from(customers.join(orders, orders.c.customer_id == customers.c.id))
            .where(orders.c.created_at > func.now() - func.make_interval(0, 0, 0, 30))
            .group_by(customers.c.id, customers.c.region)
            .subquery()
        )
        by_tables = conn.execute(
            select(recent.c.region, func.count()).group_by(recent.c.region).order_by(recent.c.region)
        ).all()
        # "The last 30 days" moved between the refresh and this query: an order may have left the window.
        check("active customers", by_view, by_tables, tolerance=1)
        panels["active_customers"] = [[r, n] for r, n in by_view]

        days = conn.execute(select(func.count()).select_from(daily)).scalar_one()
        panels["daily_rows"] = days
        newest = conn.execute(select(func.max(daily.c.day))).scalar_one()
        panels["newest_day"] = newest.isoformat() if isinstance(newest, date) else None
    print(json.dumps(panels))


def check(panel, by_view, by_tables, tolerance=0):
    same = len(by_view) == len(by_tables) and all(
        v[0] == t[0] and abs(v[1] - t[1]) <= tolerance for v, t in zip(by_view, by_tables)
    )
    if not same or not by_view:
        sys.exit(f"{panel}: the view says {by_view!r}, the tables say {by_tables!r}")


if __name__ == "__main__":
    main(sys.argv[1])

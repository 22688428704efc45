"""A small SQLAlchemy application, run through the gateway by the N+1 tests.

    python3 orm_shop.py URL setup|lazy|eager

`lazy` walks customers and touches each one's lazily loaded orders: the classic N+1 (one query for the
customers, then one per customer). `eager` does the same work with selectinload: two queries in all.
"""
import sys

from sqlalchemy import ForeignKey, Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    orders: Mapped[list["Order"]] = relationship(back_populates="customer", lazy="select")


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    total: Mapped[int] = mapped_column(Integer)
    customer: Mapped[Customer] = relationship(back_populates="orders")


def main() -> None:
    url, mode = sys.argv[1], sys.argv[2]
    engine = create_engine(url, connect_args={"application_name": f"orm-shop-{mode}"})
    if mode == "setup":
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            for c in range(1, 21):
                customer = Customer(id=c, name=f"customer {c}")
                customer.orders = [Order(id=c * 10 + i, total=c * i) for i in range(3)]
                session.add(customer)
            session.commit()
        return
    with Session(engine) as session:
        query = select(Customer).order_by(Customer.id)
        if mode == "eager":
            query = query.options(selectinload(Customer.orders))
        customers = session.scalars(query).all()
        total = sum(len(c.orders) for c in customers)
        print(f"{len(customers)} customers, {total} orders")


if __name__ == "__main__":
    main()

"""The order status machine of docs/API.md."""

from __future__ import annotations

from enum import StrEnum


class OrderStatus(StrEnum):
    PENDING = "pending"
    PAID = "paid"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"


TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.PENDING: frozenset({OrderStatus.PAID, OrderStatus.CANCELLED}),
    OrderStatus.PAID: frozenset({OrderStatus.SHIPPED, OrderStatus.CANCELLED}),
    OrderStatus.SHIPPED: frozenset({OrderStatus.DELIVERED}),
    OrderStatus.DELIVERED: frozenset(),
    OrderStatus.CANCELLED: frozenset(),
}

# Changes that email the customer (docs/API.md: paid, shipped and cancelled; creation too).
NOTIFYING = frozenset({OrderStatus.PAID, OrderStatus.SHIPPED, OrderStatus.CANCELLED})


def can_transition(current: OrderStatus, target: OrderStatus) -> bool:
    return target in TRANSITIONS[current]


def event_type(target: OrderStatus) -> str:
    """The timeline event a change to `target` writes."""
    return "order.cancelled" if target is OrderStatus.CANCELLED else "order.status_changed"

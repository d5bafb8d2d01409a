"""The outbox rows a change writes (pure: no I/O). A row is (kind, topic, payload)."""

from __future__ import annotations

from typing import Any

OutboxRow = tuple[str, str, dict[str, Any]]

EMAIL_TOPICS = {
    "created": "order.created",
    "paid": "order.paid",
    "shipped": "order.shipped",
    "cancelled": "order.cancelled",
}


def message_id(order_id: str, event: str) -> str:
    """Stable per order and event, so that a resend can be recognised downstream."""
    return f"<order-{order_id}.{event}@orders>"


def email_row(order: dict[str, Any], event: str, request_id: str | None) -> OutboxRow:
    return (
        "email",
        EMAIL_TOPICS[event],
        {
            "event": event,
            "to": order["email"],
            "message_id": message_id(order["id"], event),
            "order": {
                "id": order["id"],
                "status": order["status"],
                "currency": order["currency"],
                "items": order["items"],
                "subtotal": order["subtotal"],
                "total": order["total"],
                "shipping_address": order["shipping_address"],
            },
            "request_id": request_id,
        },
    )


def audit_row(
    action: str,
    actor: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    request_id: str | None,
) -> OutboxRow:
    return (
        "audit",
        action,
        {"action": action, "actor": actor, "before": before, "after": after, "request_id": request_id},
    )


# The CloudEvents `source` of every order event (a URI-reference naming this service).
EVENT_SOURCE = "/orders"
# The order event of each status an order can reach (docs/API.md, "Order events").
EVENT_TYPES = {
    "pending": "order.created",
    "paid": "order.paid",
    "shipped": "order.shipped",
    "delivered": "order.delivered",
    "cancelled": "order.cancelled",
}


def event_id(order_id: str, version: int) -> str:
    """Stable: one event per order version, so a re-publish carries the same id (and
    JetStream drops it by its Nats-Msg-Id)."""
    return f"{order_id}.{version}"


def event_row(order: dict[str, Any], reason: str | None = None, source: str = EVENT_SOURCE) -> OutboxRow:
    """The CloudEvents 1.0 envelope of `order` (as GET /v1/orders/{id} shows it after the
    change); the type follows its status, a cancellation carries its `reason`. The topic
    is the type: the relay publishes to "orders." + topic."""
    type_ = EVENT_TYPES[order["status"]]
    data = dict(order)
    if order["status"] == "cancelled":
        data["reason"] = reason
    return (
        "event",
        type_,
        {
            "specversion": "1.0",
            "id": event_id(order["id"], order["version"]),
            "source": source,
            "type": type_,
            "subject": order["id"],
            "time": order["updated_at"],
            "datacontenttype": "application/json",
            "data": data,
        },
    )

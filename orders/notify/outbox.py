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

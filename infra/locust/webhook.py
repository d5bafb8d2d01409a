"""The payment provider's side of `POST /v1/payments/events` (docs/API.md), for the load run:
the event body and its `Payment-Signature` header. Pure functions, no I/O."""

from __future__ import annotations

import json

from orders.domain import signature as payment_signature


def signing_secret(configured: str | None) -> str | None:
    """The secret a provider signs with: the first of ORDERS_PAYMENT_WEBHOOK_SECRET's
    comma-separated list (the service accepts any of them, for rotation)."""
    for secret in (configured or "").split(","):
        if secret.strip():
            return secret.strip()
    return None


def event_body(event_id: str, event_type: str, order_id: str, amount: int, currency: str) -> bytes:
    """The raw body: what is signed is these exact bytes, so they are built once and sent as is."""
    doc = {"id": event_id, "type": event_type, "order_id": order_id, "amount": amount, "currency": currency}
    return json.dumps(doc, separators=(",", ":")).encode()


def signature(secret: str, body: bytes, t: int) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`: the service's own
    orders.domain.signature, so that the load run signs exactly what the service checks."""
    return payment_signature.header(secret, t, body)

"""The service's exceptions: what went wrong, in the service's terms, free of any framework.

The API layer answers each with its problem+json (orders/api/problems.py maps the class
to a status and a problem type); anything else that escapes a handler is a bare 500.

Hierarchy::

    OrdersError                  detail for the client, extra members, retry_after
    ├── Unauthorized             no valid bearer token
    ├── InvalidSignature         a payment event without a valid Payment-Signature
    ├── Forbidden                staff only
    ├── NotFound                 no such order / product (or not the caller's)
    ├── IdempotencyKeyMissing    POST /v1/orders without a usable Idempotency-Key
    ├── PayloadTooLarge          the body passes ORDERS_MAX_BODY_BYTES
    ├── ValidationFailed         the request's shape or values (`errors`: where and why)
    ├── UnknownSku               an order names SKUs the catalog lacks (`skus`)
    ├── InsufficientStock        not enough stock for some lines (`skus`)
    ├── TooManyPendingOrders     the customer is at the cap (`max_pending_orders`)
    ├── InvalidTransition        the status machine refuses the change (`current_status`)
    ├── PreconditionFailed       If-Match names another version
    ├── IdempotencyInProgress    another request holds the key
    ├── IdempotencyKeyReuse      the key came with another body
    ├── RateLimited              too many orders this minute
    └── Unavailable              the database (or the service) cannot answer now
        └── ConnectionLost       (orders/db/pool.py) the connection broke in use
"""

from __future__ import annotations

from typing import Any


class OrdersError(Exception):
    """`detail` is for the client; `extra` are further members of its problem; when
    `retry_after` is set, the client may retry after that many seconds."""

    default_detail = "an unexpected error occurred"
    # The WWW-Authenticate challenge of a 401 (RFC 9110 requires one).
    challenge = "Bearer"

    def __init__(self, detail: str | None = None, *, retry_after: int | None = None, **extra: Any) -> None:
        self.detail = detail or self.default_detail
        super().__init__(self.detail)
        self.retry_after = retry_after
        self.extra = extra


class Unauthorized(OrdersError):
    default_detail = "a valid bearer token is required"


class InvalidSignature(OrdersError):
    default_detail = "a valid Payment-Signature is required"
    challenge = "Payment-Signature"


class Forbidden(OrdersError):
    pass


class NotFound(OrdersError):
    pass


class IdempotencyKeyMissing(OrdersError):
    pass


class PayloadTooLarge(OrdersError):
    pass


class ValidationFailed(OrdersError):
    def __init__(self, errors: list[dict[str, Any]], detail: str = "the request is invalid") -> None:
        super().__init__(detail, errors=errors)


class UnknownSku(OrdersError):
    pass


class InsufficientStock(OrdersError):
    default_detail = "not enough stock for some lines; nothing was reserved"


class TooManyPendingOrders(OrdersError):
    pass


class InvalidTransition(OrdersError):
    pass


class PreconditionFailed(OrdersError):
    pass


class IdempotencyInProgress(OrdersError):
    def __init__(self) -> None:
        super().__init__("a request with this Idempotency-Key is still being processed", retry_after=1)


class IdempotencyKeyReuse(OrdersError):
    pass


class RateLimited(OrdersError):
    pass


class Unavailable(OrdersError):
    def __init__(
        self, detail: str = "the service is temporarily unavailable", retry_after: int = 2, **extra: Any
    ) -> None:
        super().__init__(detail, retry_after=retry_after, **extra)


def validation_errors(raw: list[Any]) -> list[dict[str, Any]]:
    """Pydantic's errors, reduced to where and why (never echoing the input back)."""
    out = []
    for err in raw:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        out.append(
            {"field": ".".join(loc) or "body", "message": err.get("msg", "invalid"), "code": err.get("type", "invalid")}
        )
    return out

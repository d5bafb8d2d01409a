"""problem+json (RFC 9457): the service's exceptions (orders/errors.py) as the problem
types of docs/API.md, and the handlers that answer them.

Every error the service answers is one of PROBLEM_TYPES; anything else that escapes a
handler becomes a bare 500 problem with no detail (the traceback goes to the log).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import asyncpg
import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from orders import errors

PROBLEM_BASE = "https://orders.example/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"

log = structlog.get_logger("orders.problems")


class ProblemType(NamedTuple):
    status: int
    slug: str
    title: str


INTERNAL = ProblemType(500, "internal-error", "Internal server error")

# An exception answers the problem of its class, or of its nearest ancestor listed here.
PROBLEM_TYPES: dict[type[errors.OrdersError], ProblemType] = {
    errors.OrdersError: INTERNAL,
    errors.Unauthorized: ProblemType(401, "unauthorized", "Unauthorized"),
    errors.InvalidSignature: ProblemType(401, "invalid-signature", "Invalid signature"),
    errors.Forbidden: ProblemType(403, "forbidden", "Forbidden"),
    errors.NotFound: ProblemType(404, "not-found", "Not found"),
    errors.IdempotencyKeyMissing: ProblemType(400, "idempotency-key-missing", "Idempotency-Key required"),
    errors.InsufficientStock: ProblemType(409, "insufficient-stock", "Insufficient stock"),
    errors.TooManyPendingOrders: ProblemType(409, "too-many-pending-orders", "Too many pending orders"),
    errors.InvalidTransition: ProblemType(409, "invalid-transition", "Invalid status transition"),
    errors.IdempotencyInProgress: ProblemType(409, "idempotency-in-progress", "Request in progress"),
    errors.PreconditionFailed: ProblemType(412, "precondition-failed", "Precondition failed"),
    errors.PayloadTooLarge: ProblemType(413, "payload-too-large", "Payload too large"),
    errors.ValidationFailed: ProblemType(422, "validation-error", "Validation error"),
    errors.UnknownSku: ProblemType(422, "unknown-sku", "Unknown SKU"),
    errors.IdempotencyKeyReuse: ProblemType(422, "idempotency-key-reuse", "Idempotency-Key reused"),
    errors.RateLimited: ProblemType(429, "rate-limited", "Too many requests"),
    errors.Unavailable: ProblemType(503, "unavailable", "Service unavailable"),
}


def problem_type(exc: errors.OrdersError) -> ProblemType:
    for cls in type(exc).__mro__:
        found = PROBLEM_TYPES.get(cls)
        if found is not None:
            return found
    return INTERNAL


def problem(status: int, slug: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The one shape of every problem document the service answers."""
    return {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail, **extra}


def problem_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def error_response(exc: errors.OrdersError) -> Response:
    status, slug, title = problem_type(exc)
    body = problem(status, slug, title, exc.detail, **exc.extra)
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = exc.challenge
    return problem_response(status, body, headers)


def internal_error() -> Response:
    """The bare 500: nothing of the cause reaches the client (it goes to the log)."""
    return error_response(errors.OrdersError())


_GENERIC = {
    400: ("bad-request", "Bad request"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
}


def allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app answers at the request's path."""
    routes = request.app.router.routes
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in routes):
            allowed.append(method)
    return allowed


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.OrdersError)
    async def _error(_: Request, exc: errors.OrdersError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return error_response(errors.ValidationFailed(errors.validation_errors(list(exc.errors()))))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        slug, title = _GENERIC.get(exc.status_code, ("error", "Error"))
        body = problem(exc.status_code, slug, title, title)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # RFC 9110: every method of the resource, not only those of the first route
            # whose path matched (GET and POST /v1/orders are two routes).
            headers["Allow"] = ", ".join(allowed_methods(request))
        return problem_response(exc.status_code, body, headers)

    async def _unstorable_text(_: Request, exc: Exception) -> Response:
        # A string with U+0000 (or not valid in UTF-8) that got past validation: the
        # client's input, so 422, not 500. Inputs are validated first; this is the net.
        log.warning("unstorable_text", error=type(exc).__name__)
        return error_response(
            errors.ValidationFailed(
                [{"field": "body", "message": "text contains a character that cannot be stored", "code": "character"}]
            )
        )

    app.add_exception_handler(asyncpg.CharacterNotInRepertoireError, _unstorable_text)
    app.add_exception_handler(asyncpg.UntranslatableCharacterError, _unstorable_text)

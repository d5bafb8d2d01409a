"""Problem types (RFC 9457) of docs/API.md, and the handlers that render them.

Every error the service answers is one `Problem`; anything else that escapes a
handler becomes a bare 500 problem with no detail (the traceback goes to the log).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

PROBLEM_BASE = "https://orders.example/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"

log = structlog.get_logger("orders.errors")


class Problem(Exception):
    status: int = 500
    slug: str = "internal-error"
    title: str = "Internal server error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {
            "type": PROBLEM_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }

    def response(self) -> Response:
        return problem_response(self.status, self.body(), self.headers)


class Unauthorized(Problem):
    status, slug, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str = "a valid bearer token is required") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(Problem):
    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(Problem):
    status, slug, title = 404, "not-found", "Not found"


class IdempotencyKeyMissing(Problem):
    status, slug, title = 400, "idempotency-key-missing", "Idempotency-Key required"


class InsufficientStock(Problem):
    status, slug, title = 409, "insufficient-stock", "Insufficient stock"


class TooManyPendingOrders(Problem):
    status, slug, title = 409, "too-many-pending-orders", "Too many pending orders"


class InvalidTransition(Problem):
    status, slug, title = 409, "invalid-transition", "Invalid status transition"


class IdempotencyInProgress(Problem):
    status, slug, title = 409, "idempotency-in-progress", "Request in progress"

    def __init__(self) -> None:
        super().__init__(
            "a request with this Idempotency-Key is still being processed",
            headers={"Retry-After": "1"},
        )


class PreconditionFailed(Problem):
    status, slug, title = 412, "precondition-failed", "Precondition failed"


class PayloadTooLarge(Problem):
    status, slug, title = 413, "payload-too-large", "Payload too large"


class ValidationFailed(Problem):
    status, slug, title = 422, "validation-error", "Validation error"

    def __init__(self, errors: list[dict[str, Any]], detail: str = "the request is invalid") -> None:
        super().__init__(detail, errors=errors)


class UnknownSku(Problem):
    status, slug, title = 422, "unknown-sku", "Unknown SKU"


class IdempotencyKeyReuse(Problem):
    status, slug, title = 422, "idempotency-key-reuse", "Idempotency-Key reused"


class RateLimited(Problem):
    status, slug, title = 429, "rate-limited", "Too many requests"


class Unavailable(Problem):
    status, slug, title = 503, "unavailable", "Service unavailable"

    def __init__(
        self, detail: str = "the service is temporarily unavailable", retry_after: int = 2, **extra: Any
    ) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)}, **extra)


def internal_error() -> Response:
    """The bare 500: nothing of the cause reaches the client (it goes to the log)."""
    return Problem("an unexpected error occurred").response()


def problem_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def validation_errors(raw: list[Any]) -> list[dict[str, Any]]:
    """Pydantic's errors, reduced to where and why (never echoing the input back)."""
    out = []
    for err in raw:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        out.append(
            {"field": ".".join(loc) or "body", "message": err.get("msg", "invalid"), "code": err.get("type", "invalid")}
        )
    return out


_GENERIC = {
    400: ("bad-request", "Bad request"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    415: ("unsupported-media-type", "Unsupported media type"),
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
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return ValidationFailed(validation_errors(list(exc.errors()))).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        slug, title = _GENERIC.get(exc.status_code, ("error", "Error"))
        body = {"type": PROBLEM_BASE + slug, "title": title, "status": exc.status_code, "detail": title}
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
        return ValidationFailed(
            [{"field": "body", "message": "text contains a character that cannot be stored", "code": "character"}]
        ).response()

    app.add_exception_handler(asyncpg.CharacterNotInRepertoireError, _unstorable_text)
    app.add_exception_handler(asyncpg.UntranslatableCharacterError, _unstorable_text)

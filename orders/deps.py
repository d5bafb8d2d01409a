"""Dependency aliases for the routes: the lifespan's resources and who is calling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar
from uuid import UUID

import structlog
from fastapi import Depends, Query, Request

from orders.auth import Principal
from orders.domain.cursor import BadCursor
from orders.errors import Forbidden, NotFound, Unavailable, ValidationFailed
from orders.observability import unavailable_log
from orders.resources import Resources

T = TypeVar("T")


# Each dependency reads the request itself, with no dependency of its own: FastAPI solves
# every level of a dependency tree on every request, and that was the largest share of a
# cached GET's time (docs/PERFORMANCE.md). The GET of one order calls the plain functions
# itself; the dependencies below wrap them `async`: FastAPI runs a plain `def` dependency in
# the threadpool (a thread hop per request).


def resources(request: Request) -> Resources:
    res: Resources = request.state.res
    return res


def serving(request: Request) -> Resources:
    """The resources of a route that does business: after SIGTERM a request that arrives
    (on a keep-alive connection still open) is told to go elsewhere, 503 with Retry-After."""
    res: Resources = request.state.res
    if res.draining.is_set():
        unavailable_log("draining")
        raise Unavailable("the service is draining", retry_after=1)
    return res


def authenticate(request: Request, res: Resources) -> Principal:
    """Who is calling (401 `unauthorized` otherwise); bound to the request's log lines."""
    caller = res.verifier.verify(request.headers.get("authorization"))
    structlog.contextvars.bind_contextvars(customer_id=caller.customer_id)
    return caller


async def get_resources(request: Request) -> Resources:
    return resources(request)


async def serving_resources(request: Request) -> Resources:
    return serving(request)


async def current_principal(request: Request) -> Principal:
    return authenticate(request, serving(request))  # draining answers 503 before a bad token 401


def ensure_admin(caller: Principal) -> None:
    if not caller.is_admin:
        raise Forbidden("this operation is for staff")


async def staff_principal(request: Request) -> Principal:
    """A caller who must be staff: a dependency, so that 401 and 403 come before any 422 of
    the parameters (docs/API.md)."""
    caller = authenticate(request, serving(request))
    ensure_admin(caller)
    return caller


# Business routes; the probes and /metrics take ProbeResources and keep answering while draining.
ServingResources = Annotated[Resources, Depends(serving_resources)]
ProbeResources = Annotated[Resources, Depends(get_resources)]
CurrentCustomer = Annotated[Principal, Depends(current_principal)]
# The staff listings (notifications, payment events), which take no body.
Staff = Annotated[Principal, Depends(staff_principal)]


# The paging parameters of every listing (docs/API.md: `limit` 1 to 100, default 20).
PageLimit = Annotated[int, Query(ge=1, le=100)]
PageCursor = Annotated[str | None, Query(max_length=512)]


def request_id() -> str | None:
    """The request's X-Request-ID (bound by orders/observability.py), for the outbox rows."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return None if value is None else str(value)


def parse_cursor(decode: Callable[[str], T], cursor: str | None) -> T | None:
    """An opaque pagination cursor, decoded; a malformed one is 422 `validation-error`."""
    if not cursor:
        return None
    try:
        return decode(cursor)
    except BadCursor:
        raise ValidationFailed([{"field": "cursor", "message": "malformed cursor", "code": "cursor"}]) from None


def parse_order_id(order_id: str) -> UUID:
    """A path id that is not a UUID names no order: 404, like any unknown id."""
    try:
        return UUID(order_id)
    except ValueError:
        raise NotFound("no such order") from None

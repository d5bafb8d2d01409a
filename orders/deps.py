"""Dependency aliases for the routes: the lifespan's resources and who is calling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar
from uuid import UUID

import structlog
from fastapi import Depends, Request

from orders.auth import Principal
from orders.domain.cursor import BadCursor
from orders.errors import Forbidden, NotFound, Unavailable, ValidationFailed
from orders.observability import unavailable_log
from orders.resources import Resources

T = TypeVar("T")


async def get_resources(request: Request) -> Resources:
    # async: FastAPI runs a plain `def` dependency in the threadpool (a thread hop per request).
    res: Resources = request.state.res
    return res


async def serving_resources(res: Annotated[Resources, Depends(get_resources)]) -> Resources:
    """The resources of a route that does business: after SIGTERM a request that arrives
    (on a keep-alive connection still open) is told to go elsewhere, 503 with Retry-After."""
    if res.draining.is_set():
        unavailable_log("draining")
        raise Unavailable("the service is draining", retry_after=1)
    return res


# Business routes; the probes and /metrics take ProbeResources and keep answering while draining.
ServingResources = Annotated[Resources, Depends(serving_resources)]
ProbeResources = Annotated[Resources, Depends(get_resources)]


async def current_principal(
    request: Request,
    res: ServingResources,
) -> Principal:
    caller = res.verifier.verify(request.headers.get("authorization"))
    structlog.contextvars.bind_contextvars(customer_id=caller.customer_id)
    return caller


CurrentCustomer = Annotated[Principal, Depends(current_principal)]


def ensure_admin(caller: Principal) -> None:
    if not caller.is_admin:
        raise Forbidden("this operation is for staff")


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

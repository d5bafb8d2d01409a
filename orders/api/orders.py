"""Order routes. Each reads what it needs in the precedence order of docs/API.md:
401 (dependency), 413 (reading the body), 403, 404, 400, 422, then the service."""

from __future__ import annotations

import re
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import Response

from orders.api.openapi import header, json_body, problems
from orders.api.preconditions import etag, parse_if_match
from orders.body import parse_json, validate
from orders.deps import (
    CurrentCustomer,
    PageCursor,
    PageLimit,
    ServingResources,
    authenticate,
    ensure_admin,
    parse_cursor,
    parse_order_id,
    request_id,
    serving,
)
from orders.domain.cursor import decode_order_cursor
from orders.domain.status import OrderStatus
from orders.errors import IdempotencyKeyMissing, NotFound, ValidationFailed
from orders.schemas import EventList, Order, OrderCreate, OrderPage, StatusChange
from orders.service import orders as use_cases

router = APIRouter(prefix="/v1/orders", tags=["orders"])

IDEMPOTENCY_KEY_RE = re.compile(r"^[\x20-\x7e]{1,255}$")  # printable ASCII, space included
IF_MATCH = header("If-Match", 'the order\'s ETag, e.g. "3" (W/"3" and * accepted)')


def _order_response(doc: dict[str, Any] | bytes, version: int, status: int = 200, **headers: str) -> Response:
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return Response(body, status_code=status, media_type="application/json", headers={"ETag": etag(version), **headers})


@router.post(
    "",
    status_code=201,
    response_model=Order,
    summary="Place an order",
    responses=problems(400, 401, 409, 413, 422, 429, 503),
    openapi_extra={
        **json_body(OrderCreate),
        "parameters": [
            header(
                "Idempotency-Key",
                "1 to 255 printable ASCII characters; scoped to the customer, kept 24 h",
                required=True,
                pattern=IDEMPOTENCY_KEY_RE.pattern,
            )
        ],
    },
)
async def create_order(
    request: Request, background: BackgroundTasks, caller: CurrentCustomer, res: ServingResources
) -> Response:
    raw_bytes = await request.body()
    key = request.headers.get("idempotency-key")
    if key is None or not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise IdempotencyKeyMissing("an Idempotency-Key header of 1 to 255 printable ASCII characters is required")
    raw = parse_json(raw_bytes)
    req = validate(OrderCreate, raw)
    uow = res.unit_of_work()
    placed = await use_cases.place_order(
        uow,
        res.limiter,
        caller,
        key,
        raw,
        req,
        request_id(),
        max_pending=res.settings.max_pending_orders_per_customer,
    )
    background.add_task(uow.dispatch)
    headers = {"Location": f"/v1/orders/{placed.order_id}"}
    if placed.replayed:
        headers["Idempotent-Replayed"] = "true"
    return _order_response(placed.body, placed.version, placed.status, **headers)


@router.get(
    "",
    response_model=OrderPage,
    summary="List orders, newest first",
    responses=problems(401, 422, 503),
)
async def list_orders(
    caller: CurrentCustomer,
    res: ServingResources,
    status: OrderStatus | None = None,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
    customer_id: Annotated[
        str | None, Query(description="staff only (1 to 64 characters); ignored for customers")
    ] = None,
) -> Response:
    # docs/API.md: ignored for customers, whatever its value; for staff, empty means all.
    if not caller.is_admin or not customer_id:
        customer_id = None
    elif len(customer_id) > 64 or "\x00" in customer_id:
        raise ValidationFailed(
            [{"field": "customer_id", "message": "1 to 64 characters, no NUL", "code": "customer_id"}]
        )
    before = parse_cursor(decode_order_cursor, cursor)
    body = await use_cases.list_orders(
        res.unit_of_work(), caller, status=status, limit=limit, before=before, customer_id=customer_id
    )
    return Response(orjson.dumps(body), media_type="application/json")


@router.get(
    "/{order_id}",
    response_model=Order,
    summary="One order (owner or staff)",
    responses=problems(401, 404, 503),
)
async def get_order(order_id: str, request: Request) -> Response:
    # The most frequent request: no dependencies to solve, the same checks in the same order.
    res = serving(request)
    caller = authenticate(request, res)
    doc = await use_cases.get_order(res.unit_of_work(), caller, parse_order_id(order_id))
    return _order_response(doc, doc["version"])


@router.get(
    "/{order_id}/events",
    response_model=EventList,
    summary="The order's timeline, oldest first",
    responses=problems(401, 404, 503),
)
async def order_events(order_id: str, caller: CurrentCustomer, res: ServingResources) -> Response:
    items = await use_cases.order_events(res.unit_of_work(), caller, parse_order_id(order_id))
    return Response(orjson.dumps({"items": items}), media_type="application/json")


@router.post(
    "/{order_id}/cancel",
    response_model=Order,
    summary="Cancel a pending or paid order; its stock is released",
    responses=problems(401, 404, 409, 412, 503),
    openapi_extra={"parameters": [IF_MATCH]},
)
async def cancel_order(
    order_id: str, request: Request, background: BackgroundTasks, caller: CurrentCustomer, res: ServingResources
) -> Response:
    oid = parse_order_id(order_id)
    uow = res.unit_of_work()
    if_match = parse_if_match(request.headers.get("if-match"))
    doc = await use_cases.change_status(uow, caller, oid, OrderStatus.CANCELLED, if_match, request_id())
    background.add_task(uow.dispatch)
    return _order_response(doc, doc["version"])


@router.post(
    "/{order_id}/status",
    response_model=Order,
    summary="Change an order's status (staff)",
    responses=problems(401, 403, 404, 409, 412, 413, 422, 503),
    openapi_extra={**json_body(StatusChange), "parameters": [IF_MATCH]},
)
async def change_status(
    order_id: str, request: Request, background: BackgroundTasks, caller: CurrentCustomer, res: ServingResources
) -> Response:
    raw_bytes = await request.body()
    ensure_admin(caller)
    oid = parse_order_id(order_id)
    uow = res.unit_of_work()
    try:
        change = validate(StatusChange, parse_json(raw_bytes))
    except ValidationFailed:
        # 404 wins over 422: say "no such order" when there is none.
        if not await use_cases.visible_order_exists(uow, caller, oid):
            raise NotFound("no such order") from None
        raise
    if_match = parse_if_match(request.headers.get("if-match"))
    doc = await use_cases.change_status(uow, caller, oid, change.status, if_match, request_id())
    background.add_task(uow.dispatch)
    return _order_response(doc, doc["version"])

"""Use cases of orders: place, change status (cancel included), read, list, timeline.

A write is one transaction of its unit of work: everything it writes commits together or
not at all, and the cache and the outbox delivery are acted on only after the commit.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import structlog

from orders.auth import Principal
from orders.cache import order_key, product_key
from orders.documents import order_doc, rfc3339
from orders.domain.cursor import encode_order_cursor
from orders.domain.pricing import CatalogEntry, price_order
from orders.domain.status import NOTIFYING, OrderStatus, can_transition, event_type
from orders.errors import (
    IdempotencyInProgress,
    IdempotencyKeyReuse,
    InsufficientStock,
    InvalidTransition,
    NotFound,
    PreconditionFailed,
    TooManyPendingOrders,
    Unavailable,
    ValidationFailed,
)
from orders.notify.outbox import audit_row, email_row, event_row
from orders.ratelimit import RateLimiter
from orders.schemas import OrderCreate
from orders.service.unit_of_work import UnitOfWork

log = structlog.get_logger("orders.service")

PLACE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Placed:
    status: int
    body: bytes
    order_id: str
    version: int
    replayed: bool


def request_fingerprint(raw: Any) -> bytes:
    """The same JSON value gives the same fingerprint, whatever its key order or spacing."""
    return hashlib.sha256(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)).digest()


def _replay(record: asyncpg.Record, fingerprint: bytes) -> Placed:
    if bytes(record["request_hash"]) != fingerprint:
        raise IdempotencyKeyReuse("this Idempotency-Key was used with a different request body")
    body = bytes(record["response_body"])
    doc = orjson.loads(body)
    return Placed(record["status_code"], body, doc["id"], doc["version"], True)


class CatalogChanged(Exception):
    """A product's name, price or currency changed between the snapshot an order was
    priced from and its reservation: the transaction rolls back and is placed again."""


async def place_order(
    uow: UnitOfWork,
    limiter: RateLimiter,
    caller: Principal,
    key: str,
    raw: Any,
    req: OrderCreate,
    request_id: str | None,
    *,
    max_pending: int,
) -> Placed:
    """`raw`: the body as parsed JSON (its fingerprint guards the key); `max_pending`: the
    customer's cap of pending orders (0: none)."""
    fingerprint = request_fingerprint(raw)
    # Sorted, so that concurrent orders lock product rows in one order.
    lines = sorted(req.items, key=lambda line: line.sku)
    skus = [line.sku for line in lines]
    counted = False
    for attempt in range(PLACE_ATTEMPTS):
        try:
            async with uow.transaction() as conn:
                claim = await uow.idempotency.claim(conn, caller.customer_id, key, skus)
                stored = claim["request_hash"] is not None
                # A replay answers exactly what the first request answered, even if the
                # catalog has changed currencies since; any other request is validated.
                replay = stored and bytes(claim["request_hash"]) == fingerprint
                if not replay and claim["currencies"] > 1:
                    raise ValidationFailed(
                        [
                            {
                                "field": "items",
                                "message": "all SKUs of an order must share one currency",
                                "code": "mixed_currency",
                            }
                        ]
                    )
                if not counted:  # once per request, whatever the attempts
                    counted = True
                    await limiter.check(caller.customer_id)
                # docs/API.md: replay, then idempotency-key-reuse, then idempotency-in-progress.
                # A stored answer is committed: it holds whoever has the key's lock now.
                if stored:
                    return _replay(claim, fingerprint)
                if not claim["locked"]:
                    raise IdempotencyInProgress()
                return await _place(uow, conn, caller, key, fingerprint, req, lines, claim, request_id, max_pending)
        except (asyncpg.DeadlockDetectedError, CatalogChanged) as exc:
            # Product rows are locked in SKU order, so a deadlock should not happen; a
            # price changed by staff meanwhile may. Either way the transaction rolled back.
            if attempt == PLACE_ATTEMPTS - 1:
                raise Unavailable("the order could not be placed now, retry with the same key", retry_after=1) from exc
            log.warning("order_retry", attempt=attempt + 1, reason=type(exc).__name__)
        except asyncpg.UniqueViolationError as exc:
            if exc.table_name != "idempotency_keys":
                raise
            # Another request with this key committed between our lookup and our insert.
            record = await uow.read(lambda conn: uow.idempotency.lookup(conn, caller.customer_id, key))
            assert record is not None
            return _replay(record, fingerprint)
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _place(
    uow: UnitOfWork,
    conn: asyncpg.Connection,
    caller: Principal,
    key: str,
    fingerprint: bytes,
    req: OrderCreate,
    lines: list[Any],
    claim: asyncpg.Record,
    request_id: str | None,
    max_pending: int,
) -> Placed:
    """Price the order from the claim's snapshot of the catalog, then reserve and write
    it in one statement (orders.PLACE_SQL)."""
    # docs/API.md: the cap is the first business outcome. Refused at once when the claim's
    # count already says so (it was true then); otherwise PLACE_SQL decides on the locked row.
    if max_pending and (claim["pending"] or 0) >= max_pending:
        raise _too_many_pending(max_pending)
    catalog = {
        sku: CatalogEntry(name, price, stock)
        for sku, name, price, stock in zip(
            claim["skus"] or [], claim["names"] or [], claim["unit_prices"] or [], claim["stocks"] or [], strict=True
        )
    }
    priced = price_order(catalog, claim["currency"], req.items)  # the client's order of lines
    totals = priced.totals
    now = claim["now"]  # the transaction's timestamp
    order = order_doc(
        {
            "id": uuid.uuid4(),
            "customer_id": caller.customer_id,
            "status": OrderStatus.PENDING.value,
            "currency": totals.currency,
            "email": str(req.email),
            "subtotal": totals.subtotal,
            "total": totals.total,
            "shipping_address": req.shipping_address.model_dump(),
            "version": 1,
            "created_at": now,
            "updated_at": now,
        },
        items=[
            {
                "sku": p.sku,
                "name": p.name,
                "quantity": p.quantity,
                "unit_price": p.unit_price,
                "line_total": p.line_total,
            }
            for p in priced.lines
        ],
    )
    body = orjson.dumps(order)
    after = {"status": "pending", "version": 1, "total": totals.total, "currency": totals.currency}
    row = await uow.orders.place(
        conn,
        order=order,
        created_at=now,
        event_data={"status": "pending", "total": totals.total, "currency": totals.currency},
        outbox=[
            email_row(order, "created", request_id),
            audit_row("order.created", caller.customer_id, None, after, request_id),
            *([event_row(order)] if uow.events else []),
        ],
        idempotency_key=key,
        request_hash=fingerprint,
        response_body=body,
        terms=[(line.sku, line.quantity, catalog[line.sku].name, catalog[line.sku].unit_price) for line in lines],
        max_pending=max_pending,
    )
    if not row["placed"]:
        if not row["room"]:
            raise _too_many_pending(max_pending)
        if not row["same_terms"]:
            raise CatalogChanged()
        raise InsufficientStock(skus=list(row["short"] or []))
    structlog.contextvars.bind_contextvars(order_id=order["id"])
    uow.cache_write(order_key(uow.cache.prefix, order["id"]), 1, order)
    for sku, version in zip(row["reserved_skus"], row["reserved_versions"], strict=True):
        uow.cache_write(product_key(uow.cache.prefix, sku), version, None)
    uow.dispatch_later(list(row["outbox_ids"] or []))
    return Placed(201, body, order["id"], 1, False)


def _too_many_pending(max_pending: int) -> TooManyPendingOrders:
    return TooManyPendingOrders(
        f"at most {max_pending} orders may be pending at once; pay or cancel one first; nothing was reserved",
        max_pending_orders=max_pending,
    )


async def visible_order_exists(uow: UnitOfWork, caller: Principal, order_id: UUID) -> bool:
    owner = await uow.read(lambda conn: uow.orders.owner(conn, order_id))
    return owner is not None and caller.can_see(owner)


async def change_status(
    uow: UnitOfWork,
    caller: Principal,
    order_id: UUID,
    target: OrderStatus,
    if_match: frozenset[int] | None,
    request_id: str | None,
    *,
    reason: str | None = None,
) -> dict[str, Any]:
    """Move an order to `target` (cancel included): 404, 412, 409 or the new order.
    `if_match`: the versions the client accepts (None: any); `reason`: why an order is
    cancelled, for its order event (None: "staff" or "customer", by the caller)."""
    async with uow.transaction() as conn:
        row = await uow.orders.get_for_update(conn, order_id)
        if row is None or not caller.can_see(row["customer_id"]):
            raise NotFound("no such order")
        if if_match is not None and row["version"] not in if_match:
            raise PreconditionFailed(f'the order is at version "{row["version"]}"')
        current = OrderStatus(row["status"])
        if not can_transition(current, target):
            raise InvalidTransition(
                f"an order that is {current.value} cannot become {target.value}",
                current_status=current.value,
            )
        actor = caller.customer_id
        before = {"status": current.value, "version": row["version"]}
        after = {"status": target.value, "version": row["version"] + 1}
        doc = order_doc(row)
        doc["status"] = target.value
        doc["version"] = row["version"] + 1
        doc["updated_at"] = rfc3339(row["now"])  # what CHANGE_SQL writes
        outbox_rows = [audit_row(event_type(target), actor, before, after, request_id)]
        if target in NOTIFYING:
            outbox_rows.append(email_row(doc, target.value, request_id))
        if uow.events:
            if target is OrderStatus.CANCELLED and reason is None:
                reason = "staff" if caller.is_admin else "customer"
            outbox_rows.append(event_row(doc, reason))
        result = await uow.orders.change_status(
            conn,
            order_id,
            status=target.value,
            event_type=event_type(target),
            actor=actor,
            event_data={"from": current.value, "to": target.value},
            release_stock=target is OrderStatus.CANCELLED,
            outbox=outbox_rows,
        )
        doc["updated_at"] = rfc3339(result["updated_at"])
        structlog.contextvars.bind_contextvars(order_id=str(order_id))
        uow.cache_write(order_key(uow.cache.prefix, order_id), doc["version"], doc)
        for sku, version in result["released"] or []:
            uow.cache_write(product_key(uow.cache.prefix, sku), version, None)
        uow.dispatch_later(list(result["outbox_ids"] or []))
    return doc


async def get_order(uow: UnitOfWork, caller: Principal, order_id: UUID) -> dict[str, Any]:
    async def load() -> tuple[int, dict[str, Any]] | None:
        row = await uow.read(lambda conn: uow.orders.get(conn, order_id))
        return None if row is None else (row["version"], order_doc(row))

    doc = await uow.cache.get_or_load(order_key(uow.cache.prefix, order_id), load)
    if doc is None or not caller.can_see(doc["customer_id"]):
        raise NotFound("no such order")
    return doc


async def list_orders(
    uow: UnitOfWork,
    caller: Principal,
    *,
    status: OrderStatus | None,
    limit: int,
    before: tuple[datetime, UUID] | None,
    customer_id: str | None,
) -> dict[str, Any]:
    """A customer sees their own orders (customer_id ignored); staff all, or one customer's."""
    scope = customer_id if caller.is_admin else caller.customer_id
    rows = await uow.read(
        lambda conn: uow.orders.page(
            conn, customer_id=scope, status=status.value if status else None, before=before, limit=limit + 1
        ),
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "items": [order_doc(r) for r in rows],
        "next_cursor": encode_order_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None,
    }


async def order_events(uow: UnitOfWork, caller: Principal, order_id: UUID) -> list[dict[str, Any]]:
    row = await uow.read(lambda conn: uow.orders.events(conn, order_id))
    if row is None or not caller.can_see(row["customer_id"]):
        raise NotFound("no such order")
    return list(row["items"])

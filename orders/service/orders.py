"""Use cases of orders: place, change status (cancel included), read, list, timeline.

A write is one transaction of its unit of work: everything it writes commits together or
not at all, and the cache and the outbox delivery are acted on only after the commit.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import structlog

from orders.auth import Principal
from orders.cache import order_key, product_key
from orders.documents import order_doc, rfc3339
from orders.domain.cursor import encode_order_cursor, page
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
    UnknownSku,
    ValidationFailed,
)
from orders.notify.outbox import audit_row, email_row, event_row
from orders.ratelimit import RateLimiter
from orders.schemas import OrderCreate
from orders.service.price_list import Terms
from orders.service.unit_of_work import UnitOfWork

log = structlog.get_logger("orders.service")

PLACE_ATTEMPTS = 3
# Calls of orders_change() per status change: more only when the order changed meanwhile.
CHANGE_ATTEMPTS = 3


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
    """A product's name, price or currency was not what the order was priced from: nothing
    was written, and the order is priced again from the terms the database answered."""


def _mixed_currency() -> ValidationFailed:
    return ValidationFailed(
        [{"field": "items", "message": "all SKUs of an order must share one currency", "code": "mixed_currency"}]
    )


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
    customer's cap of pending orders (0: none).

    One database round trip on the common path: the order is priced from the process's
    price list, then orders_place() (migration 0007) claims the key, checks the cap and
    reserves on the locked rows, in autocommit. More only when the price list misses (one
    read), when the SKUs seem to mix currencies (one read), or when a product's terms
    changed (one more call, priced from the terms it answered)."""
    fingerprint = request_fingerprint(raw)
    # Sorted, so that concurrent orders lock product rows in one order.
    lines = sorted(req.items, key=lambda line: line.sku)
    skus = [line.sku for line in lines]

    def read_terms(missing: list[str]) -> Any:
        return uow.read(lambda conn: uow.products.terms(conn, missing))

    terms = await uow.price_list.terms(skus, read_terms)
    if len({t.currency for t in terms.values()}) > 1:
        # A validation error that must win over the rate limit and the key's outcome, but
        # not over a replay: judged on the latest terms and the key's record.
        record, rows = await uow.read(lambda conn: _key_and_terms(uow, conn, caller.customer_id, key, skus))
        terms = uow.price_list.update(rows, forget=skus)
        if record is not None and bytes(record["request_hash"]) == fingerprint:
            await limiter.check(caller.customer_id)
            return _replay(record, fingerprint)
        if len({t.currency for t in terms.values()}) > 1:
            raise _mixed_currency()
    await limiter.check(caller.customer_id)  # once per request, whatever the attempts
    for attempt in range(PLACE_ATTEMPTS):
        try:
            return await _place(uow, caller, key, fingerprint, req, lines, terms, request_id, max_pending)
        except CatalogChanged as exc:
            terms = uow.price_list.update(exc.args[0], forget=skus)
            if len({t.currency for t in terms.values()}) > 1:
                raise _mixed_currency() from None
            failure: Exception = exc
            # Expected once per process after each catalog change: not a warning.
            log.info("order_repriced", attempt=attempt + 1)
        except asyncpg.DeadlockDetectedError as exc:
            # Product rows are locked in SKU order, so a deadlock should not happen; if it
            # does, the call was rolled back whole and is made again.
            failure = exc
        except asyncpg.UniqueViolationError as exc:
            if exc.table_name != "idempotency_keys":
                raise
            # A request with this key committed past the key's lock (a replica of an older
            # release, say): the primary key is the final arbiter.
            record = await uow.read(lambda conn: uow.idempotency.lookup(conn, caller.customer_id, key))
            assert record is not None
            return _replay(record, fingerprint)
        if attempt == PLACE_ATTEMPTS - 1:
            raise Unavailable("the order could not be placed now, retry with the same key", retry_after=1) from failure
        if not isinstance(failure, CatalogChanged):
            log.warning("order_retry", attempt=attempt + 1, reason=type(failure).__name__)
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _key_and_terms(
    uow: UnitOfWork, conn: asyncpg.Connection, customer_id: str, key: str, skus: list[str]
) -> tuple[asyncpg.Record | None, list[tuple[str, str, int, str]]]:
    return await uow.idempotency.lookup(conn, customer_id, key), await uow.products.terms(conn, skus)


async def _place(
    uow: UnitOfWork,
    caller: Principal,
    key: str,
    fingerprint: bytes,
    req: OrderCreate,
    lines: list[Any],
    terms: dict[str, Terms],
    request_id: str | None,
    max_pending: int,
) -> Placed:
    """Price the order from `terms`, then one call of orders_place() decides and writes.
    With a SKU that `terms` does not know nothing can be priced: the call still answers
    the key's outcome, the cap, stock and unknown SKUs, in docs/API.md's order."""
    currency = next(iter(terms.values())).currency if terms else None
    term_rows = [
        (
            line.sku,
            line.quantity,
            *((terms[line.sku].name, terms[line.sku].unit_price) if line.sku in terms else (None, None)),
        )
        for line in lines
    ]
    order: dict[str, Any] | None = None
    body = b""
    place_args: dict[str, Any] = {}
    if currency is not None and len(terms) == len(lines):
        catalog = {sku: CatalogEntry(t.name, t.unit_price) for sku, t in terms.items()}
        priced = price_order(catalog, currency, req.items)  # the client's order of lines
        totals = priced.totals
        # The service's clock: the response body stored under the key must be the one
        # the client gets, and it is built before the call.
        now = datetime.now(UTC)
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
        place_args = {
            "created_at": now,
            "event_data": {"status": "pending", "total": totals.total, "currency": totals.currency},
            "outbox": [
                email_row(order, "created", request_id),
                audit_row("order.created", caller.customer_id, None, after, request_id),
                *([event_row(order)] if uow.events else []),
            ],
            "response_body": body,
        }
    async with uow.autocommit() as conn:
        row = await uow.orders.place(
            conn,
            customer_id=caller.customer_id,
            idempotency_key=key,
            request_hash=fingerprint,
            terms=term_rows,
            currency=currency,
            max_pending=max_pending,
            order=order,
            **place_args,
        )
        outcome = row["outcome"]
        if outcome == "placed":
            assert order is not None  # a line without terms is never placed
            # Nothing below may raise: the order is committed.
            structlog.contextvars.bind_contextvars(order_id=order["id"])
            uow.cache_write(order_key(uow.cache.prefix, order["id"]), 1, order)
            for sku, version in zip(row["skus"], row["versions"], strict=True):
                uow.cache_write(product_key(uow.cache.prefix, sku), version, None)
            uow.dispatch_later(list(row["outbox_ids"] or []))
            return Placed(201, body, order["id"], 1, False)
    # docs/API.md: replay, then idempotency-key-reuse, then idempotency-in-progress; then
    # the cap; then stock, then unknown SKUs.
    if outcome == "stored":
        return _replay(row, fingerprint)
    if outcome == "in_progress":
        raise IdempotencyInProgress()
    if outcome == "too_many_pending":
        raise _too_many_pending(max_pending)
    if outcome == "catalog_changed":
        raise CatalogChanged(
            list(
                zip(
                    row["skus"] or [],
                    row["names"] or [],
                    row["unit_prices"] or [],
                    row["currencies"] or [],
                    strict=True,
                )
            )
        )
    if outcome == "insufficient_stock":
        raise InsufficientStock(skus=list(row["skus"]))
    if outcome == "unknown_sku":
        raise UnknownSku("some SKUs are not in the catalog", skus=list(row["skus"]))
    raise AssertionError(f"orders_place() answered {outcome!r}")


def _too_many_pending(max_pending: int) -> TooManyPendingOrders:
    return TooManyPendingOrders(
        f"at most {max_pending} orders may be pending at once; pay or cancel one first; nothing was reserved",
        max_pending_orders=max_pending,
    )


async def visible_order_exists(uow: UnitOfWork, caller: Principal, order_id: UUID) -> bool:
    owner = await uow.read(lambda conn: uow.orders.owner(conn, order_id))
    return owner is not None and caller.can_see(owner)


def _refusal(
    caller: Principal, doc: dict[str, Any] | None, target: OrderStatus, if_match: frozenset[int] | None
) -> Exception | None:
    """Why `caller` may not move `doc` (None: no such order) to `target`: 404, then 412,
    then 409; None when the change is allowed."""
    if doc is None or not caller.can_see(doc["customer_id"]):
        return NotFound("no such order")
    if if_match is not None and doc["version"] not in if_match:
        return PreconditionFailed(f'the order is at version "{doc["version"]}"')
    current = OrderStatus(doc["status"])
    if not can_transition(current, target):
        return InvalidTransition(
            f"an order that is {current.value} cannot become {target.value}",
            current_status=current.value,
        )
    return None


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
    `if_match`: the versions the client accepts (None: any). `reason` of a cancellation:
    by default "staff" when staff cancel, else "customer".

    One database round trip on the common path: the change is judged on the order as the
    cache holds it, then orders_change() (migration 0008) writes it in autocommit only if
    the order is still at that version. A miss costs a read first, and so does a refusal
    judged on the cache (which may lag a commit by a moment: a refusal is only answered
    from the database's row). When the version moved (a stale cache, a change that
    committed first), the call answers the latest row: judged again, and written again
    from it, CHANGE_ATTEMPTS calls at most, then 503."""
    if target is OrderStatus.CANCELLED and reason is None:
        reason = "staff" if caller.is_admin else "customer"
    doc = await uow.cache.get(order_key(uow.cache.prefix, order_id))
    if doc is None or _refusal(caller, doc, target, if_match) is not None:
        row = await uow.read(lambda conn: uow.orders.get(conn, order_id))
        doc = None if row is None else order_doc(row)
    for _ in range(CHANGE_ATTEMPTS):
        refusal = _refusal(caller, doc, target, if_match)
        if refusal is not None:
            raise refusal
        assert doc is not None
        async with uow.autocommit() as conn:
            outcome, doc = await _change(
                uow, conn, doc, target, actor=caller.customer_id, request_id=request_id, reason=reason
            )
        if outcome == "changed":
            assert doc is not None
            return doc
    raise Unavailable("the order kept changing meanwhile, retry", retry_after=1)


async def apply_change(
    uow: UnitOfWork,
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    target: OrderStatus,
    *,
    actor: str,
    request_id: str | None,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A status change in the caller's transaction (the payment webhook, the expiry): `row`
    is the order as get_for_update read it, locked by this open transaction, and the
    transition is allowed. Written as change_status() writes it (_change)."""
    outcome, doc = await _change(
        uow, conn, order_doc(row), target, actor=actor, request_id=request_id, reason=reason, data=data
    )
    # The row is locked by this transaction at the version it was read at.
    assert outcome == "changed" and doc is not None, outcome
    return doc


async def _change(
    uow: UnitOfWork,
    conn: asyncpg.Connection,
    current_doc: dict[str, Any],
    target: OrderStatus,
    *,
    actor: str,
    request_id: str | None,
    reason: str | None,
    data: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any] | None]:
    """The one path of every status change (staff, customer, payment provider, expiry):
    `current_doc` moved to `target` (an allowed transition) by one call of orders_change(),
    if the order is still at its version. Writes the change, its timeline event (with
    `reason` and `data`), audit entry, email and order event; the cache and the delivery
    follow the commit. Returns ("changed", the new order), ("stale", the latest order: nothing
    written) or ("not_found", None)."""
    current = OrderStatus(current_doc["status"])
    version = current_doc["version"]
    before = {"status": current.value, "version": version}
    after = {"status": target.value, "version": version + 1}
    event_data: dict[str, Any] = {"from": current.value, "to": target.value, **(data or {})}
    if reason is not None:
        event_data["reason"] = reason
        after["reason"] = reason
    # updated_at is the statement's now(), which only orders_change() knows: it sets it in
    # the order event's row too, and answers it for the document.
    doc = {**current_doc, "status": target.value, "version": version + 1, "updated_at": None}
    outbox_rows = [audit_row(event_type(target), actor, before, after, request_id)]
    if target in NOTIFYING:
        outbox_rows.append(email_row(doc, target.value, request_id))
    if uow.events:
        outbox_rows.append(event_row(doc, reason))
    order_id = UUID(doc["id"])
    result = await uow.orders.change_status(
        conn,
        order_id,
        version=version,
        status=target.value,
        event_type=event_type(target),
        actor=actor,
        event_data=event_data,
        release_stock=target is OrderStatus.CANCELLED,
        outbox=outbox_rows,
    )
    outcome = result["outcome"]
    if outcome == "stale":
        return outcome, order_doc(result)
    if outcome == "not_found":
        return outcome, None
    assert outcome == "changed", outcome
    # Nothing below may raise: the change is committed (in autocommit) or will be.
    doc["updated_at"] = rfc3339(result["updated_at"])
    structlog.contextvars.bind_contextvars(order_id=str(order_id))
    uow.cache_write(order_key(uow.cache.prefix, order_id), doc["version"], doc)
    for sku, product_version in result["released"] or []:
        uow.cache_write(product_key(uow.cache.prefix, sku), product_version, None)
    uow.dispatch_later(list(result["outbox_ids"] or []))
    return outcome, doc


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
    return page(rows, limit, order_doc, lambda r: encode_order_cursor(r["created_at"], r["id"]))


async def order_events(uow: UnitOfWork, caller: Principal, order_id: UUID) -> list[dict[str, Any]]:
    row = await uow.read(lambda conn: uow.orders.events(conn, order_id))
    if row is None or not caller.can_see(row["customer_id"]):
        raise NotFound("no such order")
    return list(row["items"])

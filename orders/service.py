"""Use cases. Each owns one transaction: everything it writes commits together or not
at all; the cache and the outbox delivery are acted on only after the commit."""

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
from orders.db import idempotency, orders, products
from orders.db.pool import connection, read
from orders.documents import order_doc, product_doc, rfc3339
from orders.domain.cursor import encode_order_cursor, encode_sku_cursor
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
from orders.notify.outbox import audit_row, email_row
from orders.notify.relay import FAST_PATH_HEAD_START_S
from orders.resources import Resources
from orders.schemas import OrderCreate

log = structlog.get_logger("orders.service")

PLACE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Placed:
    status: int
    body: bytes
    order_id: str
    version: int
    replayed: bool
    outbox_ids: list[int]


def request_fingerprint(raw: Any) -> bytes:
    """The same JSON value gives the same fingerprint, whatever its key order or spacing."""
    return hashlib.sha256(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)).digest()


def _replay(record: asyncpg.Record, fingerprint: bytes) -> Placed:
    if bytes(record["request_hash"]) != fingerprint:
        raise IdempotencyKeyReuse("this Idempotency-Key was used with a different request body")
    body = bytes(record["response_body"])
    doc = orjson.loads(body)
    return Placed(record["status_code"], body, doc["id"], doc["version"], True, [])


class CatalogChanged(Exception):
    """A product's name, price or currency changed between the snapshot an order was
    priced from and its reservation: the transaction rolls back and is placed again."""


async def place_order(
    res: Resources,
    who: Principal,
    key: str,
    raw: Any,
    req: OrderCreate,
    request_id: str | None,
) -> Placed:
    fingerprint = request_fingerprint(raw)
    # Sorted, so that concurrent orders lock product rows in one order.
    lines = sorted(req.items, key=lambda line: line.sku)
    skus = [line.sku for line in lines]
    timeout = res.settings.db_acquire_timeout_s
    counted = False
    for attempt in range(PLACE_ATTEMPTS):
        try:
            async with connection(res.pool, timeout) as conn, conn.transaction():
                claim = await idempotency.claim(conn, who.customer_id, key, skus)
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
                    await res.limiter.check(who.customer_id)
                # docs/API.md: replay, then idempotency-key-reuse, then idempotency-in-progress.
                # A stored answer is committed: it holds whoever has the key's lock now.
                if stored:
                    return _replay(claim, fingerprint)
                if not claim["locked"]:
                    raise IdempotencyInProgress()
                cap = res.settings.max_pending_orders_per_customer
                placed, order, reserved = await _place(conn, who, key, fingerprint, req, lines, claim, request_id, cap)
            break
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
            record = await read(res.pool, timeout, lambda conn: idempotency.lookup(conn, who.customer_id, key))
            assert record is not None
            return _replay(record, fingerprint)
    structlog.contextvars.bind_contextvars(order_id=placed.order_id)
    await res.cache.apply(
        [(order_key(res.cache.prefix, placed.order_id), 1, order)]
        + [(product_key(res.cache.prefix, sku), version, None) for sku, version in reserved]
    )
    return placed


async def _place(
    conn: asyncpg.Connection,
    who: Principal,
    key: str,
    fingerprint: bytes,
    req: OrderCreate,
    lines: list[Any],
    claim: asyncpg.Record,
    request_id: str | None,
    max_pending: int,
) -> tuple[Placed, dict[str, Any], list[tuple[str, int]]]:
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
            "customer_id": who.customer_id,
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
    row = await orders.place(
        conn,
        order=order,
        created_at=now,
        event_data={"status": "pending", "total": totals.total, "currency": totals.currency},
        outbox=[
            email_row(order, "created", request_id),
            audit_row("order.created", who.customer_id, None, after, request_id),
        ],
        relay_delay_s=FAST_PATH_HEAD_START_S,
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
        raise InsufficientStock("not enough stock for some lines; nothing was reserved", skus=list(row["short"] or []))
    reserved = list(zip(row["reserved_skus"], row["reserved_versions"], strict=True))
    return Placed(201, body, order["id"], 1, False, list(row["outbox_ids"] or [])), order, reserved


def _too_many_pending(max_pending: int) -> TooManyPendingOrders:
    return TooManyPendingOrders(
        f"at most {max_pending} orders may be pending at once; pay or cancel one first; nothing was reserved",
        max_pending_orders=max_pending,
    )


async def visible_order_exists(res: Resources, who: Principal, order_id: UUID) -> bool:
    row = await read(res.pool, res.settings.db_acquire_timeout_s, lambda conn: orders.owner(conn, order_id))
    return row is not None and who.can_see(row)


async def change_status(
    res: Resources,
    who: Principal,
    order_id: UUID,
    target: OrderStatus,
    if_match: frozenset[int] | None,
    request_id: str | None,
) -> tuple[dict[str, Any], list[int]]:
    """Move an order to `target` (cancel included): 404, 412, 409 or the new order.
    `if_match`: the versions the client accepts (None: any)."""
    async with connection(res.pool, res.settings.db_acquire_timeout_s) as conn, conn.transaction():
        row = await orders.get_for_update(conn, order_id)
        if row is None or not who.can_see(row["customer_id"]):
            raise NotFound("no such order")
        if if_match is not None and row["version"] not in if_match:
            raise PreconditionFailed(f'the order is at version "{row["version"]}"')
        current = OrderStatus(row["status"])
        if not can_transition(current, target):
            raise InvalidTransition(
                f"an order that is {current.value} cannot become {target.value}",
                current_status=current.value,
            )
        actor = who.customer_id
        before = {"status": current.value, "version": row["version"]}
        after = {"status": target.value, "version": row["version"] + 1}
        doc = order_doc(row)
        doc["status"] = target.value
        doc["version"] = row["version"] + 1
        outbox_rows = [audit_row(event_type(target), actor, before, after, request_id)]
        if target in NOTIFYING:
            outbox_rows.append(email_row(doc, target.value, request_id))
        result = await orders.change_status(
            conn,
            order_id,
            status=target.value,
            event_type=event_type(target),
            actor=actor,
            event_data={"from": current.value, "to": target.value},
            release_stock=target is OrderStatus.CANCELLED,
            outbox=outbox_rows,
            relay_delay_s=FAST_PATH_HEAD_START_S,
        )
        doc["updated_at"] = rfc3339(result["updated_at"])
        outbox_ids = list(result["outbox_ids"] or [])
    structlog.contextvars.bind_contextvars(order_id=str(order_id))
    released = result["released"] or []
    await res.cache.apply(
        [(order_key(res.cache.prefix, order_id), doc["version"], doc)]
        + [(product_key(res.cache.prefix, sku), version, None) for sku, version in released]
    )
    return doc, outbox_ids


async def get_order(res: Resources, who: Principal, order_id: UUID) -> dict[str, Any]:
    key = order_key(res.cache.prefix, order_id)

    async def load() -> tuple[int, dict[str, Any]] | None:
        row = await read(res.pool, res.settings.db_acquire_timeout_s, lambda conn: orders.get(conn, order_id))
        return None if row is None else (row["version"], order_doc(row))

    doc = await res.cache.get_or_load(key, load)
    if doc is None or not who.can_see(doc["customer_id"]):
        raise NotFound("no such order")
    return doc


async def get_product(res: Resources, sku: str) -> dict[str, Any]:
    key = product_key(res.cache.prefix, sku)

    async def load() -> tuple[int, dict[str, Any]] | None:
        row = await read(res.pool, res.settings.db_acquire_timeout_s, lambda conn: products.get(conn, sku))
        return None if row is None else (row["version"], product_doc(row))

    doc = await res.cache.get_or_load(key, load)
    if doc is None:
        raise NotFound("no such product")
    return doc


async def put_product(res: Resources, sku: str, fields: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    async with connection(res.pool, res.settings.db_acquire_timeout_s) as conn, conn.transaction():
        row = await products.upsert(conn, sku, fields)
    doc = product_doc(row)
    await res.cache.apply([(product_key(res.cache.prefix, sku), row["version"], doc)])
    return doc, bool(row["inserted"])


async def list_products(res: Resources, after: str | None, limit: int) -> dict[str, Any]:
    rows = await read(res.pool, res.settings.db_acquire_timeout_s, lambda conn: products.page(conn, after, limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "items": [product_doc(r) for r in rows],
        "next_cursor": encode_sku_cursor(rows[-1]["sku"]) if more else None,
    }


async def list_orders(
    res: Resources,
    who: Principal,
    *,
    status: OrderStatus | None,
    limit: int,
    before: tuple[datetime, UUID] | None,
    customer_id: str | None,
) -> dict[str, Any]:
    """A customer sees their own orders (customer_id ignored); staff all, or one customer's."""
    scope = customer_id if who.is_admin else who.customer_id
    rows = await read(
        res.pool,
        res.settings.db_acquire_timeout_s,
        lambda conn: orders.page(
            conn, customer_id=scope, status=status.value if status else None, before=before, limit=limit + 1
        ),
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "items": [order_doc(r) for r in rows],
        "next_cursor": encode_order_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None,
    }


async def order_events(res: Resources, who: Principal, order_id: UUID) -> list[dict[str, Any]]:
    row = await read(res.pool, res.settings.db_acquire_timeout_s, lambda conn: orders.events(conn, order_id))
    if row is None or not who.can_see(row["customer_id"]):
        raise NotFound("no such order")
    return list(row["items"])

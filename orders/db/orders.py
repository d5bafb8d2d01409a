"""Orders, their items and their timeline."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg

from orders import tracing
from orders.db.outbox import FAST_PATH_HEAD_START_S

ORDER_COLUMNS = """
    o.id, o.customer_id, o.status, o.currency::text AS currency, o.email,
    o.subtotal, o.total, o.shipping_address, o.version, o.created_at, o.updated_at
"""

ITEMS_SUBQUERY = """
    (SELECT jsonb_agg(jsonb_build_object(
                'sku', i.sku, 'name', i.name, 'quantity', i.quantity,
                'unit_price', i.unit_price, 'line_total', i.line_total) ORDER BY i.position)
       FROM order_items i WHERE i.order_id = o.id) AS items
"""


class PlaceParams(NamedTuple):
    """The parameters of orders_place() (migration 0007), in the order of their numbers in
    PLACE_SQL; each is passed by name (p_<field>)."""

    order_id: str | None  # $1 (None .. $8 None, and no items: an order that cannot be placed)
    customer_id: str  # $2
    currency: str | None  # $3: the snapshot's (None when it knows none of the SKUs)
    email: str | None  # $4
    subtotal: int | None  # $5
    total: int | None  # $6
    shipping_address: dict[str, Any] | None  # $7
    created_at: datetime | None  # $8: the service's clock, as in the response body
    item_positions: list[int]  # $9 .. $14: the order's items, in the client's order
    item_skus: list[str]
    item_names: list[str]
    item_quantities: list[int]
    item_unit_prices: list[int]
    item_line_totals: list[int]
    event_data: dict[str, Any] | None  # $15
    outbox_delay_s: float  # $16
    outbox_kinds: list[str]  # $17 .. $19: the outbox rows
    outbox_topics: list[str]
    outbox_payloads: list[dict[str, Any]]
    idempotency_key: str  # $20
    request_hash: bytes  # $21
    response_body: bytes | None  # $22
    term_skus: list[str]  # $23 .. $26: the terms the order was priced at, sorted by SKU
    term_quantities: list[int]
    term_names: list[str | None]  # None: the snapshot does not know the SKU
    term_unit_prices: list[int | None]
    max_pending: int  # $27: the customer's cap of pending orders (0: none)
    trace_context: dict[str, str] | None  # $28: the request's, for the delivery span


# A new order in one round trip, in autocommit: the key's claim, the cap, the reservation
# and every write of the order, or the reason why not (migration 0007 says which outcomes
# and why). Arguments by name, so that the call and the function cannot drift apart.
PLACE_SQL = "SELECT * FROM orders_place({})".format(
    ", ".join(f"p_{name} => ${number}" for number, name in enumerate(PlaceParams._fields, 1))
)


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows of `width` values as `width` columns (the arrays that unnest() joins again)."""
    return [[row[i] for row in rows] for i in range(width)]


async def place(
    conn: asyncpg.Connection,
    *,
    customer_id: str,
    idempotency_key: str,
    request_hash: bytes,
    terms: list[tuple[str, int, str | None, int | None]],
    currency: str | None,
    max_pending: int,
    order: dict[str, Any] | None,
    created_at: datetime | None = None,
    event_data: dict[str, Any] | None = None,
    outbox: list[tuple[str, str, dict[str, Any]]] | None = None,
    response_body: bytes | None = None,
) -> asyncpg.Record:
    """orders_place() in autocommit: one round trip. `terms`: (sku, quantity, name,
    unit_price) of each line, sorted by SKU, as the order was priced (name and price None:
    the snapshot does not know the SKU); `max_pending`: the customer's cap of pending
    orders (0: none). `order` None (with a SKU the snapshot does not know, nothing could be
    priced): the call can only answer why not, never place."""
    items = order["items"] if order is not None else []
    outbox_columns, term_columns = _columns(outbox or [], 3), _columns(terms, 4)
    params = PlaceParams(
        order_id=order["id"] if order is not None else None,
        customer_id=customer_id,
        currency=currency,
        email=order["email"] if order is not None else None,
        subtotal=order["subtotal"] if order is not None else None,
        total=order["total"] if order is not None else None,
        shipping_address=order["shipping_address"] if order is not None else None,
        created_at=created_at,
        item_positions=list(range(len(items))),
        item_skus=[i["sku"] for i in items],
        item_names=[i["name"] for i in items],
        item_quantities=[i["quantity"] for i in items],
        item_unit_prices=[i["unit_price"] for i in items],
        item_line_totals=[i["line_total"] for i in items],
        event_data=event_data,
        outbox_delay_s=FAST_PATH_HEAD_START_S,
        outbox_kinds=outbox_columns[0],
        outbox_topics=outbox_columns[1],
        outbox_payloads=outbox_columns[2],
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        response_body=response_body,
        term_skus=term_columns[0],
        term_quantities=term_columns[1],
        term_names=term_columns[2],
        term_unit_prices=term_columns[3],
        max_pending=max_pending,
        trace_context=tracing.carrier(),
    )
    row = await conn.fetchrow(PLACE_SQL, *params)
    assert row is not None
    return row


async def get(conn: asyncpg.Connection, order_id: UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {ORDER_COLUMNS}, {ITEMS_SUBQUERY} FROM orders o WHERE o.id = $1", order_id)


async def get_for_update(conn: asyncpg.Connection, order_id: UUID) -> asyncpg.Record | None:
    """The order, locked (the payment webhook's path: orders_change() then runs in the
    same transaction)."""
    return await conn.fetchrow(
        f"SELECT {ORDER_COLUMNS}, {ITEMS_SUBQUERY} FROM orders o WHERE o.id = $1 FOR UPDATE OF o",
        order_id,
    )


async def owner(conn: asyncpg.Connection, order_id: UUID) -> str | None:
    value = await conn.fetchval("SELECT customer_id FROM orders WHERE id = $1", order_id)
    return None if value is None else str(value)


async def page(
    conn: asyncpg.Connection,
    *,
    customer_id: str | None,
    status: str | None,
    before: tuple[datetime, UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Newest first, keyset on (created_at, id): stable while new orders arrive."""
    return await conn.fetch(
        f"""
        SELECT {ORDER_COLUMNS}, {ITEMS_SUBQUERY}
          FROM orders o
         WHERE ($1::text IS NULL OR o.customer_id = $1)
           AND ($2::text IS NULL OR o.status = $2)
           AND ($3::timestamptz IS NULL OR (o.created_at, o.id) < ($3, $4::uuid))
         ORDER BY o.created_at DESC, o.id DESC
         LIMIT $5
        """,
        customer_id,
        status,
        before[0] if before else None,
        before[1] if before else None,
        limit,
    )


class ChangeParams(NamedTuple):
    """The parameters of orders_change() (migration 0008), in the order of their numbers
    in CHANGE_SQL; each is passed by name (p_<field>)."""

    order_id: UUID  # $1
    version: int  # $2: the version the change was judged on; written only if still current
    status: str  # $3
    event_type: str  # $4
    actor: str  # $5
    event_data: dict[str, Any]  # $6
    release_stock: bool  # $7
    outbox_delay_s: float  # $8
    outbox_kinds: list[str]  # $9 .. $11: the outbox rows
    outbox_topics: list[str]
    outbox_payloads: list[dict[str, Any]]
    trace_context: dict[str, str] | None  # $12: the request's, for the delivery span


# A status change in one call: written only if the order is still at the version it was
# judged on, else the latest row (migration 0008 says which outcomes and why).
CHANGE_SQL = "SELECT * FROM orders_change({})".format(
    ", ".join(f"p_{name} => ${number}" for number, name in enumerate(ChangeParams._fields, 1))
)


async def change_status(
    conn: asyncpg.Connection,
    order_id: UUID,
    *,
    version: int,
    status: str,
    event_type: str,
    actor: str,
    event_data: dict[str, Any],
    release_stock: bool,
    outbox: list[tuple[str, str, dict[str, Any]]],
) -> asyncpg.Record:
    """orders_change(): one round trip, in autocommit or in the caller's transaction.
    The outbox rows of kind 'event' get their `time` and `data.updated_at` there."""
    kinds, topics, payloads = _columns(outbox, 3)
    params = ChangeParams(
        order_id=order_id,
        version=version,
        status=status,
        event_type=event_type,
        actor=actor,
        event_data=event_data,
        release_stock=release_stock,
        outbox_delay_s=FAST_PATH_HEAD_START_S,
        outbox_kinds=kinds,
        outbox_topics=topics,
        outbox_payloads=payloads,
        trace_context=tracing.carrier(),
    )
    row = await conn.fetchrow(CHANGE_SQL, *params)
    assert row is not None
    return row


async def add_event(conn: asyncpg.Connection, order_id: UUID, type: str, actor: str, data: dict[str, Any]) -> None:
    """A timeline event that changes nothing else of the order (the payment webhook's
    outcomes that leave it as it is)."""
    await conn.execute(
        "INSERT INTO order_events (order_id, type, actor, data) VALUES ($1, $2, $3, $4)", order_id, type, actor, data
    )


async def events(conn: asyncpg.Connection, order_id: UUID) -> asyncpg.Record | None:
    """The owner of the order and its timeline, oldest first (None: no such order)."""
    return await conn.fetchrow(
        """
        SELECT o.customer_id,
               (SELECT coalesce(jsonb_agg(jsonb_build_object(
                          'type', e.type,
                          'at', to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                          'actor', e.actor, 'data', e.data)
                          ORDER BY e.id), '[]'::jsonb)
                  FROM order_events e WHERE e.order_id = o.id) AS items
          FROM orders o WHERE o.id = $1
        """,
        order_id,
    )

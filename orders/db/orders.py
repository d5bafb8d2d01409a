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
    """The order, locked, and `now`: the transaction's timestamp, which CHANGE_SQL writes as
    its updated_at (so that the order event built before it carries the same)."""
    return await conn.fetchrow(
        f"SELECT {ORDER_COLUMNS}, {ITEMS_SUBQUERY}, now() AS now FROM orders o WHERE o.id = $1 FOR UPDATE OF o",
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


# A status change: the order row (already locked by get_for_update), its event, its
# outbox rows; `$6` releases the stock when the change is a cancellation, locking the
# product rows in SKU order first, as a new order does (orders_place()). An order leaving
# pending is taken off its customer's count by the triggers of migration 0002 at the end
# of the statement; `customer` locks that row before the product rows, in orders_place()'s
# order (locked after them, a cancel and a new order of one customer could deadlock).
CHANGE_SQL = """
WITH customer AS MATERIALIZED (
    SELECT c.customer_id FROM customer_pending c JOIN orders o USING (customer_id)
     WHERE o.id = $1 AND o.status = 'pending'
       FOR NO KEY UPDATE OF c
), changed AS (
    UPDATE orders SET status = $2, version = version + 1, updated_at = now()
     WHERE id = $1
 RETURNING id, version, updated_at
), locked AS MATERIALIZED (
    SELECT p.sku FROM products p
     WHERE $6 AND p.sku IN (SELECT i.sku FROM order_items i WHERE i.order_id = $1)
       AND (SELECT count(*) FROM customer) >= 0  -- (always true: the customer's row first)
     ORDER BY p.sku FOR NO KEY UPDATE OF p
), released AS (
    UPDATE products p
       SET stock = p.stock + i.quantity, version = p.version + 1, updated_at = now()
      FROM order_items i JOIN locked USING (sku)
     WHERE $6 AND i.order_id = $1 AND p.sku = i.sku
 RETURNING p.sku, p.version
), event AS (
    INSERT INTO order_events (order_id, type, actor, data)
    VALUES ($1, $3, $4, $5)
), outbox_rows AS (
    INSERT INTO outbox (order_id, kind, topic, payload, next_attempt_at, trace_context)
    SELECT $1, t.kind, t.topic, t.payload, now() + make_interval(secs => $7), $11::jsonb
      FROM unnest($8::text[], $9::text[], $10::jsonb[]) AS t(kind, topic, payload)
    RETURNING id
)
SELECT c.version, c.updated_at,
       (SELECT array_agg(id ORDER BY id) FROM outbox_rows) AS outbox_ids,
       (SELECT jsonb_agg(jsonb_build_array(sku, version)) FROM released) AS released
  FROM changed c
"""


class ChangeParams(NamedTuple):
    """The parameters of CHANGE_SQL, in the order of their numbers."""

    order_id: UUID  # $1
    status: str  # $2
    event_type: str  # $3
    actor: str  # $4
    event_data: dict[str, Any]  # $5
    release_stock: bool  # $6
    outbox_delay_s: float  # $7
    outbox_kinds: list[str]  # $8 .. $10: the outbox rows
    outbox_topics: list[str]
    outbox_payloads: list[dict[str, Any]]
    trace_context: dict[str, str] | None  # $11: the request's, for the delivery span


async def change_status(
    conn: asyncpg.Connection,
    order_id: UUID,
    *,
    status: str,
    event_type: str,
    actor: str,
    event_data: dict[str, Any],
    release_stock: bool,
    outbox: list[tuple[str, str, dict[str, Any]]],
) -> asyncpg.Record:
    # In field order; the keyword parameters above carry the names.
    params = ChangeParams(
        order_id,
        status,
        event_type,
        actor,
        event_data,
        release_stock,
        FAST_PATH_HEAD_START_S,
        *_columns(outbox, 3),
        tracing.carrier(),
    )
    row = await conn.fetchrow(CHANGE_SQL, *params)
    assert row is not None
    return row


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

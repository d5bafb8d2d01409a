"""Payment events of the provider (migration 0005) and the queries of order expiry.
Their timeline events go through orders.db.orders.add_event."""

from __future__ import annotations

from uuid import UUID

import asyncpg

from orders.db.orders import ITEMS_SUBQUERY, ORDER_COLUMNS

EVENT_COLUMNS = "id, seq, order_id, type, amount, currency, outcome, received_at"


async def claim(
    conn: asyncpg.Connection, *, event_id: str, order_id: UUID, type: str, amount: int, currency: str
) -> bool:
    """Record the event id (outcome `ignored` until the caller decides); False when the id
    was recorded before. A concurrent insert of the same id waits here for the other
    transaction, then inserts nothing once it commits."""
    seq = await conn.fetchval(
        """
        INSERT INTO payment_events (id, order_id, type, amount, currency, outcome)
        VALUES ($1, $2, $3, $4, $5, 'ignored')
        ON CONFLICT (id) DO NOTHING
        RETURNING seq
        """,
        event_id,
        order_id,
        type,
        amount,
        currency,
    )
    return seq is not None


async def set_outcome(conn: asyncpg.Connection, event_id: str, outcome: str) -> None:
    await conn.execute("UPDATE payment_events SET outcome = $2 WHERE id = $1", event_id, outcome)


async def page(
    conn: asyncpg.Connection, *, outcome: str | None, before_seq: int | None, limit: int
) -> list[asyncpg.Record]:
    """Newest first, keyset on seq."""
    return await conn.fetch(
        f"""
        SELECT {EVENT_COLUMNS} FROM payment_events
         WHERE ($1::text IS NULL OR outcome = $1) AND ($2::bigint IS NULL OR seq < $2)
         ORDER BY seq DESC
         LIMIT $3
        """,
        outcome,
        before_seq,
        limit,
    )


async def overdue(conn: asyncpg.Connection, *, timeout_s: float, limit: int) -> list[UUID]:
    """Pending orders past their payment deadline, oldest first (no lock: each is taken
    in its own transaction by lock_overdue)."""
    rows = await conn.fetch(
        """
        SELECT id FROM orders
         WHERE status = 'pending' AND created_at < now() - make_interval(secs => $1)
         ORDER BY created_at, id
         LIMIT $2
        """,
        timeout_s,
        limit,
    )
    return [r["id"] for r in rows]


async def lock_overdue(conn: asyncpg.Connection, order_id: UUID, *, timeout_s: float) -> asyncpg.Record | None:
    """The order, locked, if it is still pending past its deadline; None when another
    replica holds it (SKIP LOCKED) or it has left pending meanwhile (paid, cancelled,
    expired by another replica: FOR UPDATE re-checks the WHERE on the latest version)."""
    return await conn.fetchrow(
        f"""
        SELECT {ORDER_COLUMNS}, {ITEMS_SUBQUERY} FROM orders o
         WHERE o.id = $1 AND o.status = 'pending' AND o.created_at < now() - make_interval(secs => $2)
           FOR UPDATE OF o SKIP LOCKED
        """,
        order_id,
        timeout_s,
    )

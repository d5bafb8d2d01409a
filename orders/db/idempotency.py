"""Idempotency records: the first answer to a (customer, key), kept for replay.

A transaction-scoped advisory lock on (customer, key) serialises requests with one key:
whoever does not get it answers 409 `idempotency-in-progress` at once. orders_place()
(migration 0007, called by orders.PLACE_SQL) takes it, reads the record and writes it.
The primary key of idempotency_keys stays the final arbiter (a race past the lock fails
on insert).
"""

from __future__ import annotations

import asyncpg


async def lookup(conn: asyncpg.Connection, customer_id: str, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT request_hash, status_code, response_body FROM idempotency_keys WHERE customer_id = $1 AND key = $2",
        customer_id,
        key,
    )


async def purge(conn: asyncpg.Connection, older_than_hours: int, batch: int) -> int:
    """Deletes up to `batch` records older than the retention, oldest first
    (idempotency_keys_created_idx); rows another replica is deleting are skipped."""
    result = await conn.execute(
        """
        DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM idempotency_keys
             WHERE created_at < now() - make_interval(hours => $1)
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED))
        """,
        older_than_hours,
        batch,
    )
    return int(result.split()[-1])

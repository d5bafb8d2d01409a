"""Idempotency records: the first answer to a (customer, key), kept for replay.

A transaction-scoped advisory lock on (customer, key) serialises requests with one key:
whoever does not get it answers 409 `idempotency-in-progress` at once. The primary key
of idempotency_keys stays the final arbiter (a race past the lock fails on insert).
"""

from __future__ import annotations

import asyncpg

# One round trip: the lock, the existing record, and whether the requested SKUs
# span several currencies (a validation error that must win over the key's outcome).
CLAIM_SQL = """
SELECT pg_try_advisory_xact_lock(hashtext($1), hashtext($2)) AS locked,
       k.request_hash, k.status_code, k.response_body,
       (SELECT count(DISTINCT currency) FROM products WHERE sku = ANY($3::text[])) AS currencies
  FROM (SELECT 1) AS one
  LEFT JOIN idempotency_keys k ON k.customer_id = $1 AND k.key = $2
"""


async def claim(conn: asyncpg.Connection, customer_id: str, key: str, skus: list[str]) -> asyncpg.Record:
    row = await conn.fetchrow(CLAIM_SQL, customer_id, key, skus)
    assert row is not None
    return row


async def lookup(conn: asyncpg.Connection, customer_id: str, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT request_hash, status_code, response_body FROM idempotency_keys WHERE customer_id = $1 AND key = $2",
        customer_id,
        key,
    )


async def purge(conn: asyncpg.Connection, older_than_hours: int, batch: int) -> int:
    result = await conn.execute(
        """
        DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM idempotency_keys
             WHERE created_at < now() - make_interval(hours => $1) LIMIT $2))
        """,
        older_than_hours,
        batch,
    )
    return int(result.split()[-1])

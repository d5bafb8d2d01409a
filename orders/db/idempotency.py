"""Idempotency records: the first answer to a (customer, key), kept for replay.

A transaction-scoped advisory lock on (customer, key) serialises requests with one key:
whoever does not get it answers 409 `idempotency-in-progress` at once. The primary key
of idempotency_keys stays the final arbiter (a race past the lock fails on insert).
"""

from __future__ import annotations

import asyncpg

# One round trip: the lock, the existing record, and a snapshot of the requested SKUs
# (read without locking them): how many currencies they span (a validation error that
# must win over the key's outcome), and their currency, names, prices and stock, by SKU;
# and the customer's count of pending orders. The order is priced from this snapshot;
# orders.PLACE_SQL then locks the rows and reserves only if the count, stock and terms
# still allow it on their latest versions.
CLAIM_SQL = """
SELECT pg_try_advisory_xact_lock(hashtext($1), hashtext($2)) AS locked,
       k.request_hash, k.status_code, k.response_body,
       c.currencies, c.currency, c.skus, c.names, c.unit_prices, c.stocks, now() AS now,
       (SELECT cp.pending FROM customer_pending cp WHERE cp.customer_id = $1) AS pending
  FROM (SELECT 1) AS one
  LEFT JOIN idempotency_keys k ON k.customer_id = $1 AND k.key = $2
 CROSS JOIN (SELECT count(DISTINCT p.currency) AS currencies, min(p.currency::text) AS currency,
                    array_agg(p.sku ORDER BY p.sku) AS skus, array_agg(p.name ORDER BY p.sku) AS names,
                    array_agg(p.unit_price ORDER BY p.sku) AS unit_prices,
                    array_agg(p.stock ORDER BY p.sku) AS stocks
               FROM products p WHERE p.sku = ANY($3::text[])) AS c
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

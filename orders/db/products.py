"""Catalog queries. Stock only changes through conditional updates: never below zero."""

from __future__ import annotations

from typing import Any

import asyncpg

PRODUCT_COLUMNS = "sku, name, unit_price, currency::text AS currency, stock, version"


async def get(conn: asyncpg.Connection, sku: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {PRODUCT_COLUMNS} FROM products WHERE sku = $1", sku)


async def page(conn: asyncpg.Connection, after: str | None, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {PRODUCT_COLUMNS} FROM products WHERE ($1::text IS NULL OR sku > $1) ORDER BY sku LIMIT $2",
        after,
        limit,
    )


async def upsert(conn: asyncpg.Connection, sku: str, p: dict[str, Any]) -> asyncpg.Record:
    """Create or replace; `inserted` tells which. Every replacement bumps `version`."""
    row = await conn.fetchrow(
        f"""
        INSERT INTO products AS p (sku, name, unit_price, currency, stock)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (sku) DO UPDATE
           SET name = EXCLUDED.name, unit_price = EXCLUDED.unit_price,
               currency = EXCLUDED.currency, stock = EXCLUDED.stock,
               version = p.version + 1, updated_at = now()
        RETURNING {PRODUCT_COLUMNS}, (xmax = 0) AS inserted
        """,
        sku,
        p["name"],
        p["unit_price"],
        p["currency"],
        p["stock"],
    )
    assert row is not None
    return row


# Reserve every line at once, first of the order's writes. `locked` takes the row locks
# (FOR NO KEY UPDATE, the lock the UPDATE itself takes) in SKU order before any line is
# updated, whatever plan the UPDATE gets (with a hash join or a seq scan the UPDATE alone
# locks rows in physical order, and orders for the same hot SKUs deadlock: seen in the
# bench with 2 SKUs). A line is reserved only when its stock suffices, checked on the
# latest row version; the caller rolls back unless every line was. Reserving last
# instead (to hold the locks for less time) is slower on a hot SKU: the foreign-key
# checks of order_items would then share-lock rows that other orders are updating,
# and PostgreSQL's multixacts on those rows cost 30 ms of CPU per order (PERFORMANCE.md).
RESERVE_SQL = """
WITH req AS (
    SELECT * FROM unnest($1::text[], $2::int[]) AS r(sku, qty)
), locked AS MATERIALIZED (
    SELECT p.sku FROM products p WHERE p.sku = ANY($1::text[]) ORDER BY p.sku FOR NO KEY UPDATE
), upd AS (
    UPDATE products p
       SET stock = p.stock - req.qty, version = p.version + 1, updated_at = now()
      FROM req JOIN locked USING (sku)
     WHERE p.sku = req.sku AND p.stock >= req.qty
 RETURNING p.sku, p.name, p.unit_price, p.currency::text AS currency, p.version
)
SELECT req.sku, upd.name, upd.unit_price, upd.currency, upd.version,
       upd.sku IS NOT NULL AS reserved,
       EXISTS (SELECT 1 FROM products k WHERE k.sku = req.sku) AS known,
       now() AS now
  FROM req LEFT JOIN upd ON upd.sku = req.sku
"""


async def reserve(conn: asyncpg.Connection, skus: list[str], quantities: list[int]) -> list[asyncpg.Record]:
    return await conn.fetch(RESERVE_SQL, skus, quantities)

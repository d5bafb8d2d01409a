"""Catalog queries. Stock only changes through conditional updates: never below zero."""

from __future__ import annotations

from typing import Any

import asyncpg

PRODUCT_COLUMNS = "sku, name, unit_price, currency::text AS currency, stock, version"


async def get(conn: asyncpg.Connection, sku: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {PRODUCT_COLUMNS} FROM products WHERE sku = $1", sku)


async def terms(conn: asyncpg.Connection, skus: list[str]) -> list[tuple[str, str, int, str]]:
    """(sku, name, unit_price, currency) of the SKUs that exist: what an order is priced from."""
    rows = await conn.fetch(
        "SELECT sku, name, unit_price, currency::text FROM products WHERE sku = ANY($1::text[])", skus
    )
    return [(r[0], r[1], r[2], r[3]) for r in rows]


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

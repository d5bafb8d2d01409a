"""Cache invalidations that could not reach Redis, kept until they can (see cache.py)."""

from __future__ import annotations

import asyncpg


async def record(conn: asyncpg.Connection, entries: list[tuple[str, int]]) -> None:
    await conn.execute(
        """
        INSERT INTO cache_invalidations AS c (key, version)
        SELECT * FROM unnest($1::text[], $2::bigint[])
        ON CONFLICT (key) DO UPDATE SET version = greatest(c.version, EXCLUDED.version)
        """,
        [k for k, _ in entries],
        [v for _, v in entries],
    )


async def pending(conn: asyncpg.Connection, limit: int) -> list[tuple[str, int]]:
    rows = await conn.fetch("SELECT key, version FROM cache_invalidations ORDER BY created_at LIMIT $1", limit)
    return [(r["key"], r["version"]) for r in rows]


async def forget(conn: asyncpg.Connection, entries: list[tuple[str, int]]) -> None:
    """Drop the records now applied (not one that a newer version replaced meanwhile)."""
    await conn.execute(
        """
        DELETE FROM cache_invalidations c
         USING unnest($1::text[], $2::bigint[]) AS d(key, version)
         WHERE c.key = d.key AND c.version <= d.version
        """,
        [k for k, _ in entries],
        [v for _, v in entries],
    )

"""A small SQL migration runner: files `migrations/NNNN_name.sql`, applied in order,
each in its own transaction, under a PostgreSQL advisory lock so that many replicas
starting at once apply each file exactly once."""

from __future__ import annotations

from importlib import resources

import asyncpg
import structlog

log = structlog.get_logger("orders.migrate")

# pg_advisory_lock(bigint) key: "orders" in ASCII, nothing else uses it.
MIGRATION_LOCK_KEY = 0x6F7264657273


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("orders.db").joinpath("migrations")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), folder.joinpath(name).read_text()) for name in names]


async def migrate(dsn: str, *, lock_timeout_s: float = 120.0) -> list[str]:
    """Apply the pending migrations; returns the names applied by this call."""
    conn = await asyncpg.connect(dsn, timeout=10)
    applied: list[str] = []
    try:
        await conn.execute(f"SET lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for name, sql in migration_files():
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                applied.append(name)
                log.info("migration_applied", migration=name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()
    return applied

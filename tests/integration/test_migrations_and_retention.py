"""Migrations under an advisory lock; retention of sent rows and idempotency keys."""

from __future__ import annotations

import asyncio

import asyncpg

from orders.db.migrate import migrate, migration_files
from tests.conftest import make_product, place, wait_for


async def test_many_replicas_migrating_at_once_apply_each_file_once(isolated_db):
    results = await asyncio.gather(*(migrate(isolated_db) for _ in range(6)))
    applied = [name for names in results for name in names]
    assert sorted(applied) == sorted(name for name, _ in migration_files())
    conn = await asyncpg.connect(isolated_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(migration_files())
    finally:
        await conn.close()
    assert await migrate(isolated_db) == []  # idempotent


async def test_relay_purges_old_sent_rows_and_idempotency_keys(client, db):
    sku = await make_product(client)
    r = await place(client, "cust-retention", (sku, 1))
    oid = r.json()["id"]

    async def all_sent() -> bool:
        async with db.acquire() as conn:
            return await conn.fetchval("SELECT bool_and(status = 'sent') FROM outbox WHERE order_id = $1", oid)

    await wait_for(all_sent)
    async with db.acquire() as conn:
        await conn.execute("UPDATE outbox SET sent_at = now() - interval '400 hours' WHERE order_id = $1", oid)
        await conn.execute("UPDATE idempotency_keys SET created_at = now() - interval '100 hours' WHERE order_id = $1", oid)
    await client.app.state.res.relay.run_once(housekeeping=True)
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE order_id = $1", oid) == 0
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys WHERE order_id = $1", oid) == 0
        # The order, its timeline and its audit entries stay.
        assert await conn.fetchval("SELECT count(*) FROM orders WHERE id = $1", oid) == 1
        assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE order_id = $1", oid) == 1

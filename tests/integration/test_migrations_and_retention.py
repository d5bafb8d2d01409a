"""Migrations under an advisory lock; retention of sent rows and idempotency keys."""

from __future__ import annotations

import asyncio

import asyncpg

from orders.db.migrate import migrate, migration_files
from tests.conftest import make_product, place, running_app, wait_for


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


async def test_one_retention_pass_purges_50000_expired_rows_of_each_kind(make_settings, isolated_db, isolated_pool):
    """One purge pass (what the housekeeping task runs every 30 s per replica) deletes all
    that is due however much it is: 50,000 expired sent outbox rows and 50,000 expired
    idempotency records, plus a real order's own. It used to delete 500 of each. What is
    not due stays: recent records, recently sent rows, and pending and failed rows of any
    age. The order itself, its timeline and its audit entries are never purged."""
    async with running_app(make_settings(database_url=isolated_db)) as c:
        sku = await make_product(c)
        r = await place(c, "cust-retention", (sku, 1))
        oid = r.json()["id"]

        async def all_sent() -> bool:
            async with isolated_pool.acquire() as conn:
                return await conn.fetchval(
                    "SELECT count(*) = 2 AND bool_and(status = 'sent') FROM outbox WHERE order_id = $1", oid)

        await wait_for(all_sent)
        async with isolated_pool.acquire() as conn:
            await conn.execute("UPDATE outbox SET sent_at = now() - interval '400 hours' WHERE order_id = $1", oid)
            await conn.execute("UPDATE idempotency_keys SET created_at = now() - interval '100 hours' WHERE order_id = $1", oid)
            # Expired (retention 168 h and 48 h by default), then what must stay.
            await conn.execute(
                """
                INSERT INTO outbox (order_id, kind, topic, payload, status, next_attempt_at, created_at, sent_at)
                SELECT $1, 'audit', 'order.created', '{}', s.status, s.at, s.at, CASE WHEN s.status = 'sent' THEN s.at END
                  FROM (SELECT 'sent' AS status, now() - interval '200 hours' AS at FROM generate_series(1, 50000)
                        UNION ALL SELECT 'sent', now() - interval '100 hours' FROM generate_series(1, 100)
                        UNION ALL SELECT 'pending', now() - interval '400 hours' FROM generate_series(1, 100)
                        UNION ALL SELECT 'failed', now() - interval '400 hours' FROM generate_series(1, 100)) AS s
                """,
                oid,
            )
            await conn.execute(
                """
                INSERT INTO idempotency_keys (customer_id, key, request_hash, status_code, response_body, created_at)
                SELECT 'cust-purge', 'key-' || i, '\\x00', 201, '\\x00',
                       now() - CASE WHEN i <= 50000 THEN interval '49 hours' ELSE interval '47 hours' END
                  FROM generate_series(1, 50100) AS i
                """
            )

        await c.app.state.res.relay.purge_expired()

        async with isolated_pool.acquire() as conn:
            outbox = dict(await conn.fetch("SELECT status, count(*) FROM outbox GROUP BY status"))
            assert outbox == {"sent": 100, "pending": 100, "failed": 100}
            assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 100
            assert await conn.fetchval("SELECT min(key) FROM idempotency_keys") == "key-50001"
            # The order, its timeline and its audit entries stay.
            assert await conn.fetchval("SELECT count(*) FROM orders WHERE id = $1", oid) == 1
            assert await conn.fetchval("SELECT count(*) FROM order_events WHERE order_id = $1", oid) >= 1
            assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE order_id = $1", oid) == 1

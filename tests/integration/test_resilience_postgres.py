"""PostgreSQL down, restarting, or dying mid-transaction: 503 `unavailable` with
Retry-After in bounded time (never a hang, never a 500), and recovery without a restart.

The outage tests run against a PRIVATE PostgreSQL (orders.dev.postgres.EmbeddedPostgres in
a tmp dir) so that stopping it disturbs nobody else.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from orders.db import orders as order_queries
from orders.db import outbox as outbox_queries
from orders.db import products as product_queries
from orders.dev.postgres import EmbeddedPostgres
from orders.dev.process import free_port
from tests.conftest import ADMIN, auth, make_product, new_key, order_body, place, running_app, wait_for

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def private_pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path, port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop("immediate")


async def checkpoint(pg: EmbeddedPostgres) -> None:
    """Before `pg_ctl stop -m immediate`: the embedded cluster runs with
    synchronous_commit=off (dev data), which would lose the last commits in a crash; a
    production server (synchronous_commit=on) loses no committed transaction."""
    conn = await asyncpg.connect(pg.dsn, timeout=10)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def _settings(make_settings: Any, dsn: str, **overrides: Any) -> Any:
    return make_settings(
        database_url=dsn,
        cache_prefix=f"pgres-{secrets.token_hex(4)}:",
        db_pool_min=2,
        db_pool_max=5,
        **overrides,
    )


def assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    assert int(r.headers["retry-after"]) >= 1
    body = r.json()
    assert body["type"].endswith("/unavailable") and body["status"] == 503
    assert "asyncpg" not in r.text and "Traceback" not in r.text and "postgres@" not in r.text


async def test_postgres_down_answers_503_and_recovers_without_a_restart(make_settings, private_pg):
    settings = _settings(make_settings, private_pg.dsn)
    async with running_app(settings) as client:
        sku = await make_product(client, stock=100)
        customer = "cust-pg-down"
        first = await place(client, customer, (sku, 1))
        assert first.status_code == 201, first.text
        port = private_pg.port

        await checkpoint(private_pg)
        private_pg.stop("immediate")  # pg_ctl stop -m immediate
        start = time.monotonic()
        down = await place(client, customer, (sku, 1))
        assert time.monotonic() - start < 10
        assert_unavailable(down)
        # Every kind of request answers in bounded time: reads, lists, writes, staff.
        for r in await asyncio.gather(
            client.get("/v1/orders", headers=auth(customer)),
            client.get("/v1/products"),
            client.get(f"/v1/orders/{first.json()['id']}/events", headers=auth(customer)),
            client.post(f"/v1/orders/{first.json()['id']}/cancel", headers=auth(customer)),
            client.put(
                f"/v1/products/{sku}", headers=ADMIN, json={"name": "M", "unit_price": 1, "currency": "USD", "stock": 1}
            ),
        ):
            assert_unavailable(r)
        assert time.monotonic() - start < 10
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["content-type"] == "application/problem+json"
        assert ready.json()["postgres"] == "down" and "retry-after" in ready.headers
        assert (await client.get("/healthz")).status_code == 200

        private_pg.start()
        assert private_pg.port == port
        statuses: list[int] = []
        key = new_key()  # the client's retry of one order, behind its Idempotency-Key

        async def order_goes_through() -> bool:
            r = await place(client, customer, (sku, 1), key=key)
            statuses.append(r.status_code)
            if r.status_code == 503:
                assert_unavailable(r)
            return r.status_code == 201

        await wait_for(order_goes_through, timeout=30, interval=0.5)
        assert set(statuses) <= {201, 503}, statuses
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["postgres"] == "ok"
        # Exactly one order was created by the retries, and the service works on.
        again = await place(client, customer, (sku, 1), key=key)
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
        listed = (await client.get("/v1/orders", headers=auth(customer))).json()["items"]
        assert len(listed) == 2
        assert (await client.get(f"/v1/products/{sku}")).json()["stock"] == 98


async def test_after_a_restart_stale_pooled_connections_are_never_handed_out(make_settings, private_pg):
    """Restart PostgreSQL under a warm pool: every read afterwards answers 200 (a read
    that still meets a dead connection is retried once on a fresh one)."""
    settings = _settings(make_settings, private_pg.dsn, redis_url=None)
    async with running_app(settings) as client:
        sku = await make_product(client, stock=100)
        customer = "cust-pg-restart"
        order = (await place(client, customer, (sku, 1))).json()
        # Warm every pooled connection.
        await asyncio.gather(*(client.get(f"/v1/products/{sku}") for _ in range(10)))

        await checkpoint(private_pg)
        # Stopped and started while this event loop is blocked (a busy process): the
        # pool has not seen its connections close, and may hand them out.
        private_pg.stop("immediate")
        private_pg.start()
        results = await asyncio.gather(
            *(client.get(f"/v1/products/{sku}") for _ in range(5)),
            *(client.get(f"/v1/orders/{order['id']}", headers=auth(customer)) for _ in range(5)),
            *(client.get("/v1/orders", headers=auth(customer)) for _ in range(5)),
            client.get("/v1/products"),
        )
        assert [r.status_code for r in results] == [200] * len(results), [r.text for r in results]
        assert (await client.get("/readyz")).status_code == 200
        r = await place(client, customer, (sku, 1))
        assert r.status_code == 201, r.text


async def _kill_backend_of(conn: asyncpg.Connection, admin_dsn: str) -> None:
    pid = conn.get_server_pid()
    other = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        assert await other.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await other.close()
    await asyncio.sleep(0.2)  # let the FATAL and the close arrive


async def _blocked_by(holder: asyncpg.Connection, watcher: asyncpg.Connection, call: str) -> int | None:
    """The backend waiting for a lock of `holder` in a statement that makes `call` (seen
    by `watcher`); never another session's backend: the server is shared."""
    return await watcher.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND strpos(query, $2) > 0"
        " AND $1 = ANY(pg_blocking_pids(pid))",
        holder.get_server_pid(),
        call,
    )


async def test_connection_dying_during_the_placement_is_503_and_commits_nothing(make_settings, database_url, db):
    """The server ends the connection while orders_place() runs (waiting for a product row
    another transaction holds): 503 (not 500), nothing written, and a retry behind the
    same key creates the order once."""
    async with running_app(make_settings(cache_prefix=f"pgres-{secrets.token_hex(4)}:")) as client:
        sku = await make_product(client, stock=10)
        customer = f"cust-pg-place-{secrets.token_hex(3)}"
        key = new_key()
        async with db.acquire() as holder, db.acquire() as watcher:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT 1 FROM products WHERE sku = $1 FOR UPDATE", sku)
            order = asyncio.create_task(place(client, customer, (sku, 2), key=key))

            pid = await wait_for(lambda: _blocked_by(holder, watcher, "orders_place("))
            assert await watcher.fetchval("SELECT pg_terminate_backend($1)", pid)
            await tx.rollback()
            r = await asyncio.wait_for(order, 10)
        assert_unavailable(r)
        assert (await client.get(f"/v1/products/{sku}")).json()["stock"] == 10
        assert (await client.get("/v1/orders", headers=auth(customer))).json()["items"] == []
        r = await place(client, customer, (sku, 2), key=key)
        assert r.status_code == 201 and "idempotent-replayed" not in r.headers
        assert (await client.get(f"/v1/products/{sku}")).json()["stock"] == 8


async def test_connection_dying_before_rollback_is_503(make_settings, database_url, monkeypatch):
    """A business error raised in a transaction whose connection died: the ROLLBACK
    fails too; that is a 503, never a 500. (Staff re-queueing a notification that does
    not exist: a 404 raised inside the transaction.)"""
    async with running_app(make_settings(cache_prefix=f"pgres-{secrets.token_hex(4)}:")) as client:
        real_get = outbox_queries.get

        async def get_then_die(conn: Any, *a: Any) -> Any:
            row = await real_get(conn, *a)
            await _kill_backend_of(conn, database_url)
            return row  # None: the service raises 404 and rolls back

        monkeypatch.setattr(outbox_queries, "get", get_then_die)
        r = await client.post("/v1/admin/notifications/999999999/retry", headers=ADMIN)
        assert_unavailable(r)
        monkeypatch.setattr(outbox_queries, "get", real_get)
        r = await client.post("/v1/admin/notifications/999999999/retry", headers=ADMIN)
        assert r.status_code == 404


async def test_connection_dying_in_a_status_change_is_503_and_writes_nothing(make_settings, database_url, db):
    """The server ends the connection while orders_change() runs (waiting for the order's
    row, which another transaction holds): 503 (not 500), nothing written, and the cancel
    sent again releases the stock once."""
    async with running_app(make_settings(cache_prefix=f"pgres-{secrets.token_hex(4)}:")) as client:
        sku = await make_product(client, stock=3)
        customer = f"cust-pg-change-{secrets.token_hex(3)}"
        order = (await place(client, customer, (sku, 1))).json()
        async with db.acquire() as holder, db.acquire() as watcher:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", order["id"])
            cancel = asyncio.create_task(client.post(f"/v1/orders/{order['id']}/cancel", headers=auth(customer)))

            pid = await wait_for(lambda: _blocked_by(holder, watcher, "orders_change("))
            assert await watcher.fetchval("SELECT pg_terminate_backend($1)", pid)
            await tx.rollback()
            r = await asyncio.wait_for(cancel, 10)
        assert_unavailable(r)
        got = await client.get(f"/v1/orders/{order['id']}", headers=auth(customer))
        assert got.json()["status"] == "pending" and got.json()["version"] == 1
        assert (await client.get(f"/v1/products/{sku}")).json()["stock"] == 2
        r = await client.post(f"/v1/orders/{order['id']}/cancel", headers=auth(customer))
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert (await client.get(f"/v1/products/{sku}")).json()["stock"] == 3


async def test_a_read_whose_connection_dies_is_retried_once(make_settings, database_url, monkeypatch):
    async with running_app(make_settings(cache_prefix=f"pgres-{secrets.token_hex(4)}:", redis_url=None)) as client:
        sku = await make_product(client, stock=3)
        real_get = product_queries.get
        calls = 0

        async def die_once(conn: Any, s: str) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                await _kill_backend_of(conn, database_url)
            return await real_get(conn, s)

        monkeypatch.setattr(product_queries, "get", die_once)
        r = await client.get(f"/v1/products/{sku}")
        assert r.status_code == 200 and r.json()["sku"] == sku
        assert calls == 2

        async def always_dies(conn: Any, s: str) -> Any:
            nonlocal calls
            calls += 1
            await _kill_backend_of(conn, database_url)
            return await real_get(conn, s)

        calls = 0
        monkeypatch.setattr(product_queries, "get", always_dies)
        assert_unavailable(await client.get(f"/v1/products/{sku}"))
        assert calls == 2  # once, and once more: no more


async def test_writes_are_not_retried(make_settings, database_url, monkeypatch):
    async with running_app(make_settings(cache_prefix=f"pgres-{secrets.token_hex(4)}:")) as client:
        sku = await make_product(client, stock=3)
        real_place = order_queries.place
        calls = 0

        async def die(conn: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            await _kill_backend_of(conn, database_url)
            return await real_place(conn, **kw)

        monkeypatch.setattr(order_queries, "place", die)
        r = await client.post(
            "/v1/orders", headers={**auth("cust-pg-noretry"), "Idempotency-Key": new_key()}, json=order_body((sku, 1))
        )
        assert_unavailable(r)
        assert calls == 1


async def test_pool_exhausted_answers_503_within_the_acquire_timeout(make_settings):
    """No pooled connection in time: 503 after ORDERS_DB_ACQUIRE_TIMEOUT_S, never a hang."""
    settings = make_settings(
        cache_prefix=f"pgres-{secrets.token_hex(4)}:",
        redis_url=None,
        db_pool_min=1,
        db_pool_max=1,
        db_acquire_timeout_s=0.5,
    )
    async with running_app(settings) as client:
        sku = await make_product(client, stock=3)
        pool = client.app.state.res.pool
        held = await pool.acquire()
        try:
            start = time.monotonic()
            r = await client.get(f"/v1/products/{sku}")
            assert_unavailable(r)
            assert time.monotonic() - start < 3
        finally:
            await pool.release(held)
        assert (await client.get(f"/v1/products/{sku}")).status_code == 200

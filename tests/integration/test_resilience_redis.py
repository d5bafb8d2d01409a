"""Redis trouble never fails or stalls a request, and never leaves stale entries behind.

Fault tests run against a PRIVATE Redis (orders.dev.redis.EmbeddedRedis in a tmp dir)
so that pausing or killing it disturbs nobody else, and a database of their own: the
invalidations recorded during the outage must be replayed into THEIR Redis, not consumed
by the relay of the session's app (which shares a Redis with its replicas, as in
production). The race and CAS tests use the session's Redis with a key prefix of their own.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from orders.cache import Cache, CircuitBreaker, order_key, product_key
from orders.db import orders as order_queries
from orders.db import products as product_queries
from tests.conftest import auth, make_product, place, running_app, wait_for

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 0.25  # ORDERS_REDIS_TIMEOUT_S (the default)


async def _redis_ok(client) -> bool:
    """Readiness reports Redis up again."""
    r = await client.get("/readyz")
    return r.status_code == 200 and r.json()["redis"] == "ok"


def _prefix() -> str:
    return f"res-{secrets.token_hex(4)}:"


async def _raw(url: str, key: str) -> bytes | None:
    """The raw entry, read with a client of our own (only while the server answers)."""
    r = aioredis.Redis.from_url(url, socket_timeout=2)
    try:
        value: bytes | None = await r.get(key)
        return value
    finally:
        await r.aclose()


def _version(raw: bytes | None) -> tuple[int, bool] | None:
    """(version, is_data) of a raw entry, None when there is none."""
    if raw is None:
        return None
    version, _, payload = raw.partition(b"|")
    return int(version), bool(payload)


async def _timed(coro: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = await coro
    return result, time.monotonic() - start


# ------------------------------------------------------------------ Redis paused (hung)


async def test_paused_redis_fails_open_and_nothing_stale_survives_its_return(make_settings, private_redis, isolated_db):
    prefix = _prefix()
    settings = make_settings(redis_url=private_redis.url, cache_prefix=prefix, database_url=isolated_db)
    async with running_app(settings) as client:
        sku = await make_product(client, stock=100)
        customer = "cust-redis-paused"
        first = (await place(client, customer, (sku, 1))).json()
        got = await client.get(f"/v1/orders/{first['id']}", headers=auth(customer))
        assert got.status_code == 200 and got.json()["status"] == "pending"
        assert (await client.get(f"/v1/products/{sku}")).json()["stock"] == 99
        a_key, p_key = order_key(prefix, first["id"]), product_key(prefix, sku)
        assert _version(await _raw(private_redis.url, a_key)) == (1, True)  # cached
        assert _version(await _raw(private_redis.url, p_key)) is not None

        private_redis.pause()  # SIGSTOP: connections accepted, nothing answered
        try:
            start = time.monotonic()
            second, t_place = await _timed(place(client, customer, (sku, 2)))
            assert second.status_code == 201, second.text
            cancel, t_cancel = await _timed(client.post(f"/v1/orders/{first['id']}/cancel", headers=auth(customer)))
            assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"
            a, t_a = await _timed(client.get(f"/v1/orders/{first['id']}", headers=auth(customer)))
            assert a.status_code == 200 and a.json()["status"] == "cancelled" and a.json()["version"] == 2
            b, t_b = await _timed(client.get(f"/v1/orders/{second.json()['id']}", headers=auth(customer)))
            assert b.status_code == 200 and b.json()["status"] == "pending"
            product = await client.get(f"/v1/products/{sku}")
            assert product.status_code == 200 and product.json()["stock"] == 100 - 2
            ready, t_ready = await _timed(client.get("/readyz"))
            assert ready.status_code == 200, ready.text
            assert ready.json() == {"status": "ready", "postgres": "ok", "redis": "down"}
            # Each request pays at most about one Redis timeout, and the whole sequence
            # only a few of them (a functional bound on fail-open, not a benchmark).
            for elapsed in (t_place, t_cancel, t_a, t_b, t_ready):
                assert elapsed < TIMEOUT_S + 2.0, (t_place, t_cancel, t_a, t_b, t_ready)
            assert time.monotonic() - start < 5.0

            # The breaker is open: thirty more reads do not pay the timeout each; Redis
            # is only probed about once per cool-down.
            failures = _count_breaker_failures(client)
            burst_start = time.monotonic()
            await asyncio.gather(*(client.get(f"/v1/orders/{first['id']}", headers=auth(customer)) for _ in range(20)))
            for _ in range(10):
                r = await client.get(f"/v1/products/{sku}")
                assert r.status_code == 200 and r.json()["stock"] == 98
            burst = time.monotonic() - burst_start
            cooldown = client.app.state.res.cache.breaker.cooldown_s
            assert failures["n"] <= 2 + burst / cooldown, (failures, burst)
        finally:
            private_redis.resume()

        # Back: within a few seconds the pre-cancel entry is gone from Redis itself
        # (replaced by a tombstone or by version 2), and reads say cancelled.
        async def fresh() -> bool:
            r = await client.get(f"/v1/orders/{first['id']}", headers=auth(customer))
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            entry = _version(await _raw(private_redis.url, a_key))
            product_entry = _version(await _raw(private_redis.url, p_key))
            return (entry is None or entry[0] >= 2) and (product_entry is None or product_entry[0] >= 3)

        await wait_for(fresh, timeout=6.0, interval=0.2)

        await wait_for(lambda: _redis_ok(client), timeout=6.0, interval=0.2)
        # And the cache is used again: a read fills version 2.
        await wait_for(
            lambda: _entry_is(client, private_redis.url, a_key, f"/v1/orders/{first['id']}", customer, (2, True)),
            timeout=6.0,
            interval=0.2,
        )
        product = (await client.get(f"/v1/products/{sku}")).json()
        assert product["stock"] == 98


def _count_breaker_failures(client: Any) -> dict[str, int]:
    """Counts the Redis calls that fail (each one paid the timeout) from now on."""
    breaker = client.app.state.res.cache.breaker
    counter = {"n": 0}
    real = breaker.failure

    def counting() -> None:
        counter["n"] += 1
        real()

    breaker.failure = counting
    return counter


async def _entry_is(client: Any, url: str, key: str, path: str, customer: str, expected: tuple[int, bool]) -> bool:
    await client.get(path, headers=auth(customer))
    return _version(await _raw(url, key)) == expected


async def test_slow_redis_costs_at_most_one_timeout(make_settings, private_redis, isolated_db):
    """A Redis that answers late (CLIENT PAUSE: every command waits) is treated like a
    down one: requests go on without it; it is used again once it answers."""
    prefix = _prefix()
    settings = make_settings(redis_url=private_redis.url, cache_prefix=prefix, database_url=isolated_db)
    async with running_app(settings) as client:
        sku = await make_product(client, stock=10)
        customer = "cust-redis-slow"
        order = (await place(client, customer, (sku, 1))).json()
        admin = aioredis.Redis.from_url(private_redis.url)
        try:
            await admin.execute_command("CLIENT", "PAUSE", "2500", "ALL")
            failures = _count_breaker_failures(client)
            start = time.monotonic()
            for _ in range(8):
                r = await client.get(f"/v1/orders/{order['id']}", headers=auth(customer))
                assert r.status_code == 200 and r.json()["id"] == order["id"]
            cancel = await client.post(f"/v1/orders/{order['id']}/cancel", headers=auth(customer))
            assert cancel.status_code == 200
            elapsed = time.monotonic() - start
            assert elapsed < 3.0
            assert failures["n"] <= 2 + elapsed / client.app.state.res.cache.breaker.cooldown_s
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
            await admin.aclose()

        async def cancelled_and_cached() -> bool:
            r = await client.get(f"/v1/orders/{order['id']}", headers=auth(customer))
            assert r.json()["status"] == "cancelled"
            return _version(await _raw(private_redis.url, order_key(prefix, order["id"]))) == (2, True)

        await wait_for(cancelled_and_cached, timeout=6.0, interval=0.2)


# --------------------------------------------------------------- Redis killed, restarted


async def test_killed_redis_fails_open_and_is_used_again_after_restart(make_settings, private_redis, isolated_db):
    prefix = _prefix()
    settings = make_settings(redis_url=private_redis.url, cache_prefix=prefix, database_url=isolated_db)
    async with running_app(settings) as client:
        sku = await make_product(client, stock=50)
        customer = "cust-redis-killed"
        first = (await place(client, customer, (sku, 1))).json()
        assert (await client.get(f"/v1/orders/{first['id']}", headers=auth(customer))).status_code == 200
        port = private_redis.port

        private_redis.kill()
        start = time.monotonic()
        second = await place(client, customer, (sku, 1))
        assert second.status_code == 201, second.text
        cancel = await client.post(f"/v1/orders/{first['id']}/cancel", headers=auth(customer))
        assert cancel.status_code == 200
        for _ in range(10):
            a = await client.get(f"/v1/orders/{first['id']}", headers=auth(customer))
            assert a.status_code == 200 and a.json()["status"] == "cancelled"
        assert (await client.get(f"/v1/products/{sku}")).json()["stock"] == 49
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] == "down"
        assert time.monotonic() - start < 5.0

        private_redis.start()
        assert private_redis.port == port

        await wait_for(lambda: _redis_ok(client), timeout=8.0, interval=0.2)
        # The new server is empty: reads fill it again (with the current version).
        await wait_for(
            lambda: _entry_is(
                client,
                private_redis.url,
                order_key(prefix, first["id"]),
                f"/v1/orders/{first['id']}",
                customer,
                (2, True),
            ),
            timeout=6.0,
            interval=0.2,
        )
        # Writes go through again: a product change is visible at once.
        r = await client.get(f"/v1/products/{sku}")
        assert r.json()["stock"] == 49


async def test_app_starts_and_serves_with_redis_unreachable(make_settings, tmp_path):
    from orders.dev.process import free_port

    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", cache_prefix=_prefix())
    async with running_app(settings) as client:
        sku = await make_product(client, stock=5)
        order = await place(client, "cust-no-redis", (sku, 1))
        assert order.status_code == 201
        got = await client.get(f"/v1/orders/{order.json()['id']}", headers=auth("cust-no-redis"))
        assert got.status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] == "down"


# ------------------------------------------------------------------ the cache-fill race


@pytest.fixture
async def replicas(make_settings) -> AsyncIterator[tuple[Any, Any, str]]:
    """Two app instances (two "replicas") sharing the session's Redis under one prefix.
    (A roomy Redis timeout: these tests are about ordering, not about fail-open, and a
    busy CI machine must not turn them into fail-open tests.)"""
    prefix = _prefix()
    async with (
        running_app(make_settings(cache_prefix=prefix, redis_timeout_s=2.0)) as one,
        running_app(make_settings(cache_prefix=prefix, redis_timeout_s=2.0)) as two,
    ):
        yield one, two, prefix


async def test_fill_race_never_leaves_a_stale_entry(replicas, redis_url, monkeypatch):
    """25 rounds: 15 concurrent GETs (spread over two replicas, loads slowed a little
    so that they really overlap the commit) race one cancel; a GET 0.3 s later and
    the raw entry are never stale."""
    one, two, prefix = replicas
    real_get = order_queries.get

    async def slow_get(conn: Any, order_id: Any) -> Any:
        row = await real_get(conn, order_id)
        await asyncio.sleep(secrets.randbelow(30) / 1000)  # the window of the race
        return row

    monkeypatch.setattr(order_queries, "get", slow_get)
    sku = await make_product(one, stock=1000)
    customer = "cust-fill-race"
    r = aioredis.Redis.from_url(redis_url)
    try:
        for round_no in range(25):
            order = (await place(one, customer, (sku, 1))).json()
            key = order_key(prefix, order["id"])
            await r.delete(key)  # cold: the GETs load from PostgreSQL and fill

            async def read(i: int, oid: str = order["id"]) -> dict[str, Any]:
                await asyncio.sleep(secrets.randbelow(20) / 1000)
                c = one if i % 2 else two
                resp = await c.get(f"/v1/orders/{oid}", headers=auth(customer))
                assert resp.status_code == 200
                data: dict[str, Any] = resp.json()
                return data

            async def cancel(oid: str = order["id"], c: Any = two if round_no % 2 else one) -> Any:
                await asyncio.sleep(secrets.randbelow(15) / 1000)
                return await c.post(f"/v1/orders/{oid}/cancel", headers=auth(customer))

            results = await asyncio.gather(cancel(), *(read(i) for i in range(15)))
            assert results[0].status_code == 200
            assert all(doc["status"] in ("pending", "cancelled") for doc in results[1:])
            await asyncio.sleep(0.3)
            for c in (one, two):
                later = await c.get(f"/v1/orders/{order['id']}", headers=auth(customer))
                assert later.json()["status"] == "cancelled", f"stale after round {round_no}"
                assert later.json()["version"] == 2
            entry = _version(await r.get(key))
            assert entry is None or entry[0] == 2, (round_no, entry)  # never version 1 again
    finally:
        await r.aclose()


async def test_a_read_that_starts_after_a_change_never_joins_an_older_load(make_settings, monkeypatch):
    """Single-flight must not hand a reader that started after a commit the result of a
    load that started before it (here with no Redis at all, so every read loads)."""
    settings = make_settings(redis_url=None)
    async with running_app(settings) as client:
        sku = await make_product(client, stock=10)
        customer = "cust-flight"
        order = (await place(client, customer, (sku, 1))).json()
        real_get = order_queries.get
        gate = asyncio.Event()

        async def held_get(conn: Any, order_id: Any) -> Any:
            row = await real_get(conn, order_id)
            await gate.wait()  # the first load holds the old row until released
            return row

        monkeypatch.setattr(order_queries, "get", held_get)
        early = asyncio.ensure_future(client.get(f"/v1/orders/{order['id']}", headers=auth(customer)))
        await asyncio.sleep(0.1)
        monkeypatch.setattr(order_queries, "get", real_get)
        cancel = await client.post(f"/v1/orders/{order['id']}/cancel", headers=auth(customer))
        assert cancel.status_code == 200
        late = asyncio.ensure_future(client.get(f"/v1/orders/{order['id']}", headers=auth(customer)))
        await asyncio.sleep(0.1)
        gate.set()
        assert (await early).json()["status"] in ("pending", "cancelled")
        assert (await late).json()["status"] == "cancelled"


# ------------------------------------------------------------------ stampede protection


async def test_concurrent_misses_of_one_key_load_once(replicas, redis_url, monkeypatch):
    client, _, cache_prefix = replicas
    sku = await make_product(client, stock=10)
    customer = "cust-stampede"
    order = (await place(client, customer, (sku, 1))).json()
    r = aioredis.Redis.from_url(redis_url)
    try:
        await r.delete(order_key(cache_prefix, order["id"]), product_key(cache_prefix, sku))
    finally:
        await r.aclose()
    calls = {"order": 0, "product": 0}
    real_order, real_product = order_queries.get, product_queries.get

    async def counting_order(conn: Any, order_id: Any) -> Any:
        calls["order"] += 1
        await asyncio.sleep(0.3)  # a load slow enough for all to pile up
        return await real_order(conn, order_id)

    async def counting_product(conn: Any, s: str) -> Any:
        calls["product"] += 1
        await asyncio.sleep(0.3)
        return await real_product(conn, s)

    monkeypatch.setattr(order_queries, "get", counting_order)
    monkeypatch.setattr(product_queries, "get", counting_product)
    results = await asyncio.gather(
        *(client.get(f"/v1/orders/{order['id']}", headers=auth(customer)) for _ in range(40)),
        *(client.get(f"/v1/products/{sku}") for _ in range(40)),
    )
    assert all(r.status_code == 200 for r in results)
    assert calls == {"order": 1, "product": 1}
    # And now it is cached: no load at all.
    await client.get(f"/v1/orders/{order['id']}", headers=auth(customer))
    assert calls["order"] == 1


async def test_a_failed_load_fails_its_waiters_and_is_not_cached(client, monkeypatch):
    sku = await make_product(client, stock=10)
    customer = "cust-failed-load"
    order = (await place(client, customer, (sku, 1))).json()
    await client.app.state.res.cache.redis.delete(order_key(client.app.state.res.cache.prefix, order["id"]))
    real = order_queries.get
    calls = 0

    async def failing(conn: Any, order_id: Any) -> Any:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        raise ConnectionResetError("connection lost")

    monkeypatch.setattr(order_queries, "get", failing)
    results = await asyncio.gather(
        *(client.get(f"/v1/orders/{order['id']}", headers=auth(customer)) for _ in range(10))
    )
    assert [r.status_code for r in results] == [503] * 10
    assert all(r.headers["content-type"] == "application/problem+json" and "retry-after" in r.headers for r in results)
    monkeypatch.setattr(order_queries, "get", real)
    ok = await client.get(f"/v1/orders/{order['id']}", headers=auth(customer))
    assert ok.status_code == 200


# --------------------------------------------------------------- the CAS, against Redis


@pytest.fixture
async def cache(make_settings) -> AsyncIterator[Cache]:
    c = Cache.connect(make_settings(cache_prefix=_prefix()))
    try:
        yield c
    finally:
        await c.close()


async def _entry(cache: Cache, key: str) -> tuple[int, bool] | None:
    assert cache.redis is not None
    return _version(await cache.redis.get(key))


async def test_cas_never_replaces_newer_with_older(cache):
    key = cache.prefix + "cas:a"
    assert await cache.store(key, 2, {"v": 2})
    await cache.store(key, 1, {"v": 1})
    assert await _entry(cache, key) == (2, True)
    assert await cache.get(key) == {"v": 2}
    await cache.store(key, 1, None)  # an older tombstone
    assert await cache.get(key) == {"v": 2}
    await cache.store(key, 3, {"v": 3})
    assert await cache.get(key) == {"v": 3}
    assert cache.redis is not None
    assert 0 < await cache.redis.ttl(key) <= cache.ttl


async def test_cas_tombstones(cache):
    key = cache.prefix + "cas:b"
    await cache.store(key, 1, {"v": 1})
    await cache.store(key, 1, None)  # tombstone never replaces same-version data
    assert await _entry(cache, key) == (1, True)
    await cache.store(key, 2, None)  # a newer tombstone does
    assert await _entry(cache, key) == (2, False)
    assert await cache.get(key) is None  # a tombstone reads as a miss
    await cache.store(key, 1, {"v": 1})  # older data never replaces it
    assert await _entry(cache, key) == (2, False)
    await cache.store(key, 2, {"v": 2})  # data of v replaces a tombstone of v
    assert await _entry(cache, key) == (2, True)
    assert await cache.get(key) == {"v": 2}
    await cache.store(key, 2, {"v": "other"})  # same-version data stays
    assert await cache.get(key) == {"v": 2}


async def test_cas_in_pipelines_and_after_a_script_flush(cache):
    assert cache.redis is not None
    a, b = cache.prefix + "cas:p1", cache.prefix + "cas:p2"
    await cache.store(a, 5, {"v": 5})
    await cache.redis.script_flush()  # as after a Redis restart: the script is reloaded
    await cache.apply([(a, 4, {"v": 4}), (b, 1, {"v": 1})])
    assert await cache.get(a) == {"v": 5} and await cache.get(b) == {"v": 1}
    await cache.redis.script_flush()
    await cache.cas_many([(a, 6, None), (b, 1, None)])  # tombstones, as the replay sends them
    assert await _entry(cache, a) == (6, False) and await _entry(cache, b) == (1, True)


# ----------------------------------------------------------------------- the breaker


async def test_breaker_opens_then_lets_one_probe_through():
    breaker = CircuitBreaker(cooldown_s=0.2)
    assert breaker.allow()
    breaker.failure()
    assert not breaker.allow() and not breaker.closed
    await asyncio.sleep(0.25)
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one
    breaker.success()
    assert breaker.closed and breaker.allow()


async def test_a_cancelled_probe_does_not_wedge_the_breaker(make_settings, private_redis):
    """A request cancelled (client gone) while its call is the breaker's probe must not
    leave the breaker open forever."""
    c = Cache.connect(make_settings(redis_url=private_redis.url, cache_prefix=_prefix()))
    try:
        c.breaker.cooldown_s = 0.1
        c.breaker.failure()
        await asyncio.sleep(0.15)

        async def slow() -> None:
            await asyncio.sleep(10)

        task = asyncio.ensure_future(c.call(slow))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.15)
        assert await c.ping()
        assert c.breaker.closed
    finally:
        await c.close()


async def test_a_long_outage_is_replayed_whole_before_reads_trust_redis_again(
    make_settings, private_redis, isolated_db
):
    """1200 invalidations recorded during an outage (more than one replay batch): when
    the breaker closes, all of them are applied before reads use Redis again (the relay
    loop is slowed down here so that only that replay runs)."""
    prefix = _prefix()
    settings = make_settings(
        redis_url=private_redis.url, cache_prefix=prefix, database_url=isolated_db, relay_interval_s=60
    )
    async with running_app(settings) as client:
        res = client.app.state.res
        keys = [order_key(prefix, uuid.uuid4()) for _ in range(1200)]
        r = aioredis.Redis.from_url(private_redis.url)
        try:
            async with r.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(key, b'1|{"stale": true}', ex=300)
                await pipe.execute()
            await res.cache.invalidations.record([(key, 2) for key in keys])
            res.cache.breaker.cooldown_s = 0.1
            res.cache.breaker.failure()  # as after an outage
            await asyncio.sleep(0.15)
            assert await res.cache.get(keys[0]) is None  # the probe: closes the breaker, starts the replay
            await wait_for(lambda: not res.cache._replaying, timeout=10, interval=0.05)
            values = await r.mget(keys)
            assert all(_version(v) == (2, False) for v in values), sum(_version(v) != (2, False) for v in values)
        finally:
            await r.aclose()


async def test_a_cached_read_starts_no_task(cache):
    """One timer bounds a Redis command (Cache.call), not redis-py's socket_timeout, which
    runs every send under asyncio.wait_for: a task per command, on every cached read."""
    key = cache.prefix + "notask"
    assert await cache.store(key, 1, {"v": 1})
    assert await cache.get(key) == {"v": 1}  # the connection is open and the breaker closed
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    started: list[Any] = []

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        started.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting_factory)
    try:
        for _ in range(5):
            assert await cache.get(key) == {"v": 1}
    finally:
        loop.set_task_factory(previous)
    # Only the cache's and redis-py's own: other apps of the test session share this loop
    # (an asyncpg pool release, a relay pass) and may start tasks meanwhile.
    ours = [c for c in started if any(part in getattr(getattr(c, "cr_code", None), "co_filename", "")
                                      for part in ("redis", "orders/cache"))]
    assert ours == []

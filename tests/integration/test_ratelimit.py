"""Per-customer rate limit of order creations (ORDERS_RATE_LIMIT_PER_MINUTE, docs/API.md)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orders.dev.redis import EmbeddedRedis
from tests.conftest import auth, make_product, new_key, order_body, place, running_app

pytestmark = pytest.mark.timeout(90)

LIMIT = 5


@pytest.fixture
async def limited(make_settings) -> AsyncIterator[httpx.AsyncClient]:
    # A roomy Redis timeout: these tests are about counting; fail-open has its own test.
    settings = make_settings(
        rate_limit_per_minute=LIMIT, cache_prefix=f"rl-{secrets.token_hex(4)}:", redis_timeout_s=2.0
    )
    async with running_app(settings) as client:
        yield client


def _customer(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def assert_rate_limited(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/rate-limited") and r.json()["status"] == 429
    assert 1 <= int(r.headers["retry-after"]) <= 61


async def test_the_sixth_order_in_a_minute_is_429_for_that_customer_only(limited):
    sku = await make_product(limited, stock=100)
    me, other = _customer("cust-rl"), _customer("cust-rl-other")
    for _ in range(LIMIT):
        r = await place(limited, me, (sku, 1))
        assert r.status_code == 201, r.text
    sixth = await place(limited, me, (sku, 1))
    assert_rate_limited(sixth)
    # The counter is this minute's and expires (INCR and EXPIRE in one script).
    cache = limited.app.state.res.cache
    (counter,) = [k async for k in cache.redis.scan_iter(f"{cache.prefix}rl:*:{me}")]
    assert int(await cache.redis.get(counter)) == LIMIT + 1
    assert 0 < await cache.redis.ttl(counter) <= 65
    # Nothing was created or reserved by the refused request.
    assert (await limited.get(f"/v1/products/{sku}")).json()["stock"] == 100 - LIMIT
    listed = (await limited.get("/v1/orders", headers=auth(me))).json()["items"]
    assert len(listed) == LIMIT
    # Another customer is not affected, and reads are not limited.
    assert (await place(limited, other, (sku, 1))).status_code == 201
    assert (await limited.get("/v1/orders", headers=auth(me))).status_code == 200


async def test_invalid_requests_do_not_count(limited):
    sku = await make_product(limited, stock=100)
    eur = await make_product(limited, stock=100, currency="EUR")
    me = _customer("cust-rl-invalid")
    headers = {**auth(me), "Idempotency-Key": new_key()}
    for _ in range(LIMIT + 2):
        bad_email = order_body((sku, 1), email="not-an-email")
        assert (await limited.post("/v1/orders", headers=headers, json=bad_email)).status_code == 422
        assert (await limited.post("/v1/orders", headers=headers, json={"items": []})).status_code == 422
        assert (await limited.post("/v1/orders", headers=headers, content=b"{nope")).status_code == 422
        no_key = await limited.post("/v1/orders", headers=auth(me), json=order_body((sku, 1)))
        assert no_key.status_code == 400
        mixed = await place(limited, me, (sku, 1), (eur, 1))  # one currency per order
        assert mixed.status_code == 422 and mixed.json()["type"].endswith("/validation-error")
    for _ in range(LIMIT):
        r = await place(limited, me, (sku, 1))
        assert r.status_code == 201, r.text
    assert_rate_limited(await place(limited, me, (sku, 1)))


async def test_validation_errors_win_over_429(limited):
    sku = await make_product(limited, stock=100)
    me = _customer("cust-rl-precedence")
    for _ in range(LIMIT):
        assert (await place(limited, me, (sku, 1))).status_code == 201
    assert_rate_limited(await place(limited, me, (sku, 1)))
    headers = {**auth(me), "Idempotency-Key": new_key()}
    r = await limited.post("/v1/orders", headers=headers, json=order_body((sku, 1), email="nope"))
    assert r.status_code == 422
    assert (await limited.post("/v1/orders", headers=auth(me), json=order_body((sku, 1)))).status_code == 400


async def test_replays_count_and_429_wins_over_a_replay(limited):
    sku = await make_product(limited, stock=100)
    me = _customer("cust-rl-replay")
    key = new_key()
    first = await place(limited, me, (sku, 1), key=key)
    assert first.status_code == 201
    for _ in range(LIMIT - 1):
        replay = await place(limited, me, (sku, 1), key=key)
        assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert_rate_limited(await place(limited, me, (sku, 1)))
    assert_rate_limited(await place(limited, me, (sku, 1), key=key))
    assert (await limited.get(f"/v1/products/{sku}")).json()["stock"] == 99


async def test_concurrent_creations_never_exceed_the_limit(limited):
    sku = await make_product(limited, stock=100)
    me = _customer("cust-rl-burst")
    results = await asyncio.gather(*(place(limited, me, (sku, 1)) for _ in range(20)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [201] * LIMIT + [429] * (20 - LIMIT)
    assert (await limited.get(f"/v1/products/{sku}")).json()["stock"] == 100 - LIMIT


async def test_the_window_resets_the_next_minute(limited):
    sku = await make_product(limited, stock=100)
    me = _customer("cust-rl-window")
    limiter = limited.app.state.res.limiter
    now = time.time()
    start = now - now % 60 + 1  # one second into this minute
    limiter.clock = lambda: start + 30
    for _ in range(LIMIT):
        assert (await place(limited, me, (sku, 1))).status_code == 201
    r = await place(limited, me, (sku, 1))
    assert_rate_limited(r)
    assert int(r.headers["retry-after"]) in (30, 31)  # the rest of this minute
    limiter.clock = lambda: start + 60  # the next minute: a fresh allowance
    assert (await place(limited, me, (sku, 1))).status_code == 201


async def test_rate_limit_zero_turns_it_off(client):
    """The session app runs with ORDERS_RATE_LIMIT_PER_MINUTE=0."""
    sku = await make_product(client, stock=100)
    me = _customer("cust-rl-off")
    results = await asyncio.gather(*(place(client, me, (sku, 1)) for _ in range(12)))
    assert [r.status_code for r in results] == [201] * 12


async def test_fail_open_when_redis_is_down(make_settings, tmp_path: Path):
    server = EmbeddedRedis(tmp_path)
    server.start()
    try:
        settings = make_settings(
            redis_url=server.url, rate_limit_per_minute=2, cache_prefix=f"rl-{secrets.token_hex(4)}:"
        )
        async with running_app(settings) as client:
            sku = await make_product(client, stock=100)
            me = _customer("cust-rl-down")
            await _wait_limited_again(client, me, sku)  # the limit applies
            # A Redis that lost its scripts (this test's own server): NOSCRIPT, loaded again.
            await client.app.state.res.cache.redis.script_flush()
            assert_rate_limited(await place(client, me, (sku, 1)))
            server.kill()
            statuses = [(await place(client, me, (sku, 1))).status_code for _ in range(6)]
            assert statuses == [201] * 6
            # Hung, not dead: still fail-open, each request bounded.
            server.start()
            await _wait_limited_again(client, me, sku)
            server.pause()
            try:
                start = time.monotonic()
                statuses = [(await place(client, _customer("cust-rl-hung"), (sku, 1))).status_code for _ in range(4)]
                assert statuses == [201] * 4
                assert time.monotonic() - start < 3
            finally:
                server.resume()
    finally:
        server.stop()


async def _wait_limited_again(client: Any, me: str, sku: str) -> None:
    """The limit applies: orders pass until one is refused (the counter of this window
    may start over when Redis comes back empty)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = await place(client, me, (sku, 1))
        if r.status_code == 429:
            return
        assert r.status_code == 201
        await asyncio.sleep(0.1)
    raise AssertionError("the limit did not apply again after Redis came back")

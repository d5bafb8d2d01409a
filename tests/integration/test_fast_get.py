"""The fast cached GET (orders/api/fast_get.py) answers exactly what the route answers.

Every request goes to two apps on the same database and Redis: the session's (fast path on,
the default) and one with ORDERS_FAST_GET=false (the route alone). Status, headers (but the
request id) and body bytes must be identical; a spy on the route's use case tells which
requests the fast path answered and which fell through to the route.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from orders import cache as cache_module
from orders.cache import Cache, order_key
from orders.dev.process import free_port
from orders.service import orders as use_cases
from tests.conftest import ADMIN, auth, make_product, order_body, place, running_app, token, wait_until
from tests.server import ServerProcess

pytestmark = pytest.mark.timeout(120)

ROUTE = "/v1/orders/{order_id}"


@pytest.fixture(scope="module")
async def route_only(make_settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(make_settings(fast_get=False)) as c:
        yield c


@pytest.fixture
def route_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The order ids the route's use case was asked for (the fast path never asks it)."""
    calls: list[Any] = []
    real = use_cases.get_order

    async def spy(uow: Any, caller: Any, order_id: Any) -> Any:
        calls.append(order_id)
        return await real(uow, caller, order_id)

    monkeypatch.setattr(use_cases, "get_order", spy)
    return calls


def _headers(r: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in r.headers.raw if k.lower() != b"x-request-id"]


def assert_same(fast: httpx.Response, slow: httpx.Response) -> None:
    assert fast.status_code == slow.status_code, (fast.text, slow.text)
    assert _headers(fast) == _headers(slow)
    assert fast.content == slow.content
    assert len(fast.headers.get_list("x-request-id")) == 1


async def _both(
    fast_client: httpx.AsyncClient, slow_client: httpx.AsyncClient, method: str, url: str, **kw: Any
) -> httpx.Response:
    fast = await fast_client.request(method, url, **kw)
    slow = await slow_client.request(method, url, **kw)
    assert_same(fast, slow)
    return fast


async def _order(client: httpx.AsyncClient, customer: str) -> str:
    sku = await make_product(client, stock=100)
    r = await place(client, customer, (sku, 2))
    assert r.status_code == 201, r.text
    oid: str = r.json()["id"]
    return oid


async def _cached(client: httpx.AsyncClient, oid: str, customer: str) -> None:
    """A first read fills the cache."""
    r = await client.get(f"/v1/orders/{oid}", headers=auth(customer))
    assert r.status_code == 200


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_hit_is_answered_by_the_fast_path_exactly_as_the_route_answers(client, route_only, route_calls):
    oid = await _order(client, "cust-fast-1")
    await _cached(client, oid, "cust-fast-1")
    route_calls.clear()
    requests = _metric("orders_http_requests_total", method="GET", route=ROUTE, status="200")
    hits = _metric("orders_cache_requests_total", result="hit")
    fast = await client.get(f"/v1/orders/{oid}", headers=auth("cust-fast-1"))
    assert route_calls == []  # answered below the route
    assert _metric("orders_http_requests_total", method="GET", route=ROUTE, status="200") == requests + 1
    assert _metric("orders_cache_requests_total", result="hit") == hits + 1
    slow = await route_only.get(f"/v1/orders/{oid}", headers=auth("cust-fast-1"))
    assert len(route_calls) == 1
    assert_same(fast, slow)
    assert fast.json()["id"] == oid and fast.headers["etag"] == '"1"'
    # A request id of the caller's comes back, as from the route.
    r = await client.get(f"/v1/orders/{oid}", headers={**auth("cust-fast-1"), "X-Request-ID": "req-fast-1"})
    assert r.headers["x-request-id"] == "req-fast-1" and len(route_calls) == 1


async def test_staff_see_any_order_through_the_fast_path(client, route_only, route_calls):
    oid = await _order(client, "cust-fast-2")
    await _cached(client, oid, "cust-fast-2")
    await client.get(f"/v1/orders/{oid}", headers=ADMIN)  # the admin token is verified (and known) from now
    route_calls.clear()
    await _both(client, route_only, "GET", f"/v1/orders/{oid}", headers=ADMIN)
    assert len(route_calls) == 1  # the route-only app's


async def test_a_miss_falls_through_and_fills_the_cache(client, route_only, route_calls, redis_url, cache_prefix):
    oid = await _order(client, "cust-fast-3")
    await _cached(client, oid, "cust-fast-3")  # the token is known
    r = aioredis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        await r.delete(order_key(cache_prefix, oid))
        route_calls.clear()
        fast = await client.get(f"/v1/orders/{oid}", headers=auth("cust-fast-3"))
        assert len(route_calls) == 1  # a miss: the route loaded it
        assert await r.get(order_key(cache_prefix, oid)) is not None  # and filled the cache
        await r.delete(order_key(cache_prefix, oid))
        slow = await route_only.get(f"/v1/orders/{oid}", headers=auth("cust-fast-3"))
        assert_same(fast, slow)
        # A tombstone: the route's to answer too.
        await r.set(order_key(cache_prefix, oid), b"7|")
        route_calls.clear()
        await _both(client, route_only, "GET", f"/v1/orders/{oid}", headers=auth("cust-fast-3"))
        assert len(route_calls) == 2
    finally:
        await r.delete(order_key(cache_prefix, oid))
        await r.aclose()


async def test_someone_elses_order_is_the_routes_404(client, route_only, route_calls):
    oid = await _order(client, "cust-fast-4")
    await _cached(client, oid, "cust-fast-4")
    await _cached(client, await _order(client, "cust-fast-5"), "cust-fast-5")  # cust-fast-5's token is known
    route_calls.clear()
    r = await _both(client, route_only, "GET", f"/v1/orders/{oid}", headers=auth("cust-fast-5"))
    assert r.status_code == 404
    assert len(route_calls) == 2
    # A customer id that only starts like the owner's is someone else too.
    await _cached(client, await _order(client, "cust-fast-4x"), "cust-fast-4x")
    r = await _both(client, route_only, "GET", f"/v1/orders/{oid}", headers=auth("cust-fast-4x"))
    assert r.status_code == 404


async def test_bad_expired_and_missing_tokens_are_the_routes_401(client, route_only, route_calls):
    oid = await _order(client, "cust-fast-6")
    await _cached(client, oid, "cust-fast-6")
    url = f"/v1/orders/{oid}"
    route_calls.clear()
    for headers in (
        {},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer " + token("cust-fast-6", exp=int(time.time()) - 5)},
    ):
        r = await _both(client, route_only, "GET", url, headers=headers)
        assert r.status_code == 401
    assert route_calls == []  # 401s are the dependency's, before the use case
    # A token verified (and kept in the verifier's cache) while valid, asked again once expired.
    short = {"Authorization": "Bearer " + token("cust-fast-6", exp=int(time.time()) + 2)}
    assert (await client.get(url, headers=short)).status_code == 200
    assert (await route_only.get(url, headers=short)).status_code == 200
    await asyncio.sleep(max(0.0, int(time.time()) + 3 - time.time()))
    route_calls.clear()
    r = await _both(client, route_only, "GET", url, headers=short)
    assert r.status_code == 401
    assert route_calls == []


async def test_other_forms_fall_through_unchanged(client, route_only, route_calls):
    oid = await _order(client, "cust-fast-7")
    await _cached(client, oid, "cust-fast-7")
    me = auth("cust-fast-7")
    cases: list[tuple[str, str, dict[str, str]]] = [
        ("GET", f"/v1/orders/{oid}", {**me, "If-None-Match": '"1"'}),  # the route ignores it: 200
        ("GET", f"/v1/orders/{oid}".upper().replace("/V1/ORDERS/", "/v1/orders/"), me),  # an upper-case id
        ("GET", f"/v1/orders/{oid}/", me),  # trailing slash
        ("GET", f"/v1/orders/{oid[:-1]}", me),  # not an id
        ("HEAD", f"/v1/orders/{oid}", me),
    ]
    for method, url, headers in cases:
        route_calls.clear()
        await _both(client, route_only, method, url, headers=headers)
        assert route_calls == [] or len(route_calls) == 2, (url, route_calls)


async def test_a_read_after_a_cancel_shows_it_through_the_fast_path(client, route_only, route_calls):
    oid = await _order(client, "cust-fast-8")
    await _cached(client, oid, "cust-fast-8")
    cancel = await client.post(f"/v1/orders/{oid}/cancel", headers=auth("cust-fast-8"))
    assert cancel.status_code == 200
    route_calls.clear()
    r = await _both(client, route_only, "GET", f"/v1/orders/{oid}", headers=auth("cust-fast-8"))
    assert r.json()["status"] == "cancelled" and r.headers["etag"] == '"2"'
    assert r.content == cancel.content
    assert len(route_calls) == 1  # the written-through entry, served by the fast path


async def test_with_redis_down_the_route_answers_from_the_database(client, route_only, make_settings, route_calls):
    oid = await _order(client, "cust-fast-9")
    await _cached(client, oid, "cust-fast-9")
    down = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with running_app(down) as no_redis:
        await no_redis.get(f"/v1/orders/{oid}", headers=auth("cust-fast-9"))  # its verifier knows the token now
        route_calls.clear()
        fast = await no_redis.get(f"/v1/orders/{oid}", headers=auth("cust-fast-9"))
        assert len(route_calls) == 1
        assert not no_redis.app.state.res.cache.breaker.closed
    slow = await route_only.get(f"/v1/orders/{oid}", headers=auth("cust-fast-9"))
    # The same document; not byte for byte: the entry the cache holds was written from the
    # placed order, and jsonb hands the address's members back in an order of its own.
    assert fast.status_code == slow.status_code == 200
    assert _headers(fast) == _headers(slow) and fast.json() == slow.json()


async def test_concurrent_hits_and_changes_never_show_an_older_version(client, route_calls):
    """Reads racing a cancel: each answer is a whole document, and once the cancel has
    returned every read shows it (the written-through entry, never the older one)."""
    oid = await _order(client, "cust-fast-10")
    await _cached(client, oid, "cust-fast-10")
    me = auth("cust-fast-10")
    reads = [client.get(f"/v1/orders/{oid}", headers=me) for _ in range(20)]
    results = await asyncio.gather(*reads, client.post(f"/v1/orders/{oid}/cancel", headers=me))
    for r in results[:-1]:
        doc = orjson.loads(r.content)
        assert r.status_code == 200 and r.headers["etag"] == f'"{doc["version"]}"'
    after = await asyncio.gather(*(client.get(f"/v1/orders/{oid}", headers=me) for _ in range(10)))
    assert {r.json()["status"] for r in after} == {"cancelled"}


def test_the_access_log_line_is_the_routes(base_env: dict[str, str], tmp_path: Path) -> None:
    """A real server: the line of a fast answer has the fields and values of the route's."""
    sku = f"FAST-LOG-{secrets.token_hex(4)}"
    with ServerProcess(base_env, tmp_path, name="fast") as server, httpx.Client(base_url=server.url) as c:
        made = c.put(f"/v1/products/{sku}", headers=ADMIN, json={"name": "Mug", "unit_price": 100, "currency": "USD", "stock": 10})
        assert made.status_code == 201, made.text
        placed = c.post("/v1/orders", headers={**auth("cust-fast-log"), "Idempotency-Key": sku}, json=order_body((sku, 1)))
        assert placed.status_code == 201, placed.text
        oid = placed.json()["id"]
        first = c.get(f"/v1/orders/{oid}", headers={**auth("cust-fast-log"), "X-Request-ID": "via-route"})
        second = c.get(f"/v1/orders/{oid}", headers={**auth("cust-fast-log"), "X-Request-ID": "via-fast"})
        assert first.status_code == second.status_code == 200 and first.content == second.content

        def both() -> dict[str, dict[str, Any]] | None:
            lines = {line.get("request_id"): line for line in server.logs() if line.get("event") == "request"}
            lines = {k: v for k, v in lines.items() if k in ("via-route", "via-fast")}
            return lines if len(lines) == 2 else None

        lines = wait_until(both, what="the access lines of both answers")
    route, fast = lines["via-route"], lines["via-fast"]
    ignored = {"request_id", "duration_ms", "timestamp"}
    assert {k: v for k, v in fast.items() if k not in ignored} == {k: v for k, v in route.items() if k not in ignored}
    assert fast["route"] == ROUTE and fast["customer_id"] == "cust-fast-log"


# ------------------------------------------------- the fast read's own Redis connections


async def test_peek_survives_a_redis_restart_between_reads(make_settings, private_redis):
    """The idle connections of Cache.peek die with a restart: the next read replaces them,
    answers, and does not open the breaker (a stale socket is no Redis outage)."""
    cache = Cache.connect(make_settings(redis_url=private_redis.url, cache_prefix=f"fast-{secrets.token_hex(4)}:"))
    try:
        key = cache.prefix + "restart"
        assert await cache.store(key, 1, {"v": 1})
        assert await asyncio.gather(*(cache.peek(key) for _ in range(3))) == [b'1|{"v":1}'] * 3
        assert len(cache._direct_idle) >= 1
        private_redis.kill()
        private_redis.start()
        other = aioredis.Redis.from_url(private_redis.url, socket_timeout=2)
        await other.set(key, b'2|{"v":2}')
        await other.aclose()
        assert await cache.peek(key) == b'2|{"v":2}'
        assert cache.breaker.closed
        assert cache._direct_open == len(cache._direct_idle) == 1
    finally:
        await cache.close()


async def test_peek_opens_at_most_its_share_of_connections(make_settings, redis_url, monkeypatch):
    """Many reads at once: at most DIRECT_CONNECTIONS of the fast read's own, the rest through
    redis-py's pool; every read answers, and each own connection is back, idle, afterwards."""
    monkeypatch.setattr(cache_module, "DIRECT_CONNECTIONS", 4)
    cache = Cache.connect(make_settings(cache_prefix=f"fast-{secrets.token_hex(4)}:"))
    try:
        key = cache.prefix + "many"
        assert await cache.store(key, 3, {"v": 3})
        got = await asyncio.gather(*(cache.peek(key) for _ in range(40)))
        assert got == [b'3|{"v":3}'] * 40
        assert cache._direct_open == len(cache._direct_idle) <= 4
        assert cache._direct_open >= 1
    finally:
        await cache.close()
    assert cache._direct_idle == []

"""Health, readiness, metrics, OpenAPI and the request id (docs/API.md, Operations)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

from tests.conftest import auth, make_product, place, running_app


async def test_healthz_and_readyz(client):
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "postgres": "ok", "redis": "ok"}


async def test_readyz_without_redis_is_disabled_not_unready(make_settings):
    async with running_app(make_settings(redis_url=None)) as c:
        r = await c.get("/readyz")
        assert r.status_code == 200 and r.json()["redis"] == "disabled"
        sku = await make_product(c)
        assert (await place(c, "cust-noredis", (sku, 1))).status_code == 201


async def test_sigterm_turns_readiness_503_at_once_and_liveness_stays_200(make_settings):
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))  # stands in for uvicorn's
    try:
        async with running_app(make_settings()) as c:
            assert (await c.get("/readyz")).status_code == 200
            os.kill(os.getpid(), signal.SIGTERM)
            r = await c.get("/readyz")
            assert r.status_code == 503
            assert r.headers["content-type"] == "application/problem+json" and "retry-after" in r.headers
            assert r.json()["detail"] == "draining"
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/metrics")).status_code == 200
            # A request that still arrives is sent elsewhere (docs/API.md: 503 while draining).
            r = await c.get("/v1/products")
            assert r.status_code == 503 and r.json()["type"].endswith("/unavailable") and r.headers["retry-after"]
            assert calls == [signal.SIGTERM], "the server's own handler still runs (it drains)"
    finally:
        signal.signal(signal.SIGTERM, previous)


async def test_metrics_expose_the_promised_series(client):
    sku = await make_product(client)
    oid = (await place(client, "cust-metrics", (sku, 1))).json()["id"]
    await client.get(f"/v1/orders/{oid}", headers=auth("cust-metrics"))
    await client.get("/v1/products/NOT-CACHED-ANYWHERE")  # a miss
    text = (await client.get("/metrics")).text
    for series in (
        'orders_http_requests_total{method="POST",route="/v1/orders",status="201"}',
        'orders_http_request_duration_seconds_bucket{le="0.05",method="GET",route="/v1/orders/{order_id}",status="200"}',
        "orders_db_pool_size",
        "orders_db_pool_in_use",
        'orders_cache_requests_total{result="hit"}',
        'orders_cache_requests_total{result="miss"}',
        "orders_notifications_pending",
        "orders_notifications_sent_total",
        "orders_relay_lag_seconds",
    ):
        assert series in text, series


def _lag_over_100ms(text: str) -> float:
    """Loop-lag observations above 0.1 s: the histogram's count minus its le="0.1" bucket."""
    count = float(re.search(r"^orders_event_loop_lag_seconds_count (\S+)$", text, re.M).group(1))
    upto = float(re.search(r'^orders_event_loop_lag_seconds_bucket\{le="0.1"\} (\S+)$', text, re.M).group(1))
    return count - upto


async def test_a_blocked_event_loop_shows_in_the_loop_lag_histogram(client):
    before = _lag_over_100ms((await client.get("/metrics")).text)
    time.sleep(0.3)  # holds the loop the app's lifespan runs on, as a synchronous render would
    await asyncio.sleep(0.2)  # the sampler wakes, late, and observes it
    assert _lag_over_100ms((await client.get("/metrics")).text) >= before + 1


async def test_every_response_carries_a_request_id(client):
    for method, path in [
        ("GET", "/healthz"),
        ("GET", "/v1/products/nope"),
        ("POST", "/v1/orders"),
        ("GET", "/nowhere"),
    ]:
        r = await client.request(method, path)
        assert r.headers.get("x-request-id"), (method, path)
    r = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


async def test_unknown_routes_and_methods_are_problems(client):
    r = await client.get("/nowhere")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    r = await client.delete("/v1/orders")
    assert r.status_code == 405 and r.headers["content-type"] == "application/problem+json"


async def test_openapi_documents_bodies_and_problems(client):
    spec = (await client.get("/openapi.json")).json()
    post = spec["paths"]["/v1/orders"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/OrderCreate"
    assert "application/problem+json" in post["responses"]["409"]["content"]
    assert {"OrderCreate", "StatusChange", "ProductIn", "Problem", "Order"} <= set(spec["components"]["schemas"])
    assert any(p["name"] == "Idempotency-Key" for p in post["parameters"])
    assert (await client.get("/docs")).status_code == 200


async def test_pool_exhaustion_answers_503_within_the_acquire_timeout(make_settings):
    import time

    async with running_app(make_settings(db_pool_min=1, db_pool_max=1, db_acquire_timeout_s=0.3)) as c:
        sku = await make_product(c)
        pool = c.app.state.res.pool
        async with pool.acquire():  # the only connection is taken
            start = time.monotonic()
            r = await place(c, "cust-pool", (sku, 1))
            took = time.monotonic() - start
            assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
            assert r.json()["type"].endswith("/unavailable") and int(r.headers["retry-after"]) >= 1
            assert took < 2
            # Busy is not unreachable: readiness stays 200 while every connection is in use.
            ready = await c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["postgres"] == "ok"
        r = await place(c, "cust-pool", (sku, 1))
        assert r.status_code == 201


async def test_an_unexpected_error_is_a_bare_500_problem_with_a_request_id(make_settings):
    import httpx
    from asgi_lifespan import LifespanManager

    from orders.app import create_app

    app = create_app(make_settings())

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://orders.test") as c:
            r = await c.get("/boom")
    assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/internal-error") and r.headers["x-request-id"]
    assert "hunter2" not in r.text and "Traceback" not in r.text

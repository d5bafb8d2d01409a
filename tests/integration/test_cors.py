"""CORS for the checkout frontend: only ORDERS_CORS_ORIGINS, the headers it needs in
and out (docs/API.md)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import auth, make_product, new_key, order_body, running_app

ALLOWED = "https://checkout.example"
ALSO_ALLOWED = "http://localhost:5173"
EVIL = "https://evil.example"
EXPOSED = {"etag", "location", "x-request-id", "idempotent-replayed", "retry-after"}


@pytest.fixture(scope="module")
async def cors_client(make_settings) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(cors_origins=f"{ALLOWED}, {ALSO_ALLOWED}", cache_prefix=f"cors-{secrets.token_hex(4)}:")
    async with running_app(settings) as client:
        yield client


def _list(value: str | None) -> set[str]:
    return {v.strip().lower() for v in (value or "").split(",") if v.strip()}


async def _preflight(
    client: httpx.AsyncClient, path: str, origin: str, method: str, headers: str | None
) -> httpx.Response:
    h = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        h["Access-Control-Request-Headers"] = headers
    return await client.options(path, headers=h)


@pytest.mark.parametrize("origin", [ALLOWED, ALSO_ALLOWED])
async def test_preflight_of_an_order_creation_from_the_checkout_is_allowed(cors_client, origin):
    r = await _preflight(cors_client, "/v1/orders", origin, "POST", "authorization, content-type, idempotency-key")
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == origin
    assert {"authorization", "idempotency-key", "if-match", "content-type"} <= _list(
        r.headers["access-control-allow-headers"]
    )
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "origin" in _list(r.headers["vary"])
    assert int(r.headers["access-control-max-age"]) > 0
    assert "access-control-allow-credentials" not in r.headers  # bearer tokens, no cookies


async def test_preflight_with_if_match_for_a_cancel_is_allowed(cors_client):
    r = await _preflight(cors_client, f"/v1/orders/{new_key()}/cancel", ALLOWED, "POST", "Authorization,If-Match")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    r = await _preflight(cors_client, "/v1/products/SKU-1", ALLOWED, "PUT", "authorization,content-type")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED


async def test_preflight_with_the_frontends_trace_context_is_allowed(cors_client):
    """The checkout's browser tracing sends W3C `traceparent`/`tracestate` (orders/tracing.py)."""
    headers = "authorization, content-type, idempotency-key, traceparent, tracestate"
    r = await _preflight(cors_client, "/v1/orders", ALLOWED, "POST", headers)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    assert {"traceparent", "tracestate"} <= _list(r.headers["access-control-allow-headers"])


def _assert_refused_preflight(r: httpx.Response) -> None:
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == 400


async def test_preflight_from_another_origin_is_refused(cors_client):
    _assert_refused_preflight(
        await _preflight(cors_client, "/v1/orders", EVIL, "POST", "authorization, idempotency-key")
    )
    _assert_refused_preflight(await _preflight(cors_client, "/v1/orders", "null", "GET", None))
    # Not a prefix or suffix match either.
    _assert_refused_preflight(await _preflight(cors_client, "/v1/orders", ALLOWED + ".evil.example", "GET", None))
    _assert_refused_preflight(
        await _preflight(cors_client, "/v1/orders", ALLOWED.replace("https", "http"), "GET", None)
    )


async def test_preflight_for_other_headers_or_methods_is_refused(cors_client):
    r = await _preflight(cors_client, "/v1/orders", ALLOWED, "POST", "authorization, x-internal-override")
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    r = await _preflight(cors_client, "/v1/orders/x", ALLOWED, "DELETE", None)
    assert r.status_code == 400


async def test_simple_requests_from_the_checkout_expose_the_headers_it_needs(cors_client):
    sku = await make_product(cors_client, stock=10)
    r = await cors_client.get(f"/v1/products/{sku}", headers={"Origin": ALLOWED})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert EXPOSED <= _list(r.headers["access-control-expose-headers"])
    assert "origin" in _list(r.headers["vary"])

    headers = {**auth("cust-cors"), "Idempotency-Key": new_key(), "Origin": ALLOWED}
    created = await cors_client.post("/v1/orders", headers=headers, json=order_body((sku, 1)))
    assert created.status_code == 201
    assert created.headers["access-control-allow-origin"] == ALLOWED
    assert EXPOSED <= _list(created.headers["access-control-expose-headers"])
    for name in ("etag", "location", "x-request-id"):
        assert name in created.headers
    replay = await cors_client.post("/v1/orders", headers=headers, json=order_body((sku, 1)))
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["access-control-allow-origin"] == ALLOWED


async def test_errors_carry_cors_headers_too(cors_client):
    """The frontend must be able to read problem+json answers (401, 404, 422)."""
    for r in (
        await cors_client.get("/v1/orders", headers={"Origin": ALLOWED}),
        await cors_client.get("/v1/products/NOPE-" + new_key()[:8], headers={"Origin": ALLOWED}),
        await cors_client.post(
            "/v1/orders", headers={**auth("cust-cors"), "Idempotency-Key": new_key(), "Origin": ALLOWED}, json={}
        ),
    ):
        assert r.status_code in (401, 404, 422)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["access-control-allow-origin"] == ALLOWED


async def test_simple_requests_from_another_origin_get_no_allow_origin(cors_client):
    sku = await make_product(cors_client, stock=10)
    r = await cors_client.get(f"/v1/products/{sku}", headers={"Origin": EVIL})
    assert r.status_code == 200  # the server answers; the browser withholds it from the page
    assert "access-control-allow-origin" not in r.headers
    assert "origin" in _list(r.headers.get("vary"))
    r = await cors_client.get(f"/v1/products/{sku}")  # no Origin: not a CORS request at all
    assert "access-control-allow-origin" not in r.headers


async def test_without_configured_origins_no_origin_is_allowed(client):
    """The session app has ORDERS_CORS_ORIGINS empty."""
    r = await _preflight(client, "/v1/orders", ALLOWED, "POST", "authorization")
    assert "access-control-allow-origin" not in r.headers
    assert r.status_code >= 400 and r.headers["content-type"] == "application/problem+json"
    r = await client.get("/v1/products", headers={"Origin": ALLOWED})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

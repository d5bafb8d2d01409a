"""Authentication and customer scoping (docs/API.md: 401 with WWW-Authenticate, 403, 404)."""

from __future__ import annotations

import base64
import time

import jwt
import orjson
import pytest

from tests.conftest import ADMIN, JWT_SECRET, auth, make_product, place, token


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(obj)).decode().rstrip("=")


BAD_TOKENS = {
    "missing": None,
    "not bearer": "Basic dXNlcjpwYXNz",
    "empty bearer": "Bearer ",
    "malformed": "Bearer not.a.jwt",
    "garbage": "Bearer abc",
    "expired": "Bearer " + jwt.encode({"sub": "c1", "exp": int(time.time()) - 10}, JWT_SECRET, algorithm="HS256"),
    "wrong key": "Bearer " + jwt.encode({"sub": "c1", "exp": int(time.time()) + 600}, "another-secret-" + "x" * 30, algorithm="HS256"),
    "alg none": "Bearer " + _b64({"alg": "none", "typ": "JWT"}) + "." + _b64({"sub": "c1", "exp": int(time.time()) + 600}) + ".",
    "no sub": "Bearer " + jwt.encode({"exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256"),
    "no exp": "Bearer " + jwt.encode({"sub": "c1"}, JWT_SECRET, algorithm="HS256"),
    "sub too long": "Bearer " + jwt.encode({"sub": "c" * 65, "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256"),
    "sub with NUL": "Bearer " + jwt.encode({"sub": "c\x001", "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256"),
    "sub not a string": "Bearer " + jwt.encode({"sub": 42, "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256"),
    "HS512": "Bearer " + jwt.encode({"sub": "c1", "exp": int(time.time()) + 600}, JWT_SECRET + "x" * 40, algorithm="HS512"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_tokens_answer_401_problem(client, case):
    headers = {} if BAD_TOKENS[case] is None else {"Authorization": BAD_TOKENS[case]}
    for method, path in [("GET", "/v1/orders"), ("POST", "/v1/orders"), ("GET", "/v1/orders/00000000-0000-0000-0000-000000000000")]:
        r = await client.request(method, path, headers={**headers, "Idempotency-Key": "k"}, json={})
        assert r.status_code == 401, (case, path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.headers["content-type"] == "application/problem+json"
        body = r.json()
        assert body["type"].endswith("/unauthorized") and body["status"] == 401
        assert "Traceback" not in r.text and JWT_SECRET not in r.text


async def test_401_wins_over_413(client):
    r = await client.post("/v1/orders", content=b"x" * 200_000, headers={"Idempotency-Key": "k"})
    assert r.status_code == 401


async def test_another_customers_order_is_404_like_a_missing_one(client):
    sku = await make_product(client)
    r = await place(client, "alice", (sku, 1))
    assert r.status_code == 201
    oid = r.json()["id"]
    missing = "11111111-1111-1111-1111-111111111111"
    for path in (f"/v1/orders/{oid}", f"/v1/orders/{oid}/events"):
        theirs = await client.get(path, headers=auth("mallory"))
        nothing = await client.get(path.replace(oid, missing), headers=auth("mallory"))
        assert theirs.status_code == nothing.status_code == 404
        assert theirs.json()["type"] == nothing.json()["type"]
        assert "alice" not in theirs.text
    r = await client.post(f"/v1/orders/{oid}/cancel", headers=auth("mallory"))
    assert r.status_code == 404
    listed = await client.get("/v1/orders", headers=auth("mallory"))
    assert listed.status_code == 200 and listed.json()["items"] == []  # mallory has no orders; alice's is not listed
    # ... and the order is untouched.
    mine = await client.get(f"/v1/orders/{oid}", headers=auth("alice"))
    assert mine.json()["status"] == "pending"


async def test_customer_id_filter_is_ignored_for_customers(client):
    sku = await make_product(client)
    await place(client, "bob-filter", (sku, 1))
    await place(client, "carol-filter", (sku, 1))
    r = await client.get("/v1/orders", params={"customer_id": "bob-filter"}, headers=auth("carol-filter"))
    assert r.status_code == 200
    assert {o["customer_id"] for o in r.json()["items"]} == {"carol-filter"}
    r = await client.get("/v1/orders", params={"customer_id": "bob-filter"}, headers=ADMIN)
    assert {o["customer_id"] for o in r.json()["items"]} == {"bob-filter"}
    # Ignored whatever its value: empty, or longer than any customer id.
    for ignored in ("", "x" * 65):
        r = await client.get("/v1/orders", params={"customer_id": ignored}, headers=auth("carol-filter"))
        assert r.status_code == 200, ignored
        assert {o["customer_id"] for o in r.json()["items"]} == {"carol-filter"}
    # For staff, a malformed one is a validation error.
    r = await client.get("/v1/orders", params={"customer_id": "x" * 65}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "customer_id"


async def test_staff_operations_are_403_for_customers(client):
    sku = await make_product(client)
    r = await client.put(f"/v1/products/{sku}", headers=auth("alice"),
                         json={"name": "x", "unit_price": 1, "currency": "USD", "stock": 1})
    assert r.status_code == 403 and r.json()["type"].endswith("/forbidden")
    order = (await place(client, "alice", (sku, 1))).json()
    r = await client.post(f"/v1/orders/{order['id']}/status", headers=auth("alice"), json={"status": "paid"})
    assert r.status_code == 403
    # 403 wins over 404 and over 422
    r = await client.post("/v1/orders/nope/status", headers=auth("alice"), json={"status": "bogus"})
    assert r.status_code == 403


async def test_admin_sees_any_order(client):
    sku = await make_product(client)
    oid = (await place(client, "dave", (sku, 1))).json()["id"]
    r = await client.get(f"/v1/orders/{oid}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["customer_id"] == "dave"


def test_token_helper_roles():
    claims = jwt.decode(token("x", admin=True), JWT_SECRET, algorithms=["HS256"])
    assert claims["roles"] == ["admin"]

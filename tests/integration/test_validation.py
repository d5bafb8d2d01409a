"""Malformed requests answer problem+json and change nothing (docs/API.md, Errors)."""

from __future__ import annotations

import copy
import json

import pytest

from tests.conftest import address, auth, make_product, new_key, order_body


async def _snapshot(db, sku: str) -> tuple[int, int, int]:
    async with db.acquire() as conn:
        return (
            await conn.fetchval("SELECT stock FROM products WHERE sku = $1", sku),
            await conn.fetchval("SELECT count(*) FROM orders"),
            await conn.fetchval("SELECT count(*) FROM idempotency_keys"),
        )


def _bodies(sku: str) -> dict[str, object]:
    good = order_body((sku, 1))

    def with_(path: str, value: object) -> dict:
        body = copy.deepcopy(good)
        target = body
        parts = path.split(".")
        for p in parts[:-1]:
            target = target[int(p)] if p.isdigit() else target[p]
        last = parts[-1]
        if value is KeyError:
            del target[last]
        else:
            target[int(last) if last.isdigit() else last] = value
        return body

    return {
        "zero quantity": with_("items.0.quantity", 0),
        "negative quantity": with_("items.0.quantity", -2),
        "huge quantity": with_("items.0.quantity", 10**12),
        "quantity over 1000": with_("items.0.quantity", 1001),
        "float quantity": with_("items.0.quantity", 1.0),
        "fractional quantity": with_("items.0.quantity", 1.5),
        "string quantity": with_("items.0.quantity", "1"),
        "boolean quantity": with_("items.0.quantity", True),
        "duplicate skus": with_("items", [{"sku": sku, "quantity": 1}, {"sku": sku, "quantity": 2}]),
        "no items": with_("items", []),
        "101 items": with_("items", [{"sku": f"S-{i}", "quantity": 1} for i in range(101)]),
        "bad sku": with_("items.0.sku", "no spaces allowed"),
        "bad email": with_("email", "not-an-email"),
        "email with spaces": with_("email", "a b@example.com"),
        "missing email": with_("email", KeyError),
        "bad country": with_("shipping_address.country", "XX"),
        "three-letter country": with_("shipping_address.country", "GBR"),
        "5000-character name": with_("shipping_address.name", "x" * 5000),
        "201-character line": with_("shipping_address.line1", "y" * 201),
        "blank city": with_("shipping_address.city", "   "),
        "missing address": with_("shipping_address", KeyError),
        "address not an object": with_("shipping_address", "1 Main St"),
        "unknown field": with_("coupon", "FREE"),
        "items not a list": with_("items", {"sku": sku}),
        "array body": [good],
        "null body": None,
    }


CASES = list(_bodies("X"))


@pytest.mark.parametrize("case", CASES)
async def test_malformed_bodies_are_422_and_change_nothing(client, db, case):
    sku = await make_product(client, stock=10)
    before = await _snapshot(db, sku)
    body = _bodies(sku)[case]
    r = await client.post("/v1/orders", headers={**auth("cust-val"), "Idempotency-Key": new_key()}, json=body)
    assert r.status_code == 422, (case, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["type"].endswith("/validation-error") and problem["errors"]
    assert all({"field", "message"} <= set(e) for e in problem["errors"])
    assert "Traceback" not in r.text
    assert await _snapshot(db, sku) == before


RAW = {
    "non-JSON": b"this is not json",
    "truncated JSON": b'{"email": "a@example.com", "items": [',
    "empty body": b"",
    "deeply nested JSON": b"[" * 5000 + b"]" * 5000,
    "deeply nested object": b'{"a":' * 3000 + b"1" + b"}" * 3000,
    "invalid UTF-8": b'{"email": "\xff\xfe@example.com"}',
}


@pytest.mark.parametrize("case", list(RAW))
async def test_unparseable_bodies_are_422(client, db, case):
    sku = await make_product(client, stock=10)
    before = await _snapshot(db, sku)
    r = await client.post(
        "/v1/orders",
        headers={**auth("cust-val"), "Idempotency-Key": new_key(), "Content-Type": "application/json"},
        content=RAW[case],
    )
    assert r.status_code == 422, (case, r.text)
    assert r.json()["type"].endswith("/validation-error")
    assert await _snapshot(db, sku) == before


async def test_strings_are_trimmed_and_country_uppercased(client):
    sku = await make_product(client, stock=10)
    body = order_body((sku, 1))
    body["shipping_address"] = address(name="  Ada  ", city=" London ", country="gb", line2="  ")
    r = await client.post("/v1/orders", headers={**auth("cust-trim"), "Idempotency-Key": new_key()}, json=body)
    assert r.status_code == 201, r.text
    addr = r.json()["shipping_address"]
    assert addr["name"] == "Ada" and addr["city"] == "London" and addr["country"] == "GB" and addr["line2"] is None


async def test_body_over_limit_is_413_before_reading_it_all(client, db):
    sku = await make_product(client, stock=10)
    before = await _snapshot(db, sku)
    body = order_body((sku, 1))
    body["shipping_address"]["line2"] = "z" * 70_000
    r = await client.post("/v1/orders", headers={**auth("cust-big"), "Idempotency-Key": new_key()},
                          content=json.dumps(body).encode())
    assert r.status_code == 413 and r.json()["type"].endswith("/payload-too-large")
    assert await _snapshot(db, sku) == before


async def test_streamed_body_over_limit_is_413(client):
    async def chunks():
        for _ in range(100):
            yield b" " * 1024

    r = await client.post("/v1/orders", headers={**auth("cust-big"), "Idempotency-Key": new_key()}, content=chunks())
    assert r.status_code == 413


async def test_a_key_may_hold_any_printable_ascii_including_spaces(client):
    sku = await make_product(client)
    key = "order 42 / cart #7 ~!"
    r = await client.post("/v1/orders", headers={**auth("cust-key-space"), "Idempotency-Key": key}, json=order_body((sku, 1)))
    assert r.status_code == 201
    again = await client.post("/v1/orders", headers={**auth("cust-key-space"), "Idempotency-Key": key}, json=order_body((sku, 1)))
    assert again.headers["idempotent-replayed"] == "true"


async def test_413_wins_over_missing_key_and_400_over_422(client):
    r = await client.post("/v1/orders", headers=auth("cust-prec"), content=b"x" * 70_000)
    assert r.status_code == 413
    r = await client.post("/v1/orders", headers=auth("cust-prec"), content=b"not json")
    assert r.status_code == 400 and r.json()["type"].endswith("/idempotency-key-missing")


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "é-unicode"])
async def test_bad_idempotency_keys_are_400(client, key):
    sku = await make_product(client)
    r = await client.post("/v1/orders", headers={**auth("cust-key"), "Idempotency-Key": key.encode("utf-8")},
                          json=order_body((sku, 1)))
    assert r.status_code == 400 and r.json()["type"].endswith("/idempotency-key-missing")

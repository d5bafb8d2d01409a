"""Catalog: GET/PUT /v1/products (docs/API.md)."""

from __future__ import annotations

import base64

import orjson
import pytest

from tests.conftest import ADMIN, make_product


async def test_put_creates_then_replaces(client):
    sku = await make_product(client, stock=5, price=700)
    r = await client.put(f"/v1/products/{sku}", headers=ADMIN,
                         json={"name": "  Big mug ", "unit_price": 900, "currency": "EUR", "stock": 7})
    assert r.status_code == 200
    assert r.json() == {"sku": sku, "name": "Big mug", "unit_price": 900, "currency": "EUR", "stock": 7}
    r = await client.get(f"/v1/products/{sku}")
    assert r.status_code == 200 and r.json()["unit_price"] == 900  # read after write


async def test_unknown_and_malformed_skus_are_404(client):
    for sku in ("NOPE-404", "bad%20sku", "x" * 65, "a$b"):
        r = await client.get(f"/v1/products/{sku}")
        assert r.status_code == 404, sku
        assert r.headers["content-type"] == "application/problem+json"
    for bad in ("bad$sku", "TRAILING%0A"):  # a final newline passes `$` in Python's re.match
        r = await client.put(f"/v1/products/{bad}", headers=ADMIN,
                             json={"name": "x", "unit_price": 1, "currency": "USD", "stock": 1})
        assert r.status_code == 404, bad
        assert (await client.get(f"/v1/products/{bad}")).status_code == 404, bad


@pytest.mark.parametrize("body", [
    {"name": "x", "unit_price": -1, "currency": "USD", "stock": 1},
    {"name": "x", "unit_price": 1.5, "currency": "USD", "stock": 1},
    {"name": "x", "unit_price": 1, "currency": "usd", "stock": 1},
    {"name": "x", "unit_price": 1, "currency": "USD", "stock": -3},
    {"name": "", "unit_price": 1, "currency": "USD", "stock": 1},
    {"name": "x" * 201, "unit_price": 1, "currency": "USD", "stock": 1},
    {"name": "x", "unit_price": 1, "currency": "USD"},
    {"name": "x", "unit_price": 1, "currency": "USD", "stock": 1, "extra": True},
    [],
])
async def test_put_validation(client, body):
    sku = await make_product(client, stock=3)
    r = await client.put(f"/v1/products/{sku}", headers=ADMIN, json=body)
    assert r.status_code == 422 and r.json()["type"].endswith("/validation-error")
    assert r.json()["errors"]
    assert (await client.get(f"/v1/products/{sku}")).json()["stock"] == 3


@pytest.mark.parametrize("currency", ["XYZ", "ABC", "XXX", "XTS", "XAU"])
async def test_put_refuses_a_code_that_is_not_an_iso_4217_currency(client, currency):
    """Three capital letters are not enough: the code must be in ISO 4217 and have a
    minor unit (XXX, XTS and gold have none)."""
    sku = await make_product(client, stock=3)
    r = await client.put(f"/v1/products/{sku}", headers=ADMIN,
                         json={"name": "x", "unit_price": 1, "currency": currency, "stock": 1})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/validation-error")
    assert [e["field"] for e in r.json()["errors"]] == ["currency"]
    assert (await client.get(f"/v1/products/{sku}")).json()["currency"] == "USD"


@pytest.mark.parametrize("currency", ["JPY", "KWD", "CLF", "CHF"])
async def test_put_accepts_iso_4217_currencies_of_any_minor_unit(client, currency):
    sku = await make_product(client, currency=currency)
    assert (await client.get(f"/v1/products/{sku}")).json()["currency"] == currency


async def test_list_pages_by_sku_without_gaps(client):
    skus = sorted([await make_product(client) for _ in range(5)])
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        r = await client.get("/v1/products", params=params)
        assert r.status_code == 200
        page = r.json()
        seen += [p["sku"] for p in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert set(skus) <= set(seen)


async def test_list_rejects_bad_parameters(client):
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"cursor": "%%%"}):
        r = await client.get("/v1/products", params=params)
        assert r.status_code == 422, params
        assert r.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("value", [["A", "B"], [], [7], ["A\u0000"], {"sku": "A"}, "A"])
async def test_malformed_cursors_are_422(client, value):
    cursor = base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")
    r = await client.get("/v1/products", params={"cursor": cursor})
    assert r.status_code == 422, r.text
    assert r.json()["type"].endswith("/validation-error") and r.json()["errors"][0]["field"] == "cursor"

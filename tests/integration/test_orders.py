"""Placing, reading, listing and changing orders (docs/API.md, Orders)."""

from __future__ import annotations

import asyncio
import base64
import re

import orjson
import pytest

from tests.conftest import ADMIN, auth, make_product, new_key, order_body, place, running_app

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


async def stock_of(client, sku: str) -> int:
    return (await client.get(f"/v1/products/{sku}")).json()["stock"]


async def test_place_order_prices_from_catalog_and_reserves_stock(client, db):
    a = await make_product(client, stock=10, price=1299, name="Mug")
    b = await make_product(client, stock=5, price=250, name="Spoon")
    r = await place(client, "cust-place", (a, 2), (b, 3))
    assert r.status_code == 201, r.text
    order = r.json()
    assert r.headers["location"] == f"/v1/orders/{order['id']}"
    assert r.headers["etag"] == '"1"'
    assert order["status"] == "pending" and order["version"] == 1
    assert order["customer_id"] == "cust-place" and order["currency"] == "USD"
    assert order["items"] == [
        {"sku": a, "name": "Mug", "quantity": 2, "unit_price": 1299, "line_total": 2598},
        {"sku": b, "name": "Spoon", "quantity": 3, "unit_price": 250, "line_total": 750},
    ]
    assert order["subtotal"] == order["total"] == 3348
    assert order["shipping_address"]["country"] == "GB"
    assert RFC3339_UTC.match(order["created_at"]) and RFC3339_UTC.match(order["updated_at"])
    assert await stock_of(client, a) == 8 and await stock_of(client, b) == 2
    # The transaction wrote the event, the outbox rows and the idempotency record.
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM order_events WHERE order_id = $1 AND type = 'order.created'", order["id"]) == 1
        kinds = sorted(r["kind"] for r in await conn.fetch("SELECT kind FROM outbox WHERE order_id = $1", order["id"]))
        assert kinds == ["audit", "email"]
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys WHERE order_id = $1", order["id"]) == 1
    got = await client.get(f"/v1/orders/{order['id']}", headers=auth("cust-place"))
    assert got.status_code == 200 and got.json() == order and got.headers["etag"] == '"1"'


async def test_client_prices_are_ignored(client):
    sku = await make_product(client, price=1000)
    body = order_body((sku, 1))
    body["items"][0]["unit_price"] = 1
    r = await client.post("/v1/orders", headers={**auth("c"), "Idempotency-Key": new_key()}, json=body)
    assert r.status_code == 422  # unknown fields are refused, never used


async def test_insufficient_stock_reserves_nothing(client, db):
    plenty = await make_product(client, stock=50)
    scarce = await make_product(client, stock=1)
    key = new_key()
    r = await place(client, "cust-stock", (plenty, 5), (scarce, 2), key=key)
    assert r.status_code == 409
    body = r.json()
    assert body["type"].endswith("/insufficient-stock") and body["skus"] == [scarce]
    assert await stock_of(client, plenty) == 50 and await stock_of(client, scarce) == 1
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys WHERE key = $1", key) == 0
    # Nothing stored under the key: a corrected retry with the same key is a new request.
    r = await place(client, "cust-stock", (plenty, 5), (scarce, 1), key=key)
    assert r.status_code == 201


async def test_unknown_sku_is_422_and_reserves_nothing(client):
    sku = await make_product(client, stock=4)
    r = await place(client, "cust-unknown", (sku, 1), ("NO-SUCH-SKU", 1))
    assert r.status_code == 422
    assert r.json()["type"].endswith("/unknown-sku") and r.json()["skus"] == ["NO-SUCH-SKU"]
    assert await stock_of(client, sku) == 4


async def test_insufficient_stock_wins_over_unknown_sku(client):
    sku = await make_product(client, stock=1)
    r = await place(client, "cust-both", (sku, 2), ("NO-SUCH-SKU", 1))
    assert r.status_code == 409 and r.json()["skus"] == [sku]


async def test_mixed_currencies_are_a_validation_error(client):
    usd = await make_product(client, currency="USD", stock=3)
    eur = await make_product(client, currency="EUR", stock=3)
    r = await place(client, "cust-fx", (usd, 1), (eur, 1))
    assert r.status_code == 422 and r.json()["type"].endswith("/validation-error")
    assert await stock_of(client, usd) == 3 and await stock_of(client, eur) == 3
    r = await place(client, "cust-fx", (eur, 2))
    assert r.status_code == 201 and r.json()["currency"] == "EUR" and r.json()["total"] == 2598


async def test_no_oversell_under_80_concurrent_orders(client, db):
    """80 simultaneous orders for a SKU with 25 in stock, each also taking one of another
    SKU: exactly 25 succeed, the other 55 reserve nothing at all."""
    hot = await make_product(client, stock=25)
    other = await make_product(client, stock=1000)
    results = await asyncio.gather(*(place(client, f"cust-rush-{i}", (hot, 1), (other, 1)) for i in range(80)))
    statuses = [r.status_code for r in results]
    assert statuses.count(201) == 25, statuses
    assert statuses.count(409) == 55
    assert all(r.json()["type"].endswith("/insufficient-stock") for r in results if r.status_code == 409)
    assert await stock_of(client, hot) == 0
    assert await stock_of(client, other) == 1000 - 25
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM order_items WHERE sku = $1", hot) == 25
        assert await conn.fetchval("SELECT stock FROM products WHERE sku = $1", other) == 975


async def test_concurrent_orders_over_shared_skus_in_opposite_orders(client):
    """Lines in opposite orders must not deadlock into errors."""
    a = await make_product(client, stock=1000)
    b = await make_product(client, stock=1000)
    results = await asyncio.gather(*(
        place(client, f"cust-dl-{i}", *(((a, 1), (b, 1)) if i % 2 else ((b, 1), (a, 1)))) for i in range(40)
    ))
    assert [r.status_code for r in results] == [201] * 40
    assert await stock_of(client, a) == 960 and await stock_of(client, b) == 960


async def test_a_rush_on_two_skus_of_a_tiny_catalog_neither_deadlocks_nor_fails(make_settings, isolated_db, isolated_pool):
    """A fresh, analyzed database with only two products: the planner scans the table
    instead of using its index, so an UPDATE alone would lock rows in physical order.
    Orders (lines in both orders) and cancellations racing over the two SKUs must all
    go through."""
    async with running_app(make_settings(database_url=isolated_db, rate_limit_per_minute=0)) as c:
        a = await make_product(c, stock=1000)
        b = await make_product(c, stock=1000)
        async with isolated_pool.acquire() as conn:
            await conn.execute("ANALYZE products")
        first = await asyncio.gather(*(
            place(c, f"cust-tiny-{i}", *(((a, 1), (b, 2)) if i % 2 else ((b, 2), (a, 1)))) for i in range(60)
        ))
        assert [r.status_code for r in first] == [201] * 60, [r.text for r in first if r.status_code != 201][:3]
        cancels = [
            c.post(f"/v1/orders/{r.json()['id']}/cancel", headers=auth(f"cust-tiny-{i}"))
            for i, r in enumerate(first[:30])
        ]
        more = [place(c, f"cust-tiny-more-{i}", (a, 1), (b, 2)) for i in range(30)]
        results = await asyncio.gather(*cancels, *more)
        assert [r.status_code for r in results] == [200] * 30 + [201] * 30, [r.text for r in results if r.status_code >= 300][:3]
        # 60 orders stand: 30 of the first round and the 30 new ones.
        assert await stock_of(c, a) == 1000 - 60 and await stock_of(c, b) == 1000 - 120


async def test_list_is_newest_first_and_pages_are_stable_while_orders_arrive(client):
    sku = await make_product(client, stock=1000)
    customer = "cust-pages"
    ids = [(await place(client, customer, (sku, 1))).json()["id"] for _ in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/orders", params=params, headers=auth(customer))).json()
        seen += [o["id"] for o in page["items"]]
        # New orders arrive between pages: they must not shift what follows.
        await place(client, customer, (sku, 1))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


async def test_list_filters_by_status(client):
    sku = await make_product(client, stock=100)
    customer = "cust-filter-status"
    first = (await place(client, customer, (sku, 1))).json()
    await place(client, customer, (sku, 1))
    await client.post(f"/v1/orders/{first['id']}/cancel", headers=auth(customer))
    r = await client.get("/v1/orders", params={"status": "cancelled"}, headers=auth(customer))
    assert [o["id"] for o in r.json()["items"]] == [first["id"]]
    r = await client.get("/v1/orders", params={"status": "lost"}, headers=auth(customer))
    assert r.status_code == 422


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"cursor": "bm90IGpzb24"}, {"cursor": "!!"}])
async def test_list_rejects_bad_parameters(client, params):
    r = await client.get("/v1/orders", params=params, headers=auth("c"))
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"


def _cursor(value: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


ANY_ID = "6f1c2e8a-4b1d-4c2e-9a7b-0d3e5f6a7b8c"


@pytest.mark.parametrize(
    "value",
    [
        ["0001-01-01T00:00:00+14:00", ANY_ID],  # before year 1 in UTC: was a 500 (OverflowError)
        ["9999-12-31T23:59:59-14:00", ANY_ID],  # after year 9999 in UTC
        ["2026-01-01T00:00:00", ANY_ID],  # no offset
        ["2026-01-01T00:00:00Z", "not-a-uuid"],
        ["2026-01-01T00:00:00Z"],
        [1, ANY_ID],
        {"at": "2026-01-01T00:00:00Z"},
    ],
)
@pytest.mark.parametrize("who", ["customer", "staff"])
async def test_out_of_range_or_malformed_cursors_are_422(client, value, who):
    headers = ADMIN if who == "staff" else auth("cust-cursor")
    r = await client.get("/v1/orders", params={"cursor": _cursor(value)}, headers=headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/validation-error") and r.json()["errors"][0]["field"] == "cursor"


async def test_cancel_releases_stock_exactly_once(client, db):
    sku = await make_product(client, stock=10)
    order = (await place(client, "cust-cancel", (sku, 4))).json()
    assert await stock_of(client, sku) == 6
    results = await asyncio.gather(*(
        client.post(f"/v1/orders/{order['id']}/cancel", headers=auth("cust-cancel")) for _ in range(10)
    ))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] + [409] * 9
    ok = next(r for r in results if r.status_code == 200)
    assert ok.json()["status"] == "cancelled" and ok.json()["version"] == 2 and ok.headers["etag"] == '"2"'
    assert await stock_of(client, sku) == 10
    conflict = next(r for r in results if r.status_code == 409)
    assert conflict.json()["type"].endswith("/invalid-transition")


async def test_status_machine_through_http(client):
    sku = await make_product(client, stock=10)
    oid = (await place(client, "cust-flow", (sku, 1))).json()["id"]

    async def move(status: str, **headers: str):
        return await client.post(f"/v1/orders/{oid}/status", headers={**ADMIN, **headers}, json={"status": status})

    assert (await move("shipped")).status_code == 409  # pending -> shipped is not allowed
    r = await move("paid")
    assert r.status_code == 200 and r.json()["status"] == "paid" and r.json()["version"] == 2
    assert (await move("delivered")).status_code == 409
    assert (await move("shipped", **{"If-Match": '"1"'})).status_code == 412  # stale ETag
    r = await move("shipped", **{"If-Match": 'W/"2"'})
    assert r.status_code == 200 and r.headers["etag"] == '"3"'
    r = await move("delivered", **{"If-Match": "*"})
    assert r.status_code == 200 and r.json()["status"] == "delivered"
    assert (await move("cancelled")).status_code == 409
    assert (await client.post(f"/v1/orders/{oid}/cancel", headers=auth("cust-flow"))).status_code == 409
    events = (await client.get(f"/v1/orders/{oid}/events", headers=auth("cust-flow"))).json()["items"]
    order_events = [(e["type"], e["data"].get("to")) for e in events if e["type"].startswith("order.")]
    assert order_events == [
        ("order.created", None),
        ("order.status_changed", "paid"),
        ("order.status_changed", "shipped"),
        ("order.status_changed", "delivered"),
    ]
    assert all(re.match(RFC3339_UTC, e["at"]) for e in events)
    changes = [e for e in events if e["type"] == "order.status_changed"]
    assert {e["actor"] for e in changes} == {"staff-1"}
    assert next(e for e in events if e["type"] == "order.created")["actor"] == "cust-flow"


async def test_status_cancel_by_admin_releases_stock(client):
    sku = await make_product(client, stock=10)
    oid = (await place(client, "cust-admin-cancel", (sku, 3))).json()["id"]
    await client.post(f"/v1/orders/{oid}/status", headers=ADMIN, json={"status": "paid"})
    r = await client.post(f"/v1/orders/{oid}/status", headers=ADMIN, json={"status": "cancelled"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert await stock_of(client, sku) == 10


async def test_if_match_mismatch_changes_nothing(client):
    sku = await make_product(client, stock=10)
    oid = (await place(client, "cust-412", (sku, 2))).json()["id"]
    r = await client.post(f"/v1/orders/{oid}/cancel", headers={**auth("cust-412"), "If-Match": '"7"'})
    assert r.status_code == 412 and r.json()["type"].endswith("/precondition-failed")
    assert await stock_of(client, sku) == 8
    assert (await client.get(f"/v1/orders/{oid}", headers=auth("cust-412"))).json()["status"] == "pending"


async def test_status_body_validation_and_precedence(client):
    sku = await make_product(client, stock=10)
    oid = (await place(client, "cust-prec", (sku, 1))).json()["id"]
    r = await client.post(f"/v1/orders/{oid}/status", headers=ADMIN, json={"status": "lost"})
    assert r.status_code == 422
    # 404 wins over 422 for a missing order; 412 loses to 422
    r = await client.post("/v1/orders/11111111-1111-1111-1111-111111111111/status", headers=ADMIN, json={"status": "x"})
    assert r.status_code == 404
    r = await client.post(f"/v1/orders/{oid}/status", headers={**ADMIN, "If-Match": '"9"'}, json={})
    assert r.status_code == 422
    # 412 wins over 409
    r = await client.post(f"/v1/orders/{oid}/status", headers={**ADMIN, "If-Match": '"9"'}, json={"status": "delivered"})
    assert r.status_code == 412


async def test_non_uuid_ids_are_404(client):
    for path in ("/v1/orders/123", "/v1/orders/not-a-uuid/events"):
        r = await client.get(path, headers=auth("c"))
        assert r.status_code == 404
    r = await client.post("/v1/orders/xyz/cancel", headers=auth("c"))
    assert r.status_code == 404

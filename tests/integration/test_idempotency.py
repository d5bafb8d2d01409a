"""Idempotency-Key semantics (docs/API.md): replay, reuse, concurrency, scoping."""

from __future__ import annotations

import asyncio
import json

from tests.conftest import ADMIN, auth, make_product, new_key, order_body


async def test_same_key_same_body_replays_the_first_answer(client, db):
    sku = await make_product(client, stock=10)
    key = new_key()
    headers = {**auth("cust-idem"), "Idempotency-Key": key}
    first = await client.post("/v1/orders", headers=headers, json=order_body((sku, 2)))
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    # Same JSON value, other key order and spacing.
    body = order_body((sku, 2))
    reordered = json.dumps({k: body[k] for k in reversed(list(body))}, indent=3).encode()
    second = await client.post("/v1/orders", headers={**headers, "Content-Type": "application/json"}, content=reordered)
    assert second.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert second.headers["location"] == first.headers["location"]
    assert (await client.get(f"/v1/products/{sku}")).json()["stock"] == 8
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM orders WHERE customer_id = 'cust-idem'") == 1


async def test_replay_answers_the_first_answer_even_after_a_change(client):
    sku = await make_product(client, stock=10)
    key = new_key()
    headers = {**auth("cust-idem-2"), "Idempotency-Key": key}
    first = await client.post("/v1/orders", headers=headers, json=order_body((sku, 1)))
    await client.post(f"/v1/orders/{first.json()['id']}/cancel", headers=auth("cust-idem-2"))
    again = await client.post("/v1/orders", headers=headers, json=order_body((sku, 1)))
    assert again.status_code == 201 and again.json() == first.json()


async def test_same_key_other_body_is_422_reuse(client):
    sku = await make_product(client, stock=10)
    headers = {**auth("cust-reuse"), "Idempotency-Key": new_key()}
    assert (await client.post("/v1/orders", headers=headers, json=order_body((sku, 1)))).status_code == 201
    r = await client.post("/v1/orders", headers=headers, json=order_body((sku, 2)))
    assert r.status_code == 422 and r.json()["type"].endswith("/idempotency-key-reuse")
    assert (await client.get(f"/v1/products/{sku}")).json()["stock"] == 9


async def test_keys_are_scoped_to_the_customer(client):
    sku = await make_product(client, stock=10)
    key = new_key()
    a = await client.post("/v1/orders", headers={**auth("cust-a"), "Idempotency-Key": key}, json=order_body((sku, 1)))
    b = await client.post("/v1/orders", headers={**auth("cust-b"), "Idempotency-Key": key}, json=order_body((sku, 1)))
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"] and "idempotent-replayed" not in b.headers


async def test_40_concurrent_requests_with_one_key_create_exactly_one_order(client, db):
    sku = await make_product(client, stock=100)
    key = new_key()
    headers = {**auth("cust-race"), "Idempotency-Key": key}
    results = await asyncio.gather(*(
        client.post("/v1/orders", headers=headers, json=order_body((sku, 1))) for _ in range(40)
    ))
    created = [r for r in results if r.status_code == 201]
    others = [r for r in results if r.status_code != 201]
    assert created, [r.status_code for r in results]
    assert all(r.status_code == 409 and r.json()["type"].endswith("/idempotency-in-progress")
               and r.headers["retry-after"] == "1" for r in others)
    assert len({r.json()["id"] for r in created}) == 1
    assert sum(1 for r in created if "idempotent-replayed" not in r.headers) == 1
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM orders WHERE customer_id = 'cust-race'") == 1
    assert (await client.get(f"/v1/products/{sku}")).json()["stock"] == 99
    # A retry after the dust settles is a replay.
    r = await client.post("/v1/orders", headers=headers, json=order_body((sku, 1)))
    assert r.status_code == 201 and r.headers["idempotent-replayed"] == "true"


async def test_a_committed_key_replays_or_is_reuse_even_while_its_lock_is_held(client, db):
    """docs/API.md's order: replay, then 422 key-reuse, then 409 in-progress. With the key's
    answer committed, a request arriving while another holds the key's lock still gets
    the replay (same body) or 422 (other body), never 409."""
    sku = await make_product(client, stock=10)
    key = new_key()
    headers = {**auth("cust-idem-lock"), "Idempotency-Key": key}
    first = await client.post("/v1/orders", headers=headers, json=order_body((sku, 1)))
    assert first.status_code == 201
    async with db.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtext($1), hashtext($2))", "cust-idem-lock", key)
        try:
            same = await client.post("/v1/orders", headers=headers, json=order_body((sku, 1)))
            other = await client.post("/v1/orders", headers=headers, json=order_body((sku, 2)))
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1), hashtext($2))", "cust-idem-lock", key)
    assert same.status_code == 201 and same.headers["idempotent-replayed"] == "true"
    assert same.content == first.content
    assert other.status_code == 422 and other.json()["type"].endswith("/idempotency-key-reuse")


async def test_a_replay_is_exact_after_the_catalog_changes_currency(client):
    """The first answer is replayed even when the SKUs no longer share a currency; a new
    key with that body is refused as mixed currencies."""
    a = await make_product(client, stock=10, currency="USD")
    b = await make_product(client, stock=10, currency="USD")
    key = new_key()
    headers = {**auth("cust-idem-cur"), "Idempotency-Key": key}
    first = await client.post("/v1/orders", headers=headers, json=order_body((a, 1), (b, 1)))
    assert first.status_code == 201
    r = await client.put(f"/v1/products/{b}", headers=ADMIN,
                         json={"name": "Mug", "unit_price": 1299, "currency": "EUR", "stock": 9})
    assert r.status_code == 200
    again = await client.post("/v1/orders", headers=headers, json=order_body((a, 1), (b, 1)))
    assert again.status_code == 201 and again.content == first.content
    fresh = await client.post("/v1/orders", headers={**headers, "Idempotency-Key": new_key()},
                              json=order_body((a, 1), (b, 1)))
    assert fresh.status_code == 422 and fresh.json()["errors"][0]["code"] == "mixed_currency"

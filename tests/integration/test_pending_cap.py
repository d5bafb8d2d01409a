"""The cap of pending orders per customer (ORDERS_MAX_PENDING_ORDERS_PER_CUSTOMER,
docs/API.md): exact under concurrency, nothing reserved or stored when refused, a slot
freed by paying or cancelling, replays answered at the cap; the count kept by the
triggers of migration 0002 for every writer."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from orders.db.migrate import migrate, migration_files
from tests.conftest import ADMIN, auth, make_product, new_key, place, running_app

pytestmark = pytest.mark.timeout(120)

CAP = 10


@pytest.fixture
async def capped(make_settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(make_settings(max_pending_orders_per_customer=CAP, db_pool_max=10)) as client:
        yield client


def _customer(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def assert_too_many_pending(r: httpx.Response) -> None:
    assert r.status_code == 409, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == "https://orders.example/problems/too-many-pending-orders"
    assert body["status"] == 409 and body["max_pending_orders"] == CAP


async def pending_counts(db: asyncpg.Pool, customer: str) -> tuple[int, int]:
    """The customer's pending orders, counted in orders and in customer_pending."""
    async with db.acquire() as conn:
        return (
            await conn.fetchval("SELECT count(*) FROM orders WHERE customer_id = $1 AND status = 'pending'", customer),
            await conn.fetchval("SELECT coalesce(max(pending), 0) FROM customer_pending WHERE customer_id = $1", customer),
        )


async def stock(db: asyncpg.Pool, sku: str) -> int:
    async with db.acquire() as conn:
        return await conn.fetchval("SELECT stock FROM products WHERE sku = $1", sku)


async def fill(client: httpx.AsyncClient, customer: str, sku: str, n: int = CAP) -> list[str]:
    ids = []
    for _ in range(n):
        r = await place(client, customer, (sku, 1))
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


async def test_40_parallel_orders_of_one_customer_leave_exactly_10_pending(capped, db):
    a = await make_product(capped, stock=1000)
    b = await make_product(capped, stock=1000)
    me, other = _customer("cust-hoard"), _customer("cust-honest")
    keys = [new_key() for _ in range(40)]
    results = await asyncio.gather(*(place(capped, me, (a, 7), (b, 3), key=k) for k in keys))
    statuses = [r.status_code for r in results]
    assert statuses.count(201) == CAP and statuses.count(409) == 40 - CAP, statuses
    for r in results:
        if r.status_code == 409:
            assert_too_many_pending(r)
    assert await pending_counts(db, me) == (CAP, CAP)
    # Nothing reserved by the 30 refused: the stock that left is exactly the 10 orders' lines.
    assert await stock(db, a) == 1000 - 7 * CAP and await stock(db, b) == 1000 - 3 * CAP
    async with db.acquire() as conn:
        reserved = await conn.fetch(
            "SELECT i.sku, sum(i.quantity) AS q FROM order_items i JOIN orders o ON o.id = i.order_id"
            " WHERE o.customer_id = $1 GROUP BY i.sku",
            me,
        )
        assert {r["sku"]: r["q"] for r in reserved} == {a: 7 * CAP, b: 3 * CAP}
        # Nothing stored under the refused keys.
        stored = await conn.fetchval("SELECT count(*) FROM idempotency_keys WHERE customer_id = $1", me)
        assert stored == CAP
    # Another customer is not affected.
    assert (await place(capped, other, (a, 1))).status_code == 201


async def test_cancelling_or_paying_frees_a_slot(capped, db):
    sku = await make_product(capped, stock=100)
    me = _customer("cust-slot")
    ids = await fill(capped, me, sku)
    key = new_key()
    assert_too_many_pending(await place(capped, me, (sku, 1), key=key))
    assert await stock(db, sku) == 100 - CAP
    # A cancel by the customer frees a slot; the refused key stored nothing, so it places now.
    assert (await capped.post(f"/v1/orders/{ids[0]}/cancel", headers=auth(me))).status_code == 200
    assert await pending_counts(db, me) == (CAP - 1, CAP - 1)
    r = await place(capped, me, (sku, 1), key=key)
    assert r.status_code == 201 and "idempotent-replayed" not in r.headers
    assert_too_many_pending(await place(capped, me, (sku, 1)))
    # Paid (pending -> paid, a staff status change) frees one too.
    paid = await capped.post(f"/v1/orders/{ids[1]}/status", headers=ADMIN, json={"status": "paid"})
    assert paid.status_code == 200
    assert (await place(capped, me, (sku, 1))).status_code == 201
    assert_too_many_pending(await place(capped, me, (sku, 1)))
    # Cancelling a paid order frees nothing more: it was not pending.
    assert (await capped.post(f"/v1/orders/{ids[1]}/cancel", headers=auth(me))).status_code == 200
    assert_too_many_pending(await place(capped, me, (sku, 1)))
    # So does a staff cancel of a pending order.
    cancel = await capped.post(f"/v1/orders/{ids[2]}/status", headers=ADMIN, json={"status": "cancelled"})
    assert cancel.status_code == 200
    assert (await place(capped, me, (sku, 1))).status_code == 201
    assert await pending_counts(db, me) == (CAP, CAP)
    assert await stock(db, sku) == 100 - CAP  # 13 placed, 3 cancelled


async def test_a_replay_is_answered_at_the_cap_and_the_cap_comes_before_stock(capped, db):
    """docs/API.md: the idempotency outcome wins over the cap, which is the first business
    outcome (before insufficient-stock and unknown-sku)."""
    sku = await make_product(capped, stock=CAP + 1)
    me = _customer("cust-replay-cap")
    key = new_key()
    first = await place(capped, me, (sku, 1), key=key)
    assert first.status_code == 201
    await fill(capped, me, sku, CAP - 1)
    again = await place(capped, me, (sku, 1), key=key)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    reuse = await place(capped, me, (sku, 2), key=key)
    assert reuse.status_code == 422 and reuse.json()["type"].endswith("/idempotency-key-reuse")
    assert_too_many_pending(await place(capped, me, (sku, 5)))  # more than the 1 left in stock
    assert_too_many_pending(await place(capped, me, (sku, 1), ("NO-SUCH-SKU", 1)))
    assert await stock(db, sku) == 1 and await pending_counts(db, me) == (CAP, CAP)


async def test_cancels_racing_new_orders_of_one_customer_on_one_sku_neither_deadlock_nor_fail(capped, db):
    """A cancel locks the customer's count before the product rows, as a new order does:
    both of one customer on the same SKUs, racing, all answer as the contract says."""
    a = await make_product(capped, stock=1000)
    b = await make_product(capped, stock=1000)
    me = _customer("cust-race-cap")
    ids: list[str] = []
    for _ in range(3):
        for i in range(CAP - len(ids)):
            r = await place(capped, me, *(((a, 1), (b, 1)) if i % 2 else ((b, 1), (a, 1))))
            assert r.status_code == 201
            ids.append(r.json()["id"])
        cancels = [capped.post(f"/v1/orders/{oid}/cancel", headers=auth(me)) for oid in ids]
        orders = [place(capped, me, (a, 1), (b, 1)) for _ in range(2 * CAP)]
        results = await asyncio.gather(*cancels, *orders)
        assert [r.status_code for r in results[:CAP]] == [200] * CAP, [r.text for r in results[:CAP]]
        for r in results[CAP:]:
            if r.status_code != 201:
                assert_too_many_pending(r)
        ids = [r.json()["id"] for r in results[CAP:] if r.status_code == 201]
        assert len(ids) <= CAP
        assert await pending_counts(db, me) == (len(ids), len(ids))
        assert await stock(db, a) == await stock(db, b) == 1000 - len(ids)


async def test_zero_turns_the_cap_off_and_the_count_is_still_kept(make_settings, db):
    async with running_app(make_settings(max_pending_orders_per_customer=0, db_pool_max=5)) as client:
        sku = await make_product(client, stock=100)
        me = _customer("cust-uncapped")
        ids = await fill(client, me, sku, CAP + 3)
        assert await pending_counts(db, me) == (CAP + 3, CAP + 3)
        assert (await client.post(f"/v1/orders/{ids[0]}/cancel", headers=auth(me))).status_code == 200
        assert await pending_counts(db, me) == (CAP + 2, CAP + 2)


async def test_the_migration_counts_existing_orders_and_the_triggers_keep_counting(isolated_db):
    """0002 on a database that already has orders (an upgrade): the backfill counts the
    pending ones, and any writer (plain SQL here, as a replica of the previous release
    would write) keeps the count."""
    (first, initial), *later = migration_files()
    conn = await asyncpg.connect(isolated_db)
    try:
        await conn.execute(initial)
        await conn.execute(
            "CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", first)
        insert = """
            INSERT INTO orders (id, customer_id, status, currency, email, subtotal, total,
                                shipping_address, created_at, updated_at)
            SELECT gen_random_uuid(), $1, $2, 'USD', 'a@example.com', 1, 1, '{}', now(), now()
              FROM generate_series(1, $3)
        """
        for customer, status, n in [
            ("old-a", "pending", 3), ("old-a", "paid", 2), ("old-a", "cancelled", 4),
            ("old-b", "pending", 12), ("old-c", "delivered", 5),
        ]:
            await conn.execute(insert, customer, status, n)
        assert [name for name, _ in later] == await migrate(isolated_db)
        counts = "SELECT customer_id, pending FROM customer_pending WHERE pending > 0 ORDER BY 1"
        assert [tuple(r) for r in await conn.fetch(counts)] == [("old-a", 3), ("old-b", 12)]
        # Writers after the migration, whatever they are, keep it.
        await conn.execute(insert, "old-c", "pending", 2)
        await conn.execute(
            "UPDATE orders SET status = 'paid' WHERE id IN"
            " (SELECT id FROM orders WHERE customer_id = 'old-b' AND status = 'pending' LIMIT 5)"
        )
        await conn.execute("UPDATE orders SET status = 'shipped' WHERE customer_id = 'old-b' AND status = 'paid'")
        await conn.execute(
            "DELETE FROM orders WHERE id IN (SELECT id FROM orders WHERE customer_id = 'old-a' AND status = 'pending' LIMIT 1)"
        )
        await conn.execute("UPDATE orders SET status = 'pending' WHERE customer_id = 'old-a' AND status = 'cancelled'")
        expected = await conn.fetch(
            "SELECT customer_id, count(*) AS pending FROM orders WHERE status = 'pending' GROUP BY 1 ORDER BY 1"
        )
        assert [tuple(r) for r in await conn.fetch(counts)] == [tuple(r) for r in expected]
        assert [tuple(r) for r in expected] == [("old-a", 6), ("old-b", 7), ("old-c", 2)]
    finally:
        await conn.close()

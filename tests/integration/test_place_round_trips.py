"""A new order, and a status change, cost one database round trip each (docs/PERFORMANCE.md,
issue 12): the use case on a pool of one real connection, every statement it sends logged
(asyncpg's query logger sees BEGIN and COMMIT too). Counted once the process's price list,
the cache and the connection's prepared statements are warm, as they are in service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import pytest

from orders.auth import Principal
from orders.cache import order_key
from orders.db.orders import CHANGE_SQL, PLACE_SQL
from orders.db.pool import init_connection, keep_session
from orders.documents import rfc3339
from orders.domain.status import OrderStatus
from orders.errors import InvalidTransition, PreconditionFailed
from orders.ratelimit import RateLimiter
from orders.schemas import OrderCreate
from orders.service import orders as use_cases
from orders.service.unit_of_work import UnitOfWork
from tests.conftest import RecordingRelay, auth, make_product, new_key, order_body, place


@pytest.fixture
async def one_connection(database_url: str, client: Any) -> AsyncIterator[tuple[asyncpg.Pool, list[str]]]:
    """A pool of one connection (the schema migrated by `client`) and the statements it runs."""
    statements: list[str] = []
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1, init=init_connection, reset=keep_session)
    assert pool is not None
    async with pool.acquire() as conn:
        conn.add_query_logger(lambda record: statements.append(record.query))
    try:
        yield pool, statements
    finally:
        await pool.close()


async def _place(uow: UnitOfWork, limiter: RateLimiter, customer: str, key: str, *lines: tuple[str, int]) -> Any:
    raw = order_body(*lines)
    req = OrderCreate.model_validate(raw)
    return await use_cases.place_order(
        uow, limiter, Principal(customer, is_admin=False), key, raw, req, None, max_pending=10
    )


async def _logged(statements: list[str]) -> list[str]:
    await asyncio.sleep(0)  # the logger is called soon after each statement, not within it
    logged, statements[:] = list(statements), []
    return logged


async def test_a_new_order_and_its_replay_are_one_statement_each_without_begin_or_commit(client, one_connection, db):
    pool, statements = one_connection
    res = client.app.state.res
    relay = RecordingRelay()
    uow = UnitOfWork(pool, res.cache, relay, 5.0)
    limiter = RateLimiter(res.cache, 0)
    a, b = await make_product(client, stock=10), await make_product(client, stock=10)
    await _place(uow, limiter, "cust-rt", new_key(), (a, 1), (b, 1))  # warms the price list
    await _logged(statements)

    key = new_key()
    placed = await _place(uow, limiter, "cust-rt", key, (b, 2), (a, 3))
    assert (placed.status, placed.replayed) == (201, False)
    assert await _logged(statements) == [PLACE_SQL]
    replay = await _place(uow, limiter, "cust-rt", key, (b, 2), (a, 3))
    assert (replay.replayed, replay.body) == (True, placed.body)
    assert await _logged(statements) == [PLACE_SQL]

    # What the one call wrote is what a transaction wrote: the order as answered, its
    # reservation, its event, its outbox rows and the key's record.
    doc = orjson.loads(placed.body)
    async with db.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT o.created_at, o.total, (SELECT count(*) FROM order_events e WHERE e.order_id = o.id) AS events,"
            " (SELECT count(*) FROM outbox x WHERE x.order_id = o.id) AS outbox,"
            " (SELECT response_body FROM idempotency_keys k WHERE k.customer_id = 'cust-rt' AND k.key = $2) AS body"
            " FROM orders o WHERE o.id = $1",
            doc["id"],
            key,
        )
        stocks = await conn.fetch("SELECT stock FROM products WHERE sku = ANY($1::text[]) ORDER BY sku", [a, b])
    assert (row["total"], row["events"], row["outbox"], bytes(row["body"])) == (doc["total"], 1, 2, placed.body)
    assert rfc3339(row["created_at"]) == doc["created_at"]
    assert sorted(s["stock"] for s in stocks) == sorted([10 - 1 - 3, 10 - 1 - 2])
    await uow.dispatch()
    assert len(relay.dispatched) == 4  # the two orders' email and audit rows


async def test_a_cancel_and_staff_changes_are_one_statement_each_with_a_warm_cache(client, one_connection, db):
    pool, statements = one_connection
    res = client.app.state.res
    relay = RecordingRelay()
    uow = UnitOfWork(pool, res.cache, relay, 5.0, events=True)
    limiter = RateLimiter(res.cache, 0)
    sku = await make_product(client, stock=10)
    customer = Principal("cust-rt-change", is_admin=False)
    staff = Principal("staff-rt", is_admin=True)
    first = await _place(uow, limiter, customer.customer_id, new_key(), (sku, 2))  # cached as it commits
    second = await _place(uow, limiter, customer.customer_id, new_key(), (sku, 3))
    await _logged(statements)

    cancelled = await use_cases.change_status(uow, customer, UUID(first.order_id), OrderStatus.CANCELLED, None, None)
    assert await _logged(statements) == [CHANGE_SQL]
    paid = await use_cases.change_status(uow, staff, UUID(second.order_id), OrderStatus.PAID, frozenset({1}), None)
    assert await _logged(statements) == [CHANGE_SQL]
    shipped = await use_cases.change_status(uow, staff, UUID(second.order_id), OrderStatus.SHIPPED, None, None)
    assert await _logged(statements) == [CHANGE_SQL]  # judged on the cache the previous change wrote

    # What the call wrote is what the transaction wrote: the change, its timeline event,
    # the stock of the cancelled order back once, and the rows; the order event carries
    # the updated_at the database wrote (the statement's now()).
    async with db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT o.id::text AS id, o.status, o.version, o.updated_at,"
            " (SELECT array_agg(e.type ORDER BY e.id) FROM order_events e WHERE e.order_id = o.id) AS events,"
            " (SELECT array_agg(x.kind ORDER BY x.id) FROM outbox x WHERE x.order_id = o.id) AS kinds,"
            " (SELECT array_agg(x.payload ORDER BY x.id) FROM outbox x WHERE x.order_id = o.id AND x.kind = 'event')"
            "   AS order_events"
            " FROM orders o WHERE o.id = ANY($1::uuid[]) ORDER BY o.created_at",
            [first.order_id, second.order_id],
        )
        stock = await conn.fetchval("SELECT stock FROM products WHERE sku = $1", sku)
    assert stock == 10 - 3
    got = {r["id"]: r for r in rows}
    assert (got[first.order_id]["status"], got[first.order_id]["version"]) == ("cancelled", 2)
    assert got[first.order_id]["events"] == ["order.created", "order.cancelled"]
    assert got[first.order_id]["kinds"] == ["email", "audit", "event", "audit", "email", "event"]
    assert got[second.order_id]["events"] == ["order.created", "order.status_changed", "order.status_changed"]
    for doc in (cancelled, shipped):
        row = got[doc["id"]]
        assert doc["updated_at"] == rfc3339(row["updated_at"])
        event = row["order_events"][-1]
        assert event["time"] == doc["updated_at"] and event["id"] == f"{doc['id']}.{doc['version']}"
        assert event["data"] == {**doc, **({"reason": "customer"} if doc is cancelled else {})}
    assert (paid["version"], shipped["version"]) == (2, 3)
    assert await res.cache.get(order_key(res.cache.prefix, first.order_id)) == cancelled

    # A refusal judged on the cache is answered from the row (one read), never from the
    # cache alone; a cache miss costs one read before the call.
    with pytest.raises(InvalidTransition):
        await use_cases.change_status(uow, customer, UUID(first.order_id), OrderStatus.CANCELLED, None, None)
    logged = await _logged(statements)
    assert len(logged) == 1 and CHANGE_SQL not in logged
    await res.cache.redis.delete(order_key(res.cache.prefix, second.order_id))
    delivered = await use_cases.change_status(uow, staff, UUID(second.order_id), OrderStatus.DELIVERED, None, None)
    logged = await _logged(statements)
    assert delivered["version"] == 4 and len(logged) == 2 and logged[1] == CHANGE_SQL


async def test_a_change_judged_on_a_stale_cache_is_judged_again_on_the_row_the_call_answers(
    client, one_connection, db
):
    """The cache lags a commit (an order paid by another replica whose cache write has
    not landed yet): the call writes nothing and answers the latest row, and the change
    is judged and written again from it; a refusal the stale entry would give is checked
    on the row first."""
    pool, statements = one_connection
    res = client.app.state.res
    uow = UnitOfWork(pool, res.cache, RecordingRelay(), 5.0)
    limiter = RateLimiter(res.cache, 0)
    sku = await make_product(client, stock=10)
    customer = Principal("cust-rt-stale", is_admin=False)
    staff = Principal("staff-rt", is_admin=True)
    placed = await _place(uow, limiter, customer.customer_id, new_key(), (sku, 4))
    key = order_key(res.cache.prefix, placed.order_id)
    stale = await res.cache.get(key)
    assert stale is not None and stale["version"] == 1
    async with db.acquire() as conn:  # paid behind the cache's back
        await conn.execute(
            "UPDATE orders SET status = 'paid', version = 2, updated_at = now() WHERE id = $1", placed.order_id
        )
    await _logged(statements)

    # If-Match "2": the stale entry (version 1) would answer 412; the row does not.
    await res.cache.redis.set(key, b"1|" + orjson.dumps(stale))
    doc = await use_cases.change_status(uow, customer, UUID(placed.order_id), OrderStatus.CANCELLED, frozenset({2}), None)
    assert (doc["status"], doc["version"]) == ("cancelled", 3)
    logged = await _logged(statements)
    assert len(logged) == 2 and logged[1] == CHANGE_SQL

    # Without If-Match the stale entry looks fine: the call answers the row instead.
    second = await _place(uow, limiter, customer.customer_id, new_key(), (sku, 1))
    key = order_key(res.cache.prefix, second.order_id)
    stale = await res.cache.get(key)
    async with db.acquire() as conn:
        await conn.execute(
            "UPDATE orders SET status = 'paid', version = 2, updated_at = now() WHERE id = $1", second.order_id
        )
    await res.cache.redis.set(key, b"1|" + orjson.dumps(stale))
    await _logged(statements)
    doc = await use_cases.change_status(uow, staff, UUID(second.order_id), OrderStatus.CANCELLED, None, None)
    assert (doc["status"], doc["version"]) == ("cancelled", 3)
    assert await _logged(statements) == [CHANGE_SQL, CHANGE_SQL]
    with pytest.raises(PreconditionFailed):
        await use_cases.change_status(uow, staff, UUID(second.order_id), OrderStatus.CANCELLED, frozenset({2}), None)
    async with db.acquire() as conn:
        audit = await conn.fetchval(
            "SELECT payload FROM outbox WHERE order_id = $1 AND kind = 'audit' ORDER BY id DESC LIMIT 1",
            second.order_id,
        )
        stock = await conn.fetchval("SELECT stock FROM products WHERE sku = $1", sku)
    assert audit["before"] == {"status": "paid", "version": 2}
    assert stock == 10  # each cancelled order's stock back once


async def test_of_concurrent_cancels_of_one_order_exactly_one_wins(client, db):
    sku = await make_product(client, stock=10)
    customer = "cust-rt-race"
    order = (await place(client, customer, (sku, 3))).json()
    assert (await client.get(f"/v1/orders/{order['id']}", headers=auth(customer))).status_code == 200  # cached
    answers = await asyncio.gather(
        *(client.post(f"/v1/orders/{order['id']}/cancel", headers=auth(customer)) for _ in range(20))
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] + [409] * 19
    assert all(r.json()["current_status"] == "cancelled" for r in answers if r.status_code == 409)
    async with db.acquire() as conn:
        stock = await conn.fetchval("SELECT stock FROM products WHERE sku = $1", sku)
        events = await conn.fetchval(
            "SELECT count(*) FROM order_events WHERE order_id = $1 AND type = 'order.cancelled'", order["id"]
        )
        rows = await conn.fetchval("SELECT count(*) FROM outbox WHERE order_id = $1", order["id"])
        version = await conn.fetchval("SELECT version FROM orders WHERE id = $1", order["id"])
    assert (stock, events, rows, version) == (10, 1, 4, 2)

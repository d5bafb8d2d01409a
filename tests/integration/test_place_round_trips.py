"""A new order costs one database round trip (docs/PERFORMANCE.md, issue 12): the use case
on a pool of one real connection, every statement it sends logged (asyncpg's query
logger sees BEGIN and COMMIT too). Counted once the process's price list and the
connection's prepared statements are warm, as they are in service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from orders.auth import Principal
from orders.db.orders import PLACE_SQL
from orders.db.pool import init_connection, keep_session
from orders.documents import rfc3339
from orders.ratelimit import RateLimiter
from orders.schemas import OrderCreate
from orders.service import orders as use_cases
from orders.service.unit_of_work import UnitOfWork
from tests.conftest import make_product, new_key, order_body


class Relay:
    def __init__(self) -> None:
        self.dispatched: list[int] = []

    def dispatch(self, ids: list[int]) -> None:
        self.dispatched += ids


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
    relay = Relay()
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

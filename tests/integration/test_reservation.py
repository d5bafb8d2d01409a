"""The reservation statement (orders.db.products.RESERVE_SQL) on its own: it locks the
product rows and judges stock on their latest versions, never on its snapshot."""

from __future__ import annotations

import asyncio

from orders.db import products
from tests.conftest import make_product


async def test_a_waiting_reservation_sees_the_stock_left_by_the_one_it_waited_for(client, db):
    """Two reservations of one row: the second waits for the first's lock and then
    judges the stock of the row as the first left it, not as its own snapshot saw it."""
    sku = await make_product(client, stock=5)
    async with db.acquire() as first, db.acquire() as second:
        tx1 = first.transaction()
        await tx1.start()
        assert [r["reserved"] for r in await products.reserve(first, [sku], [4])] == [True]
        tx2 = second.transaction()
        await tx2.start()
        waiting = asyncio.create_task(products.reserve(second, [sku], [3]))
        await asyncio.sleep(0.3)
        assert not waiting.done(), "the second reservation waits for the row lock"
        await tx1.commit()
        rows = await asyncio.wait_for(waiting, 5)
        assert [(r["reserved"], r["known"]) for r in rows] == [(False, True)]
        assert [r["reserved"] for r in await products.reserve(second, [sku], [1])] == [True]
        await tx2.commit()
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT stock FROM products WHERE sku = $1", sku) == 0

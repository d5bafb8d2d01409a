"""The reservation (orders_place(), migration 0007): an order is priced from the process's
price list; the reservation locks the product rows and judges stock and
terms on their latest versions, never on that snapshot."""

from __future__ import annotations

import asyncio

from tests.conftest import make_product, place


async def _order_racing_a_change(client, db, customer: str, sku: str, quantity: int, change: str):
    """Place an order while another transaction has changed the product row (`change`,
    uncommitted): once the order waits for the row lock, commit the change; the order's
    answer."""
    async with db.acquire() as other, db.acquire() as watcher:
        tx = other.transaction()
        await tx.start()
        await other.execute(change, sku)
        order = asyncio.create_task(place(client, customer, (sku, quantity)))
        for _ in range(200):  # until the order's reservation waits for the row
            if await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE '%orders_place(%' AND $1 = ANY(pg_blocking_pids(pid))",
                other.get_server_pid(),  # never another session's backend: the server is shared
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the order never waited for the product row")
        await tx.commit()
        return await asyncio.wait_for(order, 10)


async def test_stock_taken_while_an_order_waits_is_judged_on_the_latest_row(client, db):
    """The snapshot says 5 in stock; another transaction takes 4 and commits while the
    order waits for the row: the order (3) is refused and writes nothing."""
    sku = await make_product(client, stock=5)
    take = "UPDATE products SET stock = stock - 4, version = version + 1 WHERE sku = $1"
    r = await _order_racing_a_change(client, db, "cust-latest", sku, 3, take)
    assert r.status_code == 409, r.text
    assert r.json()["type"].endswith("/insufficient-stock") and r.json()["skus"] == [sku]
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT stock FROM products WHERE sku = $1", sku) == 1
        assert await conn.fetchval("SELECT count(*) FROM orders WHERE customer_id = 'cust-latest'") == 0
        assert await conn.fetchval("SELECT count(*) FROM order_items WHERE sku = $1", sku) == 0


async def test_an_order_priced_before_a_price_change_is_placed_at_the_new_price(client, db):
    """Staff change a price while an order waits to reserve that product: the order is
    not placed at the old price; it is placed again and answers the new one."""
    sku = await make_product(client, stock=10, price=100, name="Cup")
    reprice = "UPDATE products SET unit_price = 150, version = version + 1 WHERE sku = $1"
    r = await _order_racing_a_change(client, db, "cust-reprice", sku, 2, reprice)
    assert r.status_code == 201, r.text
    assert r.json()["items"][0]["unit_price"] == 150 and r.json()["total"] == 300
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT stock FROM products WHERE sku = $1", sku) == 8
        assert await conn.fetchval("SELECT count(*) FROM orders WHERE customer_id = 'cust-reprice'") == 1
        items = await conn.fetch(
            "SELECT i.unit_price FROM order_items i JOIN orders o ON o.id = i.order_id WHERE o.customer_id = 'cust-reprice'"
        )
        assert [i["unit_price"] for i in items] == [150]
    assert (await client.get(f"/v1/products/{sku}")).json()["stock"] == 8


async def test_an_order_priced_from_a_stale_price_list_is_placed_at_the_current_terms(client, db):
    """The process prices from its price list (orders/service/price_list.py); a change it
    did not make (another replica's staff request, here straight in the database) is
    caught by orders_place() on the locked row, and the order answers the current terms."""
    sku = await make_product(client, stock=10, price=100, name="Cup")
    assert (await place(client, "cust-stale", (sku, 1))).status_code == 201  # the price list holds 100
    async with db.acquire() as conn:
        await conn.execute(
            "UPDATE products SET unit_price = 120, name = 'Big cup', version = version + 1 WHERE sku = $1", sku
        )
    r = await place(client, "cust-stale", (sku, 2))
    assert r.status_code == 201, r.text
    item = r.json()["items"][0]
    assert (item["name"], item["unit_price"], r.json()["total"]) == ("Big cup", 120, 240)
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT stock FROM products WHERE sku = $1", sku) == 7
        assert await conn.fetchval(
            "SELECT count(*) FROM orders WHERE customer_id = 'cust-stale' AND total = 240"
        ) == 1


async def test_concurrent_orders_priced_from_a_stale_price_list_are_all_placed_at_the_current_price(client, db):
    """30 customers order at once a product whose price changed behind the process's
    back: each order is corrected by orders_place() (none at the old price), the stock
    goes down by exactly what was placed, and nothing is oversold."""
    sku = await make_product(client, stock=25, price=100)
    assert (await place(client, "cust-stale-rush-0", (sku, 1))).status_code == 201  # the list holds 100
    async with db.acquire() as conn:
        await conn.execute("UPDATE products SET unit_price = 130, version = version + 1 WHERE sku = $1", sku)
    results = await asyncio.gather(*(place(client, f"cust-stale-rush-{i}", (sku, 1)) for i in range(1, 31)))
    placed = [r for r in results if r.status_code == 201]
    assert len(placed) == 24, [r.status_code for r in results]  # 25 in stock, one taken before
    assert all(r.json()["total"] == 130 for r in placed)
    assert all(r.status_code == 409 and r.json()["type"].endswith("/insufficient-stock")
               for r in results if r.status_code != 201)
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT stock FROM products WHERE sku = $1", sku) == 0
        assert await conn.fetchval(
            "SELECT count(*) FROM order_items WHERE sku = $1 AND unit_price = 130", sku
        ) == 24

"""Order events on NATS JetStream: a real nats-server per test (its own port and store, never
the machine's 4222, where a stream may own `orders.>`), the real app, its outbox and relay."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.js.errors
import pytest

from orders.dev.nats import EmbeddedNats
from tests.conftest import ADMIN, auth, make_product, order_body, place, running_app, stream_messages, wait_for
from tests.server import ServerProcess


@pytest.fixture
def nats_server(tmp_path: Path):
    with EmbeddedNats(tmp_path) as server:
        yield server


@pytest.fixture
def events_settings(make_settings: Any, isolated_db: str, nats_server: EmbeddedNats) -> Any:
    def make(**overrides: Any) -> Any:
        values = {
            "database_url": isolated_db,
            "nats_url": nats_server.url,
            "relay_interval_s": 0.2,
            "relay_backoff_max_s": 1.0,
            "relay_lease_s": 10.0,
            "nats_connect_timeout_s": 1.0,
            "nats_publish_timeout_s": 2.0,
            **overrides,
        }
        return make_settings(**values)

    return make


async def published(url: str, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    async def enough() -> list[dict[str, Any]] | None:
        messages = await stream_messages(url)
        return messages if len(messages) >= n else None

    return await wait_for(enough, timeout=timeout, interval=0.2)


async def set_status(client: httpx.AsyncClient, oid: str, status: str, headers: dict[str, str] = ADMIN) -> dict[str, Any]:
    r = await client.post(f"/v1/orders/{oid}/status", headers=headers, json={"status": status})
    assert r.status_code == 200, r.text
    return r.json()


async def pending_events(pool: Any) -> int:
    async with pool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM outbox WHERE kind = 'event' AND status = 'pending'")


async def test_every_change_is_a_cloudevent_with_its_id_as_nats_msg_id(events_settings, nats_server, isolated_pool):
    async with running_app(events_settings()) as client:
        sku = await make_product(client)
        r = await place(client, "cust-ev-1", (sku, 2))
        assert r.status_code == 201
        oid = r.json()["id"]
        await set_status(client, oid, "paid")
        shipped = await set_status(client, oid, "shipped")
        gone = (await place(client, "cust-ev-2", (sku, 1))).json()["id"]
        r = await client.post(f"/v1/orders/{gone}/cancel", headers=auth("cust-ev-2"))
        assert r.status_code == 200, r.text
        by_staff = (await place(client, "cust-ev-3", (sku, 1))).json()["id"]
        await set_status(client, by_staff, "cancelled")
        messages = await published(nats_server.url, 7)
        current = {o: (await client.get(f"/v1/orders/{o}", headers=ADMIN)).json() for o in (oid, gone, by_staff)}

    assert len(messages) == 7
    mine = [m for m in messages if m["event"]["subject"] == oid]
    assert [m["event"]["type"] for m in mine] == ["order.created", "order.paid", "order.shipped"]
    for m in messages:
        e = m["event"]
        assert m["subject"] == "orders." + e["type"]
        assert m["msg_id"] == e["id"] == f"{e['subject']}.{e['data']['version']}"
        assert e["specversion"] == "1.0" and e["datacontenttype"] == "application/json"
        assert e["source"] == "/orders"
        assert e["time"] == e["data"]["updated_at"]
    # data is the order as GET shows it after that change
    assert mine[-1]["event"]["data"] == current[oid] == shipped
    assert [m["event"]["data"]["status"] for m in mine] == ["pending", "paid", "shipped"]
    cancels = {m["event"]["subject"]: m["event"]["data"] for m in messages if m["event"]["type"] == "order.cancelled"}
    assert cancels[gone].pop("reason") == "customer" and cancels[gone] == current[gone]
    assert cancels[by_staff].pop("reason") == "staff" and cancels[by_staff] == current[by_staff]
    assert "reason" not in mine[0]["event"]["data"]
    assert await pending_events(isolated_pool) == 0


def test_the_service_says_at_start_that_events_are_off_without_nats_url(base_env, isolated_db, tmp_path):
    with ServerProcess({**base_env, "ORDERS_DATABASE_URL": isolated_db}, tmp_path) as server:
        pass
    assert [line["detail"] for line in server.logs() if line.get("event") == "events_off"] == [
        "ORDERS_NATS_URL is not set: no order events are published"
    ]


async def test_events_off_without_nats_url(make_settings, isolated_db, isolated_pool):
    async with running_app(make_settings(database_url=isolated_db)) as client:
        sku = await make_product(client)
        oid = (await place(client, "cust-ev-off", (sku, 1))).json()["id"]
        await set_status(client, oid, "paid")
    async with isolated_pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE kind = 'event'") == 0


async def test_nats_down_orders_go_on_and_every_event_is_published_once_in_version_order(
    events_settings, nats_server, isolated_pool
):
    nats_server.stop()
    async with running_app(events_settings()) as client:
        r = await client.get("/readyz")
        assert r.status_code == 200, r.text  # an outage delays events, it does not stop orders
        sku = await make_product(client)
        oids = []
        for i in range(6):
            r = await place(client, f"cust-ev-down-{i}", (sku, 1))
            assert r.status_code == 201, r.text
            oid = r.json()["id"]
            oids.append(oid)
            # Three events of one order pending at once: only the claim's guard keeps them in order.
            await set_status(client, oid, "paid")
            await set_status(client, oid, "shipped" if i % 2 else "cancelled")
        assert (await client.get("/readyz")).status_code == 200
        await asyncio.sleep(1.5)  # several relay passes and retries fail meanwhile
        assert await pending_events(isolated_pool) == 18
        async with isolated_pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE kind = 'event' AND status = 'failed'") == 0
        metrics = (await client.get("/metrics")).text
        assert 'orders_notifications_failed_total{final="false",kind="event"}' in metrics

        nats_server.start()  # same port, same store
        messages = await published(nats_server.url, 18, timeout=30)
        await wait_for(lambda: _zero(isolated_pool), timeout=10)

    ids = [m["event"]["id"] for m in messages]
    assert len(ids) == 18 and len(set(ids)) == 18
    for oid in oids:
        versions = [m["event"]["data"]["version"] for m in messages if m["event"]["subject"] == oid]
        assert versions == [1, 2, 3], (oid, versions)


async def _zero(pool: Any) -> bool:
    return await pending_events(pool) == 0


async def test_two_instances_publish_each_event_once(events_settings, nats_server, isolated_pool):
    # A plain subscriber sees every publish, also those JetStream drops as duplicates:
    # it proves the relays did not both publish a row (the stream alone would hide it).
    nc = await nats.connect(nats_server.url, connect_timeout=2)
    seen: list[str] = []

    async def on_msg(msg: Any) -> None:
        seen.append(msg.headers["Nats-Msg-Id"])

    await nc.subscribe("orders.>", cb=on_msg)
    try:
        async with running_app(events_settings()) as a, running_app(events_settings(migrate_on_start=False)) as b:
            sku = await make_product(a, stock=1000)

            async def one(i: int) -> None:
                client = (a, b)[i % 2]
                r = await place(client, f"cust-ev-two-{i}", (sku, 1))
                assert r.status_code == 201, r.text
                await set_status((b, a)[i % 2], r.json()["id"], "paid")

            await asyncio.gather(*(one(i) for i in range(20)))
            messages = await published(nats_server.url, 40, timeout=30)
            await wait_for(lambda: _zero(isolated_pool), timeout=10)
            await asyncio.sleep(1)  # a second publish of a row would arrive by now
        await nc.flush()
    finally:
        await nc.close()
    assert len(messages) == 40
    counts = Counter(seen)
    assert len(counts) == 40 and set(counts.values()) == {1}, counts.most_common(3)


async def test_sigkill_after_201_with_nats_down_the_next_process_publishes(
    base_env, isolated_db, isolated_pool, nats_server, tmp_path
):
    env = {**base_env, "ORDERS_DATABASE_URL": isolated_db, "ORDERS_NATS_URL": nats_server.url,
           "ORDERS_RELAY_INTERVAL_S": "0.2", "ORDERS_RELAY_BACKOFF_MAX_S": "1"}
    nats_server.stop()  # the fast path cannot publish: only the outbox row is left
    first = ServerProcess(env, tmp_path, name="first")
    with first:
        sku = f"P-{uuid.uuid4().hex[:10]}"
        r = httpx.put(f"{first.url}/v1/products/{sku}", headers=ADMIN, timeout=10,
                      json={"name": "Mug", "unit_price": 1299, "currency": "USD", "stock": 10})
        assert r.status_code == 201, r.text
        r = httpx.post(f"{first.url}/v1/orders", headers={**auth("cust-ev-kill"), "Idempotency-Key": "k1"},
                       json=order_body((sku, 1)), timeout=10)
        assert r.status_code == 201, r.text
        first.signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
    oid = r.json()["id"]
    assert await pending_events(isolated_pool) == 1
    nats_server.start()
    with ServerProcess(env, tmp_path, name="second"):
        messages = await published(nats_server.url, 1, timeout=30)
    assert [(m["msg_id"], m["subject"]) for m in messages] == [(f"{oid}.1", "orders.order.created")]
    assert messages[0]["event"]["data"] == r.json()


async def test_publishing_an_event_publishes_the_order_events_its_fast_path_had_to_leave(
    events_settings, nats_server, isolated_pool
):
    # The fast path of a change finds the previous event of its order still pending and
    # leaves its own row; once that one is published, the relay takes the next at once
    # rather than waiting for the row to come due.
    nats_server.stop()
    async with running_app(events_settings(relay_interval_s=60)) as client:
        res = client.app.state.res  # type: ignore[attr-defined]
        sku = await make_product(client)
        oid = (await place(client, "cust-ev-next", (sku, 1))).json()["id"]
        await set_status(client, oid, "paid")
        await set_status(client, oid, "shipped")
        await asyncio.sleep(0.3)  # the fast paths ran (and failed, or left their rows)
        async with isolated_pool.acquire() as conn:
            ids = await conn.fetchval(
                "WITH u AS (UPDATE outbox SET next_attempt_at = now() + interval '1 hour', claimed_until = NULL"
                " WHERE kind = 'event' AND order_id = $1 RETURNING id) SELECT array_agg(id ORDER BY id) FROM u",
                uuid.UUID(oid),
            )
        assert len(ids) == 3
        nats_server.start()
        await wait_for(lambda: res.events.connected, timeout=15)
        res.relay.dispatch(ids[:1])  # the first event only: none of them is due
        messages = await published(nats_server.url, 3, timeout=15)
    assert [m["msg_id"] for m in messages] == [f"{oid}.1", f"{oid}.2", f"{oid}.3"]

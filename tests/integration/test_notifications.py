"""Notifications that are never lost (issue: BackgroundTasks + transactional outbox)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from orders.dev.process import free_port
from orders.dev.smtp import SmtpSink
from tests.conftest import ADMIN, auth, make_product, place, running_app, wait_for


def _by_id(sink: SmtpSink, message_id: str) -> list:
    return [m for m in list(sink.messages) if m["Message-ID"] == message_id]


async def test_confirmation_arrives_once_and_cancel_sends_another(client, smtp, db):
    sku = await make_product(client, stock=10, price=1299, name="Mug")
    r = await place(client, "cust-mail", (sku, 2), email="mail-test@example.com")
    assert r.status_code == 201
    oid = r.json()["id"]
    created_id = f"<order-{oid}.created@orders>"
    [msg] = await wait_for(lambda: _by_id(smtp, created_id))
    assert msg["To"] == "mail-test@example.com" and msg["From"] == "orders@example.com"
    text = msg.get_body(("plain",)).get_content()
    assert oid in text and "25.98 USD" in text and "2 x Mug" in text
    html = msg.get_body(("html",)).get_content()
    assert oid in html

    r = await client.post(f"/v1/orders/{oid}/cancel", headers=auth("cust-mail"))
    assert r.status_code == 200
    cancelled_id = f"<order-{oid}.cancelled@orders>"
    [cancel_msg] = await wait_for(lambda: _by_id(smtp, cancelled_id))
    assert "cancelled" in cancel_msg["Subject"]

    await asyncio.sleep(1.5)  # several relay passes: nothing is sent twice
    assert len(_by_id(smtp, created_id)) == 1 and len(_by_id(smtp, cancelled_id)) == 1

    async def delivered() -> bool:
        async with db.acquire() as conn:
            return await conn.fetchval(
                "SELECT bool_and(status = 'sent') AND count(*) = 4 FROM outbox WHERE order_id = $1", oid)

    await wait_for(delivered)
    async with db.acquire() as conn:
        audit = await conn.fetch("SELECT actor, action, before, after FROM audit_log WHERE order_id = $1 ORDER BY id", oid)
    assert [(a["action"], a["actor"]) for a in audit] == [("order.created", "cust-mail"), ("order.cancelled", "cust-mail")]
    assert audit[1]["before"]["status"] == "pending" and audit[1]["after"]["status"] == "cancelled"
    events = (await client.get(f"/v1/orders/{oid}/events", headers=auth("cust-mail"))).json()["items"]
    sent = [e["data"]["message_id"] for e in events if e["type"] == "notification.sent"]
    assert sorted(sent) == sorted([created_id, cancelled_id])


async def test_shipping_sends_an_email_and_paid_does_not(client, smtp):
    sku = await make_product(client, stock=10)
    oid = (await place(client, "cust-ship", (sku, 1))).json()["id"]
    for status in ("paid", "shipped", "delivered"):
        r = await client.post(f"/v1/orders/{oid}/status", headers=ADMIN, json={"status": status})
        assert r.status_code == 200
    await wait_for(lambda: _by_id(smtp, f"<order-{oid}.shipped@orders>"))
    await asyncio.sleep(1)
    assert not _by_id(smtp, f"<order-{oid}.paid@orders>") and not _by_id(smtp, f"<order-{oid}.delivered@orders>")


async def test_smtp_down_then_back_on_the_same_port(make_settings, isolated_db):
    port = free_port()  # nothing listens there yet
    settings = make_settings(database_url=isolated_db, smtp_port=port, relay_interval_s=0.2, relay_backoff_max_s=2)
    async with running_app(settings) as c:
        sku = await make_product(c, stock=50)
        ids = []
        for i in range(5):
            start = time.monotonic()
            r = await place(c, f"cust-smtp-down-{i}", (sku, 1))
            assert r.status_code == 201
            assert time.monotonic() - start < 2, "an SMTP outage must not delay the answer"
            ids.append(r.json()["id"])
        await asyncio.sleep(1)
        sink = SmtpSink(port=port)
        sink.start()
        try:
            expected = {f"<order-{oid}.created@orders>" for oid in ids}
            await wait_for(lambda: expected <= {m["Message-ID"] for m in sink.messages}, timeout=60)
            await asyncio.sleep(1)
            counts = Counter(m["Message-ID"] for m in sink.messages)
            assert all(counts[mid] == 1 for mid in expected)
        finally:
            sink.stop()


async def test_two_instances_send_each_email_exactly_once(make_settings, isolated_db, isolated_pool):
    sink = SmtpSink()
    sink.start()
    try:
        settings = make_settings(database_url=isolated_db, smtp_port=sink.port, relay_interval_s=0.1)
        async with running_app(settings) as a, running_app(settings) as b:
            sku = await make_product(a, stock=1000)
            results = await asyncio.gather(*(
                place(a if i % 2 else b, f"cust-two-{i}", (sku, 1)) for i in range(70)
            ))
            assert [r.status_code for r in results] == [201] * 70
            expected = {f"<order-{r.json()['id']}.created@orders>" for r in results}
            await wait_for(lambda: expected <= {m["Message-ID"] for m in sink.messages}, timeout=60)
            await asyncio.sleep(1.5)  # both relays keep polling: still no duplicate
        counts = Counter(m["Message-ID"] for m in sink.messages)
        assert {mid: n for mid, n in counts.items() if n > 1} == {}
        assert len(counts) == 70
        async with isolated_pool.acquire() as conn:
            ids = [r.json()["id"] for r in results]
            assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE order_id = ANY($1::uuid[])", ids) == 70
    finally:
        sink.stop()


async def test_rows_past_the_fast_path_queue_are_delivered_by_the_relay(make_settings, isolated_db, isolated_pool):
    """A fast-path queue of 2 rows (one order's): most of 40 concurrent orders overflow
    it, and the relay still delivers each email and audit entry exactly once."""
    sink = SmtpSink()
    sink.start()
    try:
        settings = make_settings(database_url=isolated_db, smtp_port=sink.port, relay_interval_s=0.1, notify_queue_max=2)
        async with running_app(settings) as c:
            sku = await make_product(c, stock=1000)
            results = await asyncio.gather(*(place(c, f"cust-bp-{i}", (sku, 1)) for i in range(40)))
            assert [r.status_code for r in results] == [201] * 40
            expected = {f"<order-{r.json()['id']}.created@orders>" for r in results}
            await wait_for(lambda: expected <= {m["Message-ID"] for m in sink.messages}, timeout=60)
        counts = Counter(m["Message-ID"] for m in sink.messages)
        assert {mid: n for mid, n in counts.items() if n > 1} == {}
        async with isolated_pool.acquire() as conn:
            ids = [r.json()["id"] for r in results]
            assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE order_id = ANY($1::uuid[])", ids) == 40
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE status <> 'sent'") == 0
            # Rows past the queue waited for the relay (it leaves them to the fast path for
            # FAST_PATH_HEAD_START_S = 5 s): so the overflow did happen and the relay took it.
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at - created_at > interval '4 s'") > 0
    finally:
        sink.stop()


async def test_a_failing_row_gives_up_after_the_cap_and_is_counted(make_settings, isolated_db, isolated_pool):
    settings = make_settings(database_url=isolated_db, smtp_port=free_port(), relay_interval_s=0.1, relay_backoff_max_s=0.2, relay_max_attempts=3)
    async with running_app(settings) as c:
        sku = await make_product(c, stock=5)
        oid = (await place(c, "cust-giveup", (sku, 1))).json()["id"]

        async def failed() -> bool:
            async with isolated_pool.acquire() as conn:
                return await conn.fetchval(
                    "SELECT status = 'failed' AND attempts = 3 FROM outbox WHERE order_id = $1 AND kind = 'email'", oid)

        await wait_for(failed, timeout=30)
        metrics = (await c.get("/metrics")).text
        assert 'orders_notifications_failed_total{final="true",kind="email"}' in metrics
        async with isolated_pool.acquire() as conn:
            # The audit entry did not depend on SMTP and was delivered.
            assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE order_id = $1", oid) == 1


@pytest.mark.parametrize("n", [1])
async def test_audit_log_is_append_only(db, client, n):
    sku = await make_product(client)
    oid = (await place(client, "cust-append", (sku, n))).json()["id"]

    async def has_audit() -> bool:
        async with db.acquire() as conn:
            return await conn.fetchval("SELECT count(*) FROM audit_log WHERE order_id = $1", oid) == 1

    await wait_for(has_audit)
    async with db.acquire() as conn:
        with pytest.raises(Exception, match="append-only"):
            await conn.execute("UPDATE audit_log SET actor = 'x' WHERE order_id = $1", oid)
        with pytest.raises(Exception, match="append-only"):
            await conn.execute("DELETE FROM audit_log WHERE order_id = $1", oid)


class SlowSink(SmtpSink):
    """Takes 0.4 s to accept each message."""

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(0.4)
        return await super().handle_DATA(server, session, envelope)


async def test_a_slow_smtp_server_never_gets_a_row_twice(make_settings, isolated_db):
    """A batch stops at half its lease, so no row is still being sent when another
    claimer may take it. SMTP is down while 8 orders are placed (their rows become due
    for the relays), then comes back slow (0.4 s a message) with a 1 s lease: two relays
    claim batches that would outlast the lease; nothing may be sent twice."""
    port = free_port()
    settings = make_settings(database_url=isolated_db, smtp_port=port, relay_lease_s=1.0,
                             relay_interval_s=0.1, relay_backoff_max_s=0.3, relay_max_attempts=50)
    sink = SlowSink(port=port)
    try:
        async with running_app(settings) as a, running_app(settings) as b:
            sku = await make_product(a, stock=100)
            results = await asyncio.gather(*(place(a if i % 2 else b, f"cust-slow-{i}", (sku, 1)) for i in range(8)))
            await asyncio.sleep(1)  # the fast path failed: the rows are due for the relays
            sink.start()
            expected = {f"<order-{r.json()['id']}.created@orders>" for r in results}
            await wait_for(lambda: expected <= {m["Message-ID"] for m in sink.messages}, timeout=60)
            await asyncio.sleep(1.5)
        counts = Counter(m["Message-ID"] for m in sink.messages)
        assert {mid: n for mid, n in counts.items() if n > 1} == {}
    finally:
        sink.stop()

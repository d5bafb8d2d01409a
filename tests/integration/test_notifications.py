"""Notifications that are never lost (issue: BackgroundTasks + transactional outbox)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import asyncpg
import httpx
import pytest

from orders.dev.process import free_port
from orders.dev.smtp import SmtpSink
from tests.conftest import (
    ADMIN,
    ScriptedSink,
    auth,
    make_product,
    metric_sample,
    order_body,
    place,
    running_app,
    wait_for,
    wait_until,
)
from tests.server import ServerProcess


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


async def test_paid_and_shipped_send_an_email_and_delivered_does_not(client, smtp):
    sku = await make_product(client, stock=10)
    oid = (await place(client, "cust-ship", (sku, 1))).json()["id"]
    for status in ("paid", "shipped", "delivered"):
        r = await client.post(f"/v1/orders/{oid}/status", headers=ADMIN, json={"status": status})
        assert r.status_code == 200
    await wait_for(lambda: _by_id(smtp, f"<order-{oid}.shipped@orders>"))
    paid = await wait_for(lambda: _by_id(smtp, f"<order-{oid}.paid@orders>"))
    assert len(paid) == 1 and paid[0]["Subject"] == f"Payment received for your order {oid[:8]}"
    await asyncio.sleep(1)
    assert not _by_id(smtp, f"<order-{oid}.delivered@orders>")


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


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    return metric_sample(text, name, **labels) or 0.0


async def test_a_permanent_failure_is_final_at_once_a_transient_one_never(make_settings, isolated_db, isolated_pool):
    """550 to a recipient is final after its first attempt (it used to be retried ten
    times); 450 is retried again and again; a good address in between is delivered all along."""
    sink = ScriptedSink({"refused@example.com": ("550 5.1.1 no such user", None), "busy@example.com": ("450 4.2.1 try later", None)})
    sink.start()
    try:
        settings = make_settings(database_url=isolated_db, smtp_port=sink.port, relay_interval_s=0.1,
                                 relay_backoff_max_s=0.2)
        async with running_app(settings) as c:
            # The counters belong to this test process, which runs other apps too.
            before = (await c.get("/metrics")).text
            sku = await make_product(c, stock=5)
            refused, busy, good = [
                (await place(c, f"cust-giveup-{i}", (sku, 1), email=email)).json()["id"]
                for i, email in enumerate(["refused@example.com", "busy@example.com", "good@example.com"])
            ]

            async def email_row(oid: str):
                async with isolated_pool.acquire() as conn:
                    return await conn.fetchrow(
                        "SELECT status, attempts, last_error FROM outbox WHERE order_id = $1 AND kind = 'email'", oid)

            async def settled() -> bool:
                return (await email_row(refused))["status"] == "failed" and (await email_row(busy))["attempts"] >= 6

            await wait_for(settled, timeout=30)
            final = await email_row(refused)
            assert final["attempts"] == 1 and "550" in final["last_error"]
            assert (await email_row(busy))["status"] == "pending"
            assert (await email_row(good))["status"] == "sent"
            assert _by_id(sink, f"<order-{good}.created@orders>")
            after = (await c.get("/metrics")).text

            def failed(final: str) -> float:
                name = "orders_notifications_failed_total"
                return _metric(after, name, kind="email", final=final) - _metric(before, name, kind="email", final=final)

            assert failed("true") == 1
            assert failed("false") >= 5  # the 450 every time
            async with isolated_pool.acquire() as conn:
                # The audit entries did not depend on SMTP and were delivered.
                assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE order_id = ANY($1::uuid[])",
                                           [refused, busy, good]) == 3
    finally:
        sink.stop()


def test_an_smtp_outage_past_the_old_give_up_loses_no_email(base_env, isolated_db, tmp_path):
    """`orders serve` with a 0.5 s backoff cap: the relay used to fail every row for good at
    its 2nd attempt (under a cap of 2 attempts, a setting since removed), about 2 s into an
    outage. SMTP stays down until each row has had 6 attempts, then comes back on the same
    port: every email arrives, exactly once, and nothing was ever final."""
    port = free_port()  # nothing listens there yet
    server = ServerProcess(base_env, tmp_path, ORDERS_DATABASE_URL=isolated_db, ORDERS_SMTP_PORT=str(port),
                           ORDERS_RELAY_BACKOFF_MAX_S="0.5",
                           ORDERS_RELAY_INTERVAL_S="0.2", ORDERS_SMTP_TIMEOUT_S="2")
    sink = SmtpSink(port=port)

    async def email_rows() -> list:
        conn = await asyncpg.connect(isolated_db)
        try:
            return await conn.fetch("SELECT status, attempts FROM outbox WHERE kind = 'email'")
        finally:
            await conn.close()

    with server, httpx.Client(base_url=server.url, timeout=10) as c:
        sku = f"T-{uuid.uuid4().hex[:12]}"
        r = c.put(f"/v1/products/{sku}", headers=ADMIN, json={"name": "Mug", "unit_price": 100, "currency": "USD", "stock": 50})
        assert r.status_code == 201
        ids = []
        for i in range(6):
            r = c.post("/v1/orders", headers={**auth(f"cust-outage-{i}"), "Idempotency-Key": uuid.uuid4().hex},
                       json=order_body((sku, 1)))
            assert r.status_code == 201
            ids.append(r.json()["id"])

        def tried_past_the_old_give_up() -> bool:
            rows = asyncio.run(email_rows())
            assert [row["status"] for row in rows] == ["pending"] * 6, "an outage made a row final"
            return min(row["attempts"] for row in rows) >= 6

        wait_until(tried_past_the_old_give_up, timeout=60, interval=0.2, what="six attempts of every row")

        sink.start()
        try:
            expected = {f"<order-{oid}.created@orders>" for oid in ids}
            deadline = time.monotonic() + 30
            while not expected <= {m["Message-ID"] for m in sink.messages}:
                assert time.monotonic() < deadline, "not every email arrived after the outage"
                time.sleep(0.2)
            while {row["status"] for row in asyncio.run(email_rows())} != {"sent"}:
                assert time.monotonic() < deadline, "delivered rows not recorded as sent"
                time.sleep(0.2)
            time.sleep(1)  # more relay passes: still nothing twice
            counts = Counter(m["Message-ID"] for m in sink.messages)
            assert counts == Counter(expected)
            metrics = c.get("/metrics").text
            assert _metric(metrics, "orders_notifications_sent_total", kind="email") == 6
            assert _metric(metrics, "orders_notifications_failed_total", kind="email", final="true") == 0
            assert _metric(metrics, "orders_notifications_failed_total", kind="email", final="false") >= 6 * 5
        finally:
            sink.stop()


async def test_a_bad_address_mid_batch_fails_alone(make_settings, isolated_db, isolated_pool):
    """A row whose address cannot be sent (`ü@example.com`, accepted before placement refused
    it) between two good rows of one batch: both good rows are delivered in that batch's
    session, the bad one is failed. It used to break the session for the next row
    (UnicodeEncodeError after MAIL FROM, then "503 nested MAIL command")."""
    port = free_port()
    # The relay's own loop makes one pass at start, then sleeps: the test runs the batch.
    settings = make_settings(database_url=isolated_db, smtp_port=port, relay_interval_s=3600)
    sink = SmtpSink(port=port)
    try:
        async with running_app(settings) as c:
            sku = await make_product(c, stock=10)
            ids = [(await place(c, f"cust-batch-{i}", (sku, 1), email=f"batch-{i}@example.com")).json()["id"]
                   for i in range(3)]

            async def fast_path_failed() -> bool:  # SMTP was down: the rows wait for a retry
                async with isolated_pool.acquire() as conn:
                    return await conn.fetchval(
                        "SELECT count(*) FROM outbox WHERE kind = 'email' AND claimed_until IS NULL AND attempts = 1") == 3

            await wait_for(fast_path_failed)
            async with isolated_pool.acquire() as conn:
                await conn.execute(
                    """UPDATE outbox SET next_attempt_at = now() - interval '1 minute',
                              payload = CASE WHEN order_id = $1 THEN jsonb_set(payload, '{to}', '"ü@example.com"')
                                             ELSE payload END
                        WHERE kind = 'email'""",
                    ids[1],
                )
            sink.start()
            assert await c.app.state.res.relay.run_once() == (3, 2)  # one batch, one session
            assert [m["Message-ID"] for m in sink.messages] == [f"<order-{ids[0]}.created@orders>",
                                                                f"<order-{ids[2]}.created@orders>"]
            async with isolated_pool.acquire() as conn:
                rows = await conn.fetch("SELECT order_id::text, status, last_error FROM outbox WHERE kind = 'email'")
            by_order = {r["order_id"]: r for r in rows}
            assert [by_order[oid]["status"] for oid in ids] == ["sent", "failed", "sent"]
            assert "EmailSyntaxError" in by_order[ids[1]]["last_error"]
    finally:
        sink.stop()


async def test_placement_refuses_an_address_that_cannot_be_sent(client, smtp):
    """A non-ASCII local part needs SMTPUTF8: 422 at placement, never a 201 that cannot be
    kept. An internationalised domain is fine: stored as given, sent in its IDNA form."""
    sku = await make_product(client, stock=10)
    r = await place(client, "cust-idn", (sku, 1), email="ü@example.com")
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/validation-error")
    r = await place(client, "cust-idn", (sku, 1), email="käufer@bücher.de")
    assert r.status_code == 422
    r = await place(client, "cust-idn", (sku, 1), email="buyer@Bücher.de")
    assert r.status_code == 201, r.text
    assert r.json()["email"] == "buyer@bücher.de"
    [msg] = await wait_for(lambda: _by_id(smtp, f"<order-{r.json()['id']}.created@orders>"))
    assert msg["To"] == "buyer@xn--bcher-kva.de"


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
                             relay_interval_s=0.1, relay_backoff_max_s=0.3)
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

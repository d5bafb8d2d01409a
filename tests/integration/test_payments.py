"""POST /v1/payments/events (signed webhook of the payment provider), its staff listing,
and the expiry of unpaid orders: real PostgreSQL, Redis and SMTP, several app instances
on one database for the replica races."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import subprocess
import sys
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from orders.dev.smtp import SmtpSink
from orders.domain.signature import header
from tests.conftest import ADMIN, WEBHOOK_SECRET, auth, make_product, metric_sample, place, running_app, wait_for

pytestmark = pytest.mark.timeout(180)

ROTATED = "previous-webhook-secret-ZYXWVU-9876543210"


def event(order: dict[str, Any] | str, *, type: str = "payment.succeeded", **fields: Any) -> dict[str, Any]:
    """A provider event paying `order` in full (fields override)."""
    if isinstance(order, str):
        base: dict[str, Any] = {"order_id": order, "amount": 100, "currency": "USD"}
    else:
        base = {"order_id": order["id"], "amount": order["total"], "currency": order["currency"]}
    return {"id": f"evt_{uuid.uuid4().hex}", "type": type, **base, **fields}


def signed(body: dict[str, Any] | bytes, *, secret: str = WEBHOOK_SECRET, t: int | None = None) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    stamp = int(time.time()) if t is None else t
    return {"content": raw, "headers": {"Payment-Signature": header(secret, stamp, raw), "Content-Type": "application/json"}}


async def send(client: httpx.AsyncClient, body: dict[str, Any] | bytes, **kw: Any) -> httpx.Response:
    return await client.post("/v1/payments/events", **signed(body, **kw))


async def outcome(client: httpx.AsyncClient, body: dict[str, Any], **kw: Any) -> str:
    r = await send(client, body, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    return str(r.json()["outcome"])


async def new_order(client: httpx.AsyncClient, customer: str, *, stock: int = 10, qty: int = 1, **kw: Any) -> dict[str, Any]:
    sku = await make_product(client, stock=stock, **kw)
    r = await place(client, customer, (sku, qty))
    assert r.status_code == 201, r.text
    return dict(r.json())


async def timeline(client: httpx.AsyncClient, order_id: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/orders/{order_id}/events", headers=ADMIN)
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def recorded(pool: asyncpg.Pool, event_id: str) -> str | None:
    return await pool.fetchval("SELECT outcome FROM payment_events WHERE id = $1", event_id)


def metric(text: str, outcome_label: str) -> float:
    value = metric_sample(text, "orders_payment_events_total", outcome=outcome_label)
    assert value is not None, outcome_label
    return value


def assert_invalid_signature(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"] == "Payment-Signature"
    assert r.json()["type"].endswith("/invalid-signature")


# -- signature ---------------------------------------------------------------------------


async def test_a_missing_wrong_old_or_tampered_signature_is_401_and_records_nothing(client, db):
    order = await new_order(client, "pay-sig")
    body = event(order)
    raw = orjson.dumps(body)
    now = int(time.time())
    tampered = raw.replace(str(order["total"]).encode(), str(order["total"] + 1).encode())
    attempts = [
        client.post("/v1/payments/events", content=raw, headers={"Content-Type": "application/json"}),
        client.post("/v1/payments/events", content=raw, headers={"Payment-Signature": "t=1,v1=zz"}),
        send(client, body, secret="not-the-secret-of-this-service-0123456789"),
        send(client, body, t=now - 301),  # a replay of an old event
        send(client, body, t=now + 301),
        client.post("/v1/payments/events", content=tampered, headers=signed(raw)["headers"]),
        # An unsigned malformed body: 401, not 422 (nothing of it is looked at).
        client.post("/v1/payments/events", content=b"{nope", headers={"Payment-Signature": "t=1,v1=ab"}),
    ]
    for r in await asyncio.gather(*attempts):
        assert_invalid_signature(r)
    assert await recorded(db, body["id"]) is None
    got = await client.get(f"/v1/orders/{order['id']}", headers=ADMIN)
    assert got.json()["status"] == "pending" and got.headers["etag"] == '"1"'
    # The same event, well signed, is then handled as new.
    assert await outcome(client, body, t=now - 290) == "paid"


async def test_any_secret_of_a_rotation_verifies(make_settings, isolated_db, isolated_pool):
    settings = make_settings(database_url=isolated_db, payment_webhook_secret=f"{WEBHOOK_SECRET}, {ROTATED}")
    async with running_app(settings) as client:
        first, second = await new_order(client, "pay-rot"), await new_order(client, "pay-rot")
        assert await outcome(client, event(first), secret=ROTATED) == "paid"
        assert await outcome(client, event(second), secret=WEBHOOK_SECRET) == "paid"
        assert_invalid_signature(await send(client, event(second), secret=ROTATED[::-1]))
        # A header carrying one v1 per provider secret: any match passes.
        third = await new_order(client, "pay-rot")
        body = orjson.dumps(event(third))
        t = int(time.time())
        both = f"{header('unknown-provider-secret-0123456789-abcdef', t, body)},v1={header(ROTATED, t, body).split('v1=')[1]}"
        r = await client.post("/v1/payments/events", content=body, headers={"Payment-Signature": both})
        assert r.status_code == 200 and r.json() == {"outcome": "paid"}


async def test_a_malformed_body_under_a_valid_signature_is_422(client, db):
    order = await new_order(client, "pay-422")
    good = event(order)
    bad_bodies: list[dict[str, Any] | bytes] = [
        b"", b"{not json", b"[]",
        {**good, "order_id": "not-a-uuid"},
        {**good, "amount": "2598"},
        {**good, "amount": 25.98},
        {**good, "amount": -1},
        {**good, "currency": "XYZ"},
        {**good, "id": ""},
        {**good, "id": "x" * 256},
        {**good, "id": "caf\u00e9"},
        {**good, "type": ""},
        {k: v for k, v in good.items() if k != "type"},
    ]
    for body in bad_bodies:
        r = await send(client, body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["type"].endswith("/validation-error")
    assert await db.fetchval("SELECT count(*) FROM payment_events WHERE order_id = $1", uuid.UUID(order["id"])) == 0
    # Fields the provider adds are ignored, not refused (it would retry a 422 forever).
    assert await outcome(client, {**good, "livemode": False, "created": 1}) == "paid"


async def test_the_body_limit_applies_before_the_signature(make_settings, isolated_db):
    async with running_app(make_settings(database_url=isolated_db, max_body_bytes=1024)) as client:
        r = await send(client, {"id": "evt_big", "pad": "x" * 2000})
        assert r.status_code == 413 and r.json()["type"].endswith("/payload-too-large")


# -- outcomes ----------------------------------------------------------------------------


async def test_paid_goes_through_the_staff_change_path(client, db, smtp: SmtpSink):
    order = await new_order(client, "pay-ok", price=1250, qty=2)
    # Cached at version 1 first, so that a stale cache would show.
    assert (await client.get(f"/v1/orders/{order['id']}", headers=auth("pay-ok"))).headers["etag"] == '"1"'
    body = event(order)
    assert body["amount"] == 2500
    assert await outcome(client, body) == "paid"
    got = await client.get(f"/v1/orders/{order['id']}", headers=auth("pay-ok"))
    assert got.json()["status"] == "paid" and got.json()["version"] == 2 and got.headers["etag"] == '"2"'
    changes = [e for e in await timeline(client, order["id"]) if e["type"] == "order.status_changed"]
    assert len(changes) == 1 and changes[0]["actor"] == "payment-provider"
    assert changes[0]["data"] == {"from": "pending", "to": "paid", "payment_event_id": body["id"]}
    audit = await db.fetch(
        "SELECT payload FROM outbox WHERE order_id = $1 AND kind = 'audit' AND topic = 'order.status_changed'",
        uuid.UUID(order["id"]),
    )
    assert [(a["payload"]["actor"], a["payload"]["after"]["status"]) for a in audit] == [("payment-provider", "paid")]
    mails = await wait_for(lambda: [m for m in list(smtp.messages) if m["Message-ID"] == f"<order-{order['id']}.paid@orders>"])
    text = mails[0].get_body(("plain",)).get_content()
    assert "received your payment of 25.00 USD" in text
    assert await recorded(db, body["id"]) == "paid"
    # Paid frees the pending slot (the triggers of migration 0002).
    assert await db.fetchval("SELECT pending FROM customer_pending WHERE customer_id = 'pay-ok'") == 0
    # Staff can ship it as any paid order.
    shipped = await client.post(f"/v1/orders/{order['id']}/status", headers=ADMIN, json={"status": "shipped"})
    assert shipped.status_code == 200 and shipped.json()["version"] == 3


async def test_an_event_id_seen_before_is_a_duplicate_whatever_its_body(client, db):
    order, other = await new_order(client, "pay-dup"), await new_order(client, "pay-dup")
    body = event(order)
    assert await outcome(client, body) == "paid"
    assert await outcome(client, body) == "duplicate"
    # The same id naming another order, or another type: still the same event.
    assert await outcome(client, {**body, "order_id": other["id"], "amount": other["total"]}) == "duplicate"
    assert await outcome(client, {**body, "type": "payment.failed"}) == "duplicate"
    assert (await client.get(f"/v1/orders/{other['id']}", headers=ADMIN)).json()["status"] == "pending"
    got = (await client.get(f"/v1/orders/{order['id']}", headers=ADMIN)).json()
    assert got["version"] == 2
    assert await recorded(db, body["id"]) == "paid"


async def test_the_same_event_ten_times_at_once_takes_effect_once(client, db, smtp: SmtpSink):
    order = await new_order(client, "pay-burst")
    body = event(order)
    answers = await asyncio.gather(*(outcome(client, body) for _ in range(10)))
    assert sorted(answers) == ["duplicate"] * 9 + ["paid"]
    got = (await client.get(f"/v1/orders/{order['id']}", headers=ADMIN)).json()
    assert (got["status"], got["version"]) == ("paid", 2)
    assert [e["type"] for e in await timeline(client, order["id"])].count("order.status_changed") == 1
    oid = uuid.UUID(order["id"])
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE order_id = $1 AND topic = 'order.paid'", oid) == 1
    await wait_for(lambda: any(m["Message-ID"] == f"<order-{order['id']}.paid@orders>" for m in list(smtp.messages)))
    await asyncio.sleep(1)
    assert sum(m["Message-ID"] == f"<order-{order['id']}.paid@orders>" for m in list(smtp.messages)) == 1


async def test_the_same_event_at_once_on_two_replicas_takes_effect_once(make_settings, isolated_db, isolated_pool):
    settings = make_settings(database_url=isolated_db, cache_prefix=f"dup2-{secrets.token_hex(4)}:")
    async with running_app(settings) as one, running_app(settings) as two:
        orders = [await new_order(one, "pay-dup2") for _ in range(5)]
        for order in orders:
            body = event(order)
            answers = await asyncio.gather(*(outcome(c, body) for c in [one, two] * 4))
            assert sorted(answers) == ["duplicate"] * 7 + ["paid"], answers
            oid = uuid.UUID(order["id"])
            assert await isolated_pool.fetchval("SELECT version FROM orders WHERE id = $1", oid) == 2
            assert await isolated_pool.fetchval(
                "SELECT count(*) FROM outbox WHERE order_id = $1 AND topic = 'order.paid'", oid
            ) == 1
            # Each replica's cache has the paid order (the other's write, not a stale version 1).
            for client in (one, two):
                got = await client.get(f"/v1/orders/{order['id']}", headers=ADMIN)
                assert got.headers["etag"] == '"2"' and got.json()["status"] == "paid"


async def test_another_amount_or_currency_leaves_the_order_pending(client, db):
    order = await new_order(client, "pay-mismatch")
    before = metric((await client.get("/metrics")).text, "amount_mismatch")
    assert await outcome(client, event(order, amount=order["total"] - 1)) == "amount_mismatch"
    assert await outcome(client, event(order, currency="EUR")) == "amount_mismatch"
    assert metric((await client.get("/metrics")).text, "amount_mismatch") == before + 2
    got = await client.get(f"/v1/orders/{order['id']}", headers=ADMIN)
    assert got.json()["status"] == "pending" and got.headers["etag"] == '"1"'
    mismatches = [e for e in await timeline(client, order["id"]) if e["type"] == "payment.amount_mismatch"]
    assert len(mismatches) == 2 and mismatches[0]["actor"] == "payment-provider"
    assert mismatches[0]["data"]["amount"] == order["total"] - 1
    assert mismatches[0]["data"]["expected_amount"] == order["total"]
    assert mismatches[1]["data"]["currency"] == "EUR" and mismatches[1]["data"]["expected_currency"] == "USD"
    # The right payment still goes through.
    assert await outcome(client, event(order)) == "paid"


async def test_a_payment_of_a_cancelled_order_requires_a_refund(client, db):
    order = await new_order(client, "pay-refund")
    r = await client.post(f"/v1/orders/{order['id']}/cancel", headers=auth("pay-refund"))
    assert r.status_code == 200
    before = metric((await client.get("/metrics")).text, "refund_required")
    body = event(order)
    assert await outcome(client, body) == "refund_required"
    assert metric((await client.get("/metrics")).text, "refund_required") == before + 1
    got = (await client.get(f"/v1/orders/{order['id']}", headers=ADMIN)).json()
    assert (got["status"], got["version"]) == ("cancelled", 2)
    events = await timeline(client, order["id"])
    cancelled = [e for e in events if e["type"] == "order.cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["data"]["reason"] == "customer"
    refunds = [e for e in events if e["type"] == "payment.refund_required"]
    assert len(refunds) == 1 and refunds[0]["data"]["payment_event_id"] == body["id"]
    listed = (await client.get("/v1/payments/events?outcome=refund_required&limit=100", headers=ADMIN)).json()
    assert body["id"] in [i["id"] for i in listed["items"]]
    # A second payment of a paid order is money taken twice: a refund too.
    paid = await new_order(client, "pay-refund")
    assert await outcome(client, event(paid)) == "paid"
    assert await outcome(client, event(paid)) == "refund_required"
    assert (await client.get(f"/v1/orders/{paid['id']}", headers=ADMIN)).json()["version"] == 2


async def test_staff_cancellation_records_its_reason(client):
    order = await new_order(client, "pay-staff")
    r = await client.post(f"/v1/orders/{order['id']}/status", headers=ADMIN, json={"status": "cancelled"})
    assert r.status_code == 200
    cancelled = [e for e in await timeline(client, order["id"]) if e["type"] == "order.cancelled"]
    assert cancelled[0]["data"] == {"from": "pending", "to": "cancelled", "reason": "staff"}


async def test_a_failed_payment_is_recorded_and_the_customer_may_pay_again(client, db):
    order = await new_order(client, "pay-failed")
    body = event(order, type="payment.failed")
    assert await outcome(client, body) == "recorded"
    got = await client.get(f"/v1/orders/{order['id']}", headers=ADMIN)
    assert got.json()["status"] == "pending" and got.headers["etag"] == '"1"'
    failed = [e for e in await timeline(client, order["id"]) if e["type"] == "payment.failed"]
    assert len(failed) == 1 and failed[0]["data"]["payment_event_id"] == body["id"]
    assert await recorded(db, body["id"]) == "recorded"
    assert await outcome(client, event(order)) == "paid"


async def test_other_types_and_unknown_orders_are_ignored(client, db):
    order = await new_order(client, "pay-ignored")
    refund = event(order, type="charge.refunded")
    assert await outcome(client, refund) == "ignored"
    nobody = event(str(uuid.uuid4()))
    assert await outcome(client, nobody) == "ignored"
    assert await outcome(client, nobody) == "duplicate"  # recorded, so a redelivery is known
    got = await client.get(f"/v1/orders/{order['id']}", headers=ADMIN)
    assert got.json()["status"] == "pending" and got.headers["etag"] == '"1"'
    assert {e["type"] for e in await timeline(client, order["id"])} <= {"order.created", "notification.sent"}
    assert await recorded(db, refund["id"]) == "ignored"


# -- staff listing -----------------------------------------------------------------------


async def test_the_listing_is_for_staff_and_paginates_newest_first(make_settings, isolated_db):
    async with running_app(make_settings(database_url=isolated_db)) as client:
        assert (await client.get("/v1/payments/events")).status_code == 401
        r = await client.get("/v1/payments/events", headers=auth("pay-list"))
        assert r.status_code == 403 and r.json()["type"].endswith("/forbidden")
        # 401 and 403 come before the 422 of a bad parameter.
        assert (await client.get("/v1/payments/events?outcome=nope")).status_code == 401
        assert (await client.get("/v1/payments/events?outcome=nope", headers=auth("pay-list"))).status_code == 403
        for query in ("outcome=nope", "outcome=duplicate", "limit=0", "limit=101", "cursor=%%%"):
            r = await client.get(f"/v1/payments/events?{query}", headers=ADMIN)
            assert r.status_code == 422 and r.json()["type"].endswith("/validation-error"), query

        ids = []
        for _ in range(5):
            order = await new_order(client, "pay-list")
            assert (await client.post(f"/v1/orders/{order['id']}/cancel", headers=auth("pay-list"))).status_code == 200
            body = event(order)
            assert await outcome(client, body) == "refund_required"
            ids.append(body["id"])
        assert await outcome(client, event(await new_order(client, "pay-list"))) == "paid"

        seen, cursor = [], None
        while True:
            url = "/v1/payments/events?outcome=refund_required&limit=2" + (f"&cursor={cursor}" if cursor else "")
            page = (await client.get(url, headers=ADMIN)).json()
            assert len(page["items"]) <= 2
            seen += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert [i["id"] for i in seen] == ids[::-1]
        first = seen[-1]
        assert set(first) == {"id", "order_id", "type", "amount", "currency", "outcome", "received_at"}
        assert first["outcome"] == "refund_required" and first["type"] == "payment.succeeded"
        everything = (await client.get("/v1/payments/events?limit=100", headers=ADMIN)).json()["items"]
        assert Counter(i["outcome"] for i in everything) == {"refund_required": 5, "paid": 1}


# -- expiry ------------------------------------------------------------------------------


async def _order_state(pool: asyncpg.Pool, order_id: str) -> dict[str, Any]:
    oid = uuid.UUID(order_id)
    return {
        "status": await pool.fetchval("SELECT status FROM orders WHERE id = $1", oid),
        "events": [
            (r["type"], r["actor"], r["data"])
            for r in await pool.fetch("SELECT type, actor, data FROM order_events WHERE order_id = $1 ORDER BY id", oid)
        ],
        "topics": Counter(
            r["topic"] for r in await pool.fetch("SELECT topic FROM outbox WHERE order_id = $1 AND kind = 'email'", oid)
        ),
    }


async def test_an_unpaid_order_expires_once_with_two_replicas(make_settings, isolated_db, isolated_pool, smtp: SmtpSink):
    settings = make_settings(database_url=isolated_db, payment_timeout_s=1, cache_prefix=f"exp-{secrets.token_hex(4)}:")
    async with running_app(settings) as one, running_app(settings) as two:
        sku = await make_product(one, stock=50)
        placed = await asyncio.gather(*(place(c, f"exp-{i % 3}", (sku, 2)) for i, c in enumerate([one, two] * 10)))
        assert all(r.status_code == 201 for r in placed)
        orders = [r.json()["id"] for r in placed]
        # Read through the cache (version 1 unless expired already), so that a stale entry
        # would show after the expiry. (No assertion here: a slow machine may be past 1 s.)
        assert (await two.get(f"/v1/orders/{orders[0]}", headers=ADMIN)).status_code == 200

        async def all_cancelled() -> bool:
            statuses = await isolated_pool.fetch("SELECT status FROM orders WHERE id = ANY($1::uuid[])", orders)
            return all(r["status"] == "cancelled" for r in statuses)

        await wait_for(all_cancelled, timeout=15)
        await asyncio.sleep(1.5)  # more passes of both replicas: nothing happens twice
        assert (await one.get(f"/v1/products/{sku}")).json()["stock"] == 50
        got = await two.get(f"/v1/orders/{orders[0]}", headers=ADMIN)
        assert got.json()["status"] == "cancelled" and got.headers["etag"] == '"2"'
        for order_id in orders:
            state = await _order_state(isolated_pool, order_id)
            cancels = [e for e in state["events"] if e[0] == "order.cancelled"]
            assert cancels == [("order.cancelled", "system", {"from": "pending", "to": "cancelled", "reason": "payment_timeout"})]
            assert state["topics"] == {"order.created": 1, "order.cancelled": 1}
        audits = await isolated_pool.fetch("SELECT payload FROM outbox WHERE kind = 'audit' AND topic = 'order.cancelled'")
        assert len(audits) == len(orders) and {a["payload"]["actor"] for a in audits} == {"system"}
        assert await isolated_pool.fetchval("SELECT sum(pending) FROM customer_pending") == 0

        def cancellation_mails() -> list[Any]:
            wanted = {f"<order-{o}.cancelled@orders>" for o in orders}
            return [m for m in list(smtp.messages) if m["Message-ID"] in wanted]

        await wait_for(lambda: len(cancellation_mails()) == len(orders), timeout=15)
        await asyncio.sleep(1)
        assert Counter(m["Message-ID"] for m in cancellation_mails()).most_common(1)[0][1] == 1
        # A payment after the expiry: the money goes back.
        assert await outcome(one, event(orders[0], amount=2 * 1299)) == "refund_required"


async def test_payments_racing_the_expiry_never_leave_an_order_both_paid_and_cancelled(
    make_settings, isolated_db, isolated_pool
):
    initial, count = 500, 40
    settings = make_settings(database_url=isolated_db, payment_timeout_s=1, cache_prefix=f"race-{secrets.token_hex(4)}:")
    async with AsyncExitStack() as stack:
        one = await stack.enter_async_context(running_app(settings))
        two = await stack.enter_async_context(running_app(settings))
        sku = await make_product(one, stock=initial, price=1000)
        rng = random.Random(11)
        answers: dict[str, str] = {}

        async def buy_and_pay(i: int) -> None:
            client = (one, two)[i % 2]
            r = await place(client, f"race-{i % 5}", (sku, 1 + i % 3))
            assert r.status_code == 201, r.text
            order = r.json()
            # Around the deadline: some well before, most within a few passes of it.
            await asyncio.sleep(rng.uniform(0.5, 1.8))
            answers[order["id"]] = await outcome((two, one)[i % 2], event(order))

        await asyncio.gather(*(buy_and_pay(i) for i in range(count)))
        await asyncio.sleep(2.5)  # every order is past its deadline and seen by both replicas

        outcomes = Counter(answers.values())
        assert set(outcomes) <= {"paid", "refund_required"} and sum(outcomes.values()) == count
        reserved = 0
        for order_id, answer in answers.items():
            state = await _order_state(isolated_pool, order_id)
            types = [e[0] for e in state["events"]]
            paid = [e for e in state["events"] if e[0] == "order.status_changed" and e[2]["to"] == "paid"]
            cancelled = [e for e in state["events"] if e[0] == "order.cancelled"]
            if answer == "paid":
                assert state["status"] == "paid" and len(paid) == 1 and not cancelled, (order_id, types)
                reserved += await isolated_pool.fetchval(
                    "SELECT quantity FROM order_items WHERE order_id = $1", uuid.UUID(order_id)
                )
            else:
                assert state["status"] == "cancelled" and not paid and len(cancelled) == 1, (order_id, types)
                assert cancelled[0][2]["reason"] == "payment_timeout" and "payment.refund_required" in types
        stock = await isolated_pool.fetchval("SELECT stock FROM products WHERE sku = $1", sku)
        assert stock + reserved == initial
        # Both outcomes happened, or the race was not run (the sleeps straddle the deadline).
        assert outcomes["paid"] and outcomes["refund_required"], outcomes


# -- outages and start-up ----------------------------------------------------------------


async def test_database_down_answers_503_and_the_provider_retry_succeeds(make_settings, tmp_path):
    from orders.dev.postgres import EmbeddedPostgres
    from orders.dev.process import free_port
    from tests.integration.test_resilience_postgres import checkpoint

    pg = EmbeddedPostgres(tmp_path, port=free_port())
    pg.start()
    try:
        settings = make_settings(
            database_url=pg.dsn, db_pool_min=1, db_pool_max=5, cache_prefix=f"pay503-{secrets.token_hex(4)}:"
        )
        async with running_app(settings) as client:
            order = await new_order(client, "pay-503")
            body = event(order)
            await checkpoint(pg)
            pg.stop("immediate")
            r = await send(client, body)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
            assert r.json()["type"].endswith("/unavailable")
            pg.start()

            async def delivered() -> str | None:
                r = await send(client, body)
                assert r.status_code in (200, 503), r.text
                return r.json()["outcome"] if r.status_code == 200 else None

            assert await wait_for(delivered, timeout=30, interval=0.5) == "paid"
            assert await outcome(client, body) == "duplicate"
    finally:
        pg.stop("immediate")


@pytest.mark.parametrize("secret", [None, "short", f"{WEBHOOK_SECRET},weak"])
def test_the_service_refuses_to_start_without_a_strong_webhook_secret(base_env, tmp_path: Path, secret):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
    env.update({k: v for k, v in base_env.items() if k != "ORDERS_PAYMENT_WEBHOOK_SECRET"})
    if secret is not None:
        env["ORDERS_PAYMENT_WEBHOOK_SECRET"] = secret
    done = subprocess.run(
        [sys.executable, "-m", "orders", "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "ORDERS_PAYMENT_WEBHOOK_SECRET" in done.stderr and "Traceback" not in done.stderr

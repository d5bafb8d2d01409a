"""Notification operations (issue 14, item 2): permanent SMTP failures are final at once,
transient ones back off; staff list and re-queue outbox rows with `orders outbox` and
/v1/admin/notifications; a re-queued row is delivered once, also with two replicas."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from orders.dev.smtp import SmtpSink
from orders.notify import relay
from tests.conftest import ADMIN, ScriptedSink, auth, make_product, metric_sample, place, running_app, wait_for

REFUSED = "refused@example.com"


@pytest.fixture
def sink() -> Iterator[ScriptedSink]:
    """A sink that refuses REFUSED for good (550: final at the first attempt)."""
    with ScriptedSink({REFUSED: ("550 5.7.1 policy", None)}) as started:
        yield started


def _count(sink: SmtpSink, order_id: str) -> int:
    return sum(1 for m in list(sink.messages) if m["Message-ID"] == f"<order-{order_id}.created@orders>")


async def _email_row(pool, order_id: str):
    async with pool.acquire() as conn:
        return await conn.fetchrow(
            "SELECT id, status, attempts, last_error FROM outbox WHERE order_id = $1 AND kind = 'email'", order_id
        )


async def _failed_order(client, pool, customer: str, sku: str) -> tuple[str, int]:
    """An order whose confirmation email the sink refused for good: (order id, outbox id)."""
    oid = (await place(client, customer, (sku, 1), email=REFUSED)).json()["id"]
    row = await wait_for(lambda: _email_row(pool, oid))
    await wait_for(lambda: _status_is(pool, oid, "failed"))
    return oid, row["id"]


async def _status_is(pool, order_id: str, status: str) -> bool:
    row = await _email_row(pool, order_id)
    return row is not None and row["status"] == status


async def test_a_550_is_final_after_one_attempt_a_451_is_retried_then_delivered(make_settings, isolated_db, isolated_pool):
    sink = ScriptedSink({REFUSED: ("550 5.1.1 no such user", None), "later@example.com": ("451 4.3.0 try later", 3)})
    sink.start()
    try:
        settings = make_settings(database_url=isolated_db, smtp_port=sink.port, relay_interval_s=0.1,
                                 relay_backoff_max_s=0.2)
        async with running_app(settings) as c:
            sku = await make_product(c, stock=5)
            refused = (await place(c, "cust-550", (sku, 1), email=REFUSED)).json()["id"]
            later = (await place(c, "cust-451", (sku, 1), email="later@example.com")).json()["id"]
            await wait_for(lambda: _status_is(isolated_pool, later, "sent"), timeout=30)
            await asyncio.sleep(1)  # ten relay passes: the 550 row is not tried again
            final = await _email_row(isolated_pool, refused)
            assert (final["status"], final["attempts"]) == ("failed", 1) and "550" in final["last_error"]
            assert sink.refusals[REFUSED] == 1
            delivered = await _email_row(isolated_pool, later)
            assert delivered["attempts"] == 4 and sink.refusals["later@example.com"] == 3
            assert _count(sink, later) == 1 and _count(sink, refused) == 0
    finally:
        sink.stop()


async def _orders_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`python -m orders outbox ...` in a subprocess, without blocking the app's event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orders", "outbox", *args,
        env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_cli_lists_and_retries_failed_rows(base_env, make_settings, isolated_db, isolated_pool, sink):
    env = {**base_env, "ORDERS_DATABASE_URL": isolated_db}
    settings = make_settings(database_url=isolated_db, smtp_port=sink.port, relay_interval_s=0.1)
    async with running_app(settings) as c:
        sku = await make_product(c, stock=10)
        first, first_id = await _failed_order(c, isolated_pool, "cust-cli-1", sku)
        second, second_id = await _failed_order(c, isolated_pool, "cust-cli-2", sku)
        good = (await place(c, "cust-cli-3", (sku, 1))).json()["id"]
        await wait_for(lambda: _status_is(isolated_pool, good, "sent"))

        code, out, _ = await _orders_cli(env, "list", "--status", "failed")
        assert code == 0
        header, *lines = out.splitlines()
        assert header.split("\t") == ["id", "order_id", "kind", "status", "attempts", "last_error"]
        fields = [line.split("\t") for line in lines]
        assert [f[:5] for f in fields] == [[str(second_id), second, "email", "failed", "1"],
                                           [str(first_id), first, "email", "failed", "1"]]
        assert all("550" in f[5] for f in fields)
        code, out, _ = await _orders_cli(env, "list", "--order", good)
        assert sorted(line.split("\t")[2:4] for line in out.splitlines()[1:]) == [["audit", "sent"], ["email", "sent"]]
        code, _, err = await _orders_cli(env, "list", "--status", "lost")
        assert code == 2 and "invalid choice" in err

        del sink.replies[REFUSED]  # the policy was fixed
        code, out, err = await _orders_cli(env, "retry", str(first_id))
        assert (code, out.strip(), err) == (0, f"re-queued 1 row(s): {first_id}", "")
        await wait_for(lambda: _status_is(isolated_pool, first, "sent"))
        code, out, err = await _orders_cli(env, "retry", str(first_id), "999999")
        assert code == 1 and out.strip() == "re-queued 0 row(s)"
        assert f"{first_id}: not failed (sent)" in err and "999999: no such row" in err
        code, out, _ = await _orders_cli(env, "retry", "--all-failed")
        assert (code, out.strip()) == (0, f"re-queued 1 row(s): {second_id}")
        await wait_for(lambda: _status_is(isolated_pool, second, "sent"))
        await asyncio.sleep(0.5)  # relay passes: nothing twice
        assert _count(sink, first) == 1 and _count(sink, second) == 1
        code, _, err = await _orders_cli(env, "retry")
        assert code == 2 and "give row ids or --all-failed" in err
        code, _, err = await _orders_cli(env, "retry", "0", "99999999999999999999")
        assert code == 2 and "an integer from 1 to" in err


def _problem(r, status: int, slug: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"].endswith("/" + slug)
    return body


async def test_staff_list_and_retry_over_http(make_settings, isolated_db, isolated_pool, sink):
    settings = make_settings(database_url=isolated_db, smtp_port=sink.port, relay_interval_s=0.1)
    async with running_app(settings) as c:
        sku = await make_product(c, stock=10)
        failed = [await _failed_order(c, isolated_pool, f"cust-http-{i}", sku) for i in range(3)]
        path = "/v1/admin/notifications"

        # Staff only: 401 without a token, 403 for a customer, before any 422 or 404.
        assert (await c.get(path)).status_code == 401
        _problem(await c.get(path, headers=auth("cust-http-0")), 403, "forbidden")
        _problem(await c.get(path, params={"status": "lost"}, headers=auth("cust-http-0")), 403, "forbidden")
        _problem(await c.post(f"{path}/{failed[0][1]}/retry", headers=auth("cust-http-0")), 403, "forbidden")
        assert (await c.post(f"{path}/{failed[0][1]}/retry")).status_code == 401

        # Bad input: problem+json.
        for params, field in [({"status": "lost"}, "status"), ({"cursor": "%%%"}, "cursor"),
                              ({"order_id": "nope"}, "order_id"), ({"limit": "0"}, "limit")]:
            body = _problem(await c.get(path, params=params, headers=ADMIN), 422, "validation-error")
            assert [e["field"].removeprefix("query.") for e in body["errors"]] == [field], body
        for bad in ("abc", "0", "-1", "99999999999999999999", "424242"):
            _problem(await c.post(f"{path}/{bad}/retry", headers=ADMIN), 404, "not-found")

        # The failed rows, newest first, a page of 2 then the rest.
        r = await c.get(path, params={"status": "failed", "limit": 2}, headers=ADMIN)
        assert r.status_code == 200
        page = r.json()
        assert [i["id"] for i in page["items"]] == [failed[2][1], failed[1][1]]
        row = page["items"][0]
        assert set(row) == {"id", "order_id", "kind", "topic", "status", "attempts", "last_error",
                            "created_at", "next_attempt_at", "sent_at"}
        assert (row["order_id"], row["kind"], row["status"], row["attempts"], row["sent_at"]) == (
            failed[2][0], "email", "failed", 1, None)
        assert "550" in row["last_error"]
        rest = (await c.get(path, params={"status": "failed", "cursor": page["next_cursor"]}, headers=ADMIN)).json()
        assert [i["id"] for i in rest["items"]] == [failed[0][1]] and rest["next_cursor"] is None
        mine = (await c.get(path, params={"order_id": failed[0][0]}, headers=ADMIN)).json()["items"]
        assert sorted((i["kind"], i["status"]) for i in mine) == [("audit", "sent"), ("email", "failed")]

        del sink.replies[REFUSED]
        oid, row_id = failed[0]
        r = await c.post(f"{path}/{row_id}/retry", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (r.json()["id"], r.json()["status"], r.json()["attempts"]) == (row_id, "pending", 0)
        await wait_for(lambda: _status_is(isolated_pool, oid, "sent"))
        # Already sent: nothing to retry, nothing sent again.
        body = _problem(await c.post(f"{path}/{row_id}/retry", headers=ADMIN), 409, "invalid-transition")
        assert body["current_status"] == "sent"
        await asyncio.sleep(0.5)
        assert _count(sink, oid) == 1
        # Nor is any other row that is not `failed`.
        audit_id = next(i["id"] for i in mine if i["kind"] == "audit")
        assert (await c.post(f"{path}/{audit_id}/retry", headers=ADMIN)).json()["current_status"] == "sent"


async def test_a_retried_row_is_delivered_once_with_two_replicas(make_settings, isolated_db, isolated_pool, sink):
    """Two apps with their relays on one database; every failed row is retried on both at
    once: one of the two retries wins (200), the other answers 409, and each email arrives once."""
    settings = make_settings(database_url=isolated_db, smtp_port=sink.port, relay_interval_s=0.05)
    async with running_app(settings) as a, running_app(settings) as b:
        sku = await make_product(a, stock=100)
        failed = await asyncio.gather(*(
            _failed_order(a if i % 2 else b, isolated_pool, f"cust-two-retry-{i}", sku) for i in range(12)
        ))
        del sink.replies[REFUSED]
        answers = await asyncio.gather(*(
            app.post(f"/v1/admin/notifications/{row_id}/retry", headers=ADMIN)
            for _, row_id in failed for app in (a, b)
        ))
        statuses = [r.status_code for r in answers]
        assert [sorted(statuses[i:i + 2]) for i in range(0, len(statuses), 2)] == [[200, 409]] * 12
        for oid, _ in failed:
            await wait_for(lambda oid=oid: _status_is(isolated_pool, oid, "sent"), timeout=30)
        await asyncio.sleep(1)  # both relays keep polling: still nothing twice
    assert [_count(sink, oid) for oid, _ in failed] == [1] * 12


async def test_outbox_gauges_count_failed_rows_by_kind_and_the_oldest_pending(
    make_settings, isolated_db, isolated_pool, sink, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(relay, "HOUSEKEEPING_S", 0.2)
    settings = make_settings(database_url=isolated_db, smtp_port=sink.port, relay_interval_s=0.1)
    async with running_app(settings) as c:
        sku = await make_product(c, stock=10)
        _, row_id = await _failed_order(c, isolated_pool, "cust-gauge", sku)

        async def metrics() -> str:
            return (await c.get("/metrics")).text

        async def failed_rows(n: float) -> bool:
            return metric_sample(await metrics(), "orders_notifications_failed_rows", kind="email") == n

        await wait_for(lambda: failed_rows(1))
        assert metric_sample(await metrics(), "orders_notifications_failed_rows", kind="audit") == 0
        async with isolated_pool.acquire() as conn:  # a row pending for an hour (backing off)
            await conn.execute("UPDATE outbox SET status = 'pending', created_at = now() - interval '1 hour', "
                               "next_attempt_at = now() + interval '1 hour' WHERE id = $1", row_id)

        async def oldest_an_hour() -> bool:
            return (metric_sample(await metrics(), "orders_notifications_oldest_pending_seconds") or 0) >= 3600

        await wait_for(oldest_an_hour)
        assert metric_sample(await metrics(), "orders_notifications_failed_rows", kind="email") == 0
        assert metric_sample(await metrics(), "orders_relay_lag_seconds") == 0  # not due: no lag
        assert (await c.get("/readyz")).status_code == 200

"""Real `orders serve` processes: hung SMTP, SIGKILL after 201, SIGTERM under load, logs."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from orders.dev.smtp import SmtpSink
from tests.conftest import ADMIN, auth, order_body, wait_for, wait_until
from tests.server import HangingSmtp, ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def sink():
    s = SmtpSink()
    s.start()
    yield s
    s.stop()


def _product(url: str, stock: int = 10_000) -> str:
    sku = f"P-{uuid.uuid4().hex[:10]}"
    r = httpx.put(f"{url}/v1/products/{sku}", headers=ADMIN, timeout=10,
                  json={"name": "Mug", "unit_price": 1299, "currency": "USD", "stock": stock})
    assert r.status_code == 201, r.text
    return sku


def test_hung_smtp_never_slows_keepalive_requests_nor_shutdown(base_env, isolated_db, tmp_path):
    with HangingSmtp() as smtp:
        server = ServerProcess(base_env, tmp_path, ORDERS_DATABASE_URL=isolated_db, ORDERS_SMTP_PORT=str(smtp.port),
                               ORDERS_SMTP_TIMEOUT_S="10", ORDERS_SHUTDOWN_GRACE_S="6")
        with server:
            sku = _product(server.url)
            with httpx.Client(base_url=server.url, timeout=10) as c:  # one keep-alive connection
                start = time.monotonic()
                for i in range(5):
                    r = c.post("/v1/orders", headers={**auth(f"cust-hang-{i}"), "Idempotency-Key": uuid.uuid4().hex},
                               json=order_body((sku, 1)))
                    assert r.status_code == 201
                elapsed = time.monotonic() - start
            # Were a send awaited on the connection, each request would wait out the 10 s SMTP timeout.
            assert elapsed < 5, f"5 orders on one connection took {elapsed:.1f} s with SMTP hung"
            # The dispatcher lingers 50 ms to batch rows.
            wait_until(lambda: smtp.connections, timeout=3, interval=0.05, what="a connection to the hung SMTP server")
            start = time.monotonic()
            server.signal(signal.SIGTERM)
            code = server.wait(timeout=20)
            took = time.monotonic() - start
        assert code == 0
        assert took < 6 + 3, f"shutdown took {took:.1f} s, grace is 6 s (the SMTP timeout is 10 s)"


async def test_sigkill_after_201_next_instance_delivers(base_env, isolated_db, isolated_pool, sink, tmp_path):
    with HangingSmtp() as hung:
        first = ServerProcess(base_env, tmp_path, name="first", ORDERS_DATABASE_URL=isolated_db,
                              ORDERS_SMTP_PORT=str(hung.port), ORDERS_RELAY_LEASE_S="3")
        with first:
            sku = _product(first.url)
            r = httpx.post(f"{first.url}/v1/orders", headers={**auth("cust-kill"), "Idempotency-Key": "kill-1"},
                           json=order_body((sku, 1), email="killed@example.com"), timeout=10)
            assert r.status_code == 201
            first.signal(signal.SIGKILL)
            assert first.wait(timeout=10) == -signal.SIGKILL
    oid = r.json()["id"]
    async with isolated_pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM orders WHERE id = $1", oid) == 1
    second = ServerProcess(base_env, tmp_path, name="second", ORDERS_DATABASE_URL=isolated_db,
                           ORDERS_SMTP_PORT=str(sink.port), ORDERS_RELAY_LEASE_S="3", ORDERS_RELAY_INTERVAL_S="0.2")
    with second:
        await wait_for(lambda: any(m["Message-ID"] == f"<order-{oid}.created@orders>" for m in sink.messages), timeout=30)
        assert [m["To"] for m in sink.messages] == ["killed@example.com"]

        async def audited() -> bool:
            async with isolated_pool.acquire() as conn:
                return await conn.fetchval("SELECT count(*) FROM audit_log WHERE order_id = $1", oid) == 1

        await wait_for(audited, timeout=15)


async def test_sigterm_under_load_loses_nothing(base_env, isolated_db, isolated_pool, sink, tmp_path):
    env = dict(base_env, ORDERS_DATABASE_URL=isolated_db, ORDERS_SMTP_PORT=str(sink.port), ORDERS_SHUTDOWN_GRACE_S="10")
    first = ServerProcess(env, tmp_path, name="first")
    first.start()
    try:
        sku = _product(first.url)
        outcomes: dict[str, tuple[str, dict, int | None]] = {}  # key -> (customer, body, status or None)
        # SIGTERM once the server is really under load (21 orders placed), whatever the
        # machine's speed; the clients go on for 3 s after it, then stop.
        loaded = asyncio.Event()
        deadline = time.monotonic() + 60
        stop_at = deadline

        async def client_loop(n: int) -> None:
            async with httpx.AsyncClient(base_url=first.url, timeout=10) as c:
                i = 0
                while time.monotonic() < min(stop_at, deadline):
                    key, customer = f"load-{n}-{i}", f"cust-load-{n}"
                    body = order_body((sku, 1), email=f"load-{n}-{i}@example.com")
                    try:
                        r = await c.post("/v1/orders", headers={**auth(customer), "Idempotency-Key": key}, json=body)
                        outcomes[key] = (customer, body, r.status_code)
                        if sum(1 for *_, s in outcomes.values() if s == 201) > 20:
                            loaded.set()
                    except httpx.HTTPError:
                        outcomes[key] = (customer, body, None)
                        await asyncio.sleep(0.05)
                    i += 1

        async def terminate_when_loaded() -> None:
            nonlocal stop_at
            await asyncio.wait_for(loaded.wait(), timeout=30)
            await asyncio.sleep(0.5)
            first.signal(signal.SIGTERM)
            stop_at = time.monotonic() + 3

        await asyncio.gather(terminate_when_loaded(), *(client_loop(n) for n in range(20)))
        code = await asyncio.to_thread(first.wait, 30)
    finally:
        first.stop()
    assert code == 0, first.log_path.read_text()[-3000:]
    statuses = Counter(s for _, _, s in outcomes.values())
    assert statuses[201] > 20, statuses
    assert not [s for s in statuses if s is not None and s >= 500 and s != 503], statuses
    assert not [s for s in statuses if s is not None and 400 <= s < 500], statuses
    logs = first.logs()
    assert not [line for line in logs if line.get("level") in ("error", "critical") or "Traceback" in str(line.get("event"))]

    accepted = {k for k, (_, _, s) in outcomes.items() if s == 201}
    failed = {k for k, (_, _, s) in outcomes.items() if s != 201}
    async with isolated_pool.acquire() as conn:
        stored = {r["key"] for r in await conn.fetch("SELECT key FROM idempotency_keys")}
    assert accepted <= stored, "every 201 is in the database"

    # Retry what failed in flight, with the same key and body, against a fresh instance.
    with ServerProcess(env, tmp_path, name="second") as second, httpx.Client(base_url=second.url, timeout=10) as c:
        for key in failed:
            customer, body, _ = outcomes[key]
            r = c.post("/v1/orders", headers={**auth(customer), "Idempotency-Key": key}, json=body)
            assert r.status_code == 201, r.text
        async with isolated_pool.acquire() as conn:
            rows = await conn.fetch("SELECT k.key, o.id FROM idempotency_keys k JOIN orders o ON o.id = k.order_id")
            assert len(rows) == len(outcomes) == await conn.fetchval("SELECT count(*) FROM orders")
            ids = [str(r["id"]) for r in rows]
            stock = await conn.fetchval("SELECT stock FROM products WHERE sku = $1", sku)
        assert stock == 10_000 - len(outcomes)
        expected = {f"<order-{oid}.created@orders>" for oid in ids}
        await wait_for(lambda: expected <= {m["Message-ID"] for m in sink.messages}, timeout=60)
    counts = Counter(m["Message-ID"] for m in sink.messages)
    assert max(counts.values()) == 1


def test_request_id_is_echoed_and_carried_by_background_logs(base_env, isolated_db, sink, tmp_path):
    env = dict(base_env, ORDERS_DATABASE_URL=isolated_db, ORDERS_SMTP_PORT=str(sink.port))
    server = ServerProcess(env, tmp_path)
    with server:
        sku = _product(server.url)
        r = httpx.post(f"{server.url}/v1/orders", timeout=10,
                       headers={**auth("cust-log"), "Idempotency-Key": "log-1", "X-Request-ID": "req-abc-123"},
                       json=order_body((sku, 1), email="secret-buyer@example.com"))
        assert r.status_code == 201 and r.headers["x-request-id"] == "req-abc-123"
        generated = httpx.get(f"{server.url}/healthz").headers["x-request-id"]
        assert len(generated) >= 16
        insane = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
        assert insane.headers["x-request-id"] != "bad id\twith spaces"
        sink.wait_for_messages(1, timeout=15)
        time.sleep(0.5)
    lines = [line for line in server.logs() if line.get("request_id") == "req-abc-123"]
    events = {line["event"] for line in lines}
    assert {"request", "email_sent", "audit"} <= events, events
    access = next(line for line in lines if line["event"] == "request")
    assert access["status"] == 201 and access["route"] == "/v1/orders" and access["customer_id"] == "cust-log"
    assert access["method"] == "POST" and "duration_ms" in access
    text = Path(server.log_path).read_text()
    assert "secret-buyer@example.com" not in text
    assert auth("cust-log")["Authorization"].split()[1][:20] not in text

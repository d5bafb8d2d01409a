"""`orders dev` (what `make run` calls): on a machine where no ORDERS_* variable is set, and
with the servers and the address named by ORDERS_* variables."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest

from orders.dev.process import free_port, listening
from orders.domain import signature
from tests.conftest import stream_messages, wait_until

pytestmark = pytest.mark.slow


@contextmanager
def orders_dev(tmp_path: Path, http_port: int, host: str = "127.0.0.1", **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """`orders dev --port http_port` with only the given ORDERS_* variables, until /readyz on
    host answers 200; killed on the way out if the test did not stop it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
    log_path = tmp_path / "dev.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orders", "dev", "--port", str(http_port)],
                                env={**clean, "ORDERS_DEV_DIR": str(tmp_path / ".dev"), **env},
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://{host}:{http_port}/readyz", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert ready is not None and ready.status_code == 200, log_path.read_text()[-3000:]
        assert ready.json() == {"status": "ready", "postgres": "ok", "redis": "ok"}
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _stream_subjects(url: str) -> list[str]:
    return [m["subject"] for m in await stream_messages(url)]


def test_orders_dev_serves_the_demo_catalog_and_ctrl_c_stops_everything(tmp_path):
    http_port, pg_port, redis_port, nats_port = free_port(), free_port(), free_port(), free_port()
    with orders_dev(tmp_path, http_port, ORDERS_DEV_PG_PORT=str(pg_port), ORDERS_DEV_REDIS_PORT=str(redis_port),
                    ORDERS_DEV_NATS_PORT=str(nats_port)) as proc:
        output = (tmp_path / "dev.log").read_text()
        catalog = httpx.get(f"http://127.0.0.1:{http_port}/v1/products?limit=100").json()
        assert {"MUG-001", "TSHIRT-M", "TOTE-BAG"} <= {p["sku"] for p in catalog["items"]}
        assert "customer token" in output and "admin token" in output
        token = output.split("customer token (sub=demo-customer):")[1].split()[0]
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/orders",
                       headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "dev-1"},
                       json={"email": "a@example.com", "items": [{"sku": "MUG-001", "quantity": 1}],
                             "shipping_address": {"name": "A", "line1": "1 St", "city": "X", "postal_code": "1", "country": "US"}})
        assert r.status_code == 201, r.text
        # The printed webhook secret signs a provider's event (a provider simulator's use).
        secret = output.split("payment webhook secret (Payment-Signature of POST /v1/payments/events):")[1].split()[0]
        assert secret == (tmp_path / ".dev" / "payment_webhook_secret").read_text().strip()
        order = r.json()
        body = orjson.dumps({"id": "evt-dev-1", "type": "payment.succeeded", "order_id": order["id"],
                             "amount": order["total"], "currency": order["currency"]})
        paid = httpx.post(f"http://127.0.0.1:{http_port}/v1/payments/events", content=body,
                          headers={"Payment-Signature": signature.header(secret, int(time.time()), body)})
        assert paid.status_code == 200 and paid.json() == {"outcome": "paid"}, paid.text
        assert listening(pg_port) and listening(redis_port) and listening(nats_port)
        # Order events are on in dev: the embedded NATS (JetStream) has the order's.
        subjects = wait_until(lambda: len(s := asyncio.run(_stream_subjects(f"nats://127.0.0.1:{nats_port}"))) >= 2 and s,
                              timeout=20, interval=0.2, what="two order events in the stream")
        assert subjects == ["orders.order.created", "orders.order.paid"]
        # It prints working tokens: loopback only (a wildcard bind would answer on 127.0.0.2 too).
        assert not listening(http_port, "127.0.0.2")
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=60)
        assert not listening(http_port) and not listening(pg_port) and not listening(redis_port)
        assert not listening(nats_port)
        assert "Traceback" not in (tmp_path / "dev.log").read_text()


def test_orders_dev_uses_the_servers_and_the_address_it_is_given(tmp_path, isolated_db, redis_url, smtp, cache_prefix):
    http_port = free_port()
    given = {
        "ORDERS_HOST": "127.0.0.2",
        "ORDERS_DATABASE_URL": isolated_db,
        "ORDERS_REDIS_URL": redis_url,
        "ORDERS_CACHE_PREFIX": cache_prefix + "dev:",
        "ORDERS_SMTP_HOST": smtp.host,
        "ORDERS_SMTP_PORT": str(smtp.port),
    }
    with orders_dev(tmp_path, http_port, host="127.0.0.2", **given) as proc:
        catalog = httpx.get(f"http://127.0.0.2:{http_port}/v1/products?limit=100").json()
        assert "MUG-001" in {p["sku"] for p in catalog["items"]}  # seeded into the given database
        assert not listening(http_port, "127.0.0.1")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert not (tmp_path / ".dev" / "pg").exists() and not (tmp_path / ".dev" / "redis").exists()
    assert not (tmp_path / ".dev" / "mail").exists()

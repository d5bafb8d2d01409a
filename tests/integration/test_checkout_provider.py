"""examples/checkout/provider.py, the checkout example's test payment provider, against a real
`orders serve`: it signs the events the page asks for with the webhook secret (which the
browser never holds), answers the service's outcome, and refuses bad input with problem+json."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from orders.dev.process import free_port
from tests.conftest import WEBHOOK_SECRET, make_product, place
from tests.server import ServerProcess

pytestmark = pytest.mark.timeout(120)

PROVIDER = Path(__file__).resolve().parents[2] / "examples" / "checkout" / "provider.py"
PAGE = "http://127.0.0.1:5173"


class Provider:
    def __init__(self, api: str, secret: str, log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        env = {**os.environ, "ORDERS_PAYMENT_WEBHOOK_SECRET": secret}
        cmd = [sys.executable, str(PROVIDER), "--api", api, "--port", port, "--origin", PAGE]
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError(f"provider not up in 30 s: {log.read_text()}")

    def pay(self, body: dict[str, Any] | bytes, **headers: str) -> httpx.Response:
        content = body if isinstance(body, bytes) else None
        return httpx.post(
            f"{self.url}/pay",
            json=None if content is not None else body,
            content=content,
            headers={"Origin": PAGE, **headers},
            timeout=30,
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def service(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(base_env, tmp_path_factory.mktemp("provider"), name="provider-api").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def provider(service: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    p = Provider(service.url, WEBHOOK_SECRET, tmp_path_factory.mktemp("provider") / "provider.log")
    try:
        yield p
    finally:
        p.stop()


async def new_order(client: httpx.AsyncClient, customer: str) -> dict[str, Any]:
    sku = await make_product(client, price=1299)
    r = await place(client, customer, (sku, 1))
    assert r.status_code == 201, r.text
    return r.json()


def payment(order: dict[str, Any], outcome: str = "succeed", **fields: Any) -> dict[str, Any]:
    body = {
        "payment_id": uuid.uuid4().hex,
        "order_id": order["id"],
        "amount": order["total"],
        "currency": order["currency"],
    }
    return {**body, "outcome": outcome, **fields}


async def status_of(db: asyncpg.Pool, order_id: str) -> str:
    return await db.fetchval("SELECT status FROM orders WHERE id = $1", uuid.UUID(order_id))


async def test_a_paying_card_pays_the_order_once(client, db, provider: Provider):
    order = await new_order(client, "provider-pays")
    body = payment(order)
    r = provider.pay(body)
    assert r.status_code == 200, r.text
    assert r.json() == {"event_id": f"evt_{body['payment_id']}", "type": "payment.succeeded", "outcome": "paid"}
    assert r.headers["access-control-allow-origin"] == PAGE
    assert await status_of(db, order["id"]) == "paid"
    # A page that lost the answer asks again with the same payment_id: the same event, taken once.
    again = provider.pay(body)
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
    recorded = await db.fetchval("SELECT count(*) FROM payment_events WHERE order_id = $1", uuid.UUID(order["id"]))
    assert recorded == 1


async def test_a_declined_card_is_recorded_and_the_order_stays_pending(client, db, provider: Provider):
    order = await new_order(client, "provider-declines")
    r = provider.pay(payment(order, "fail"))
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "payment.failed" and r.json()["outcome"] == "recorded"
    assert await status_of(db, order["id"]) == "pending"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"payment_id": "short"}, "payment_id"),
        ({"order_id": "not-a-uuid"}, "order_id"),
        ({"amount": -1}, "amount"),
        ({"amount": True}, "amount"),
        ({"currency": "usd"}, "currency"),
        ({"outcome": "maybe"}, "outcome"),
    ],
)
async def test_bad_input_is_422_problem_and_sends_nothing(client, db, provider: Provider, change, field):
    order = await new_order(client, "provider-bad-input")
    body = payment(order, **change)
    r = provider.pay(body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["detail"].startswith(field) and r.json()["status"] == 422
    assert r.headers["access-control-allow-origin"] == PAGE  # the page can read why
    assert await status_of(db, order["id"]) == "pending"
    assert await db.fetchval("SELECT count(*) FROM payment_events WHERE order_id = $1", uuid.UUID(order["id"])) == 0


def test_not_json_and_too_large_bodies_are_refused(provider: Provider):
    r = provider.pay(b"{not json", **{"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"] == "the body is not JSON"
    r = provider.pay(b"x" * 5000, **{"Content-Type": "application/json"})
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"


def test_cors_preflight_only_for_the_page_origin(provider: Provider):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = httpx.options(f"{provider.url}/pay", headers={"Origin": PAGE, **preflight}, timeout=5)
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == PAGE
    assert ok.headers["access-control-allow-headers"] == "Content-Type"
    other = httpx.options(f"{provider.url}/pay", headers={"Origin": "http://evil.example", **preflight}, timeout=5)
    assert other.status_code == 403
    assert "access-control-allow-origin" not in other.headers


async def test_a_wrong_secret_is_a_502_naming_the_services_401(client, db, service: ServerProcess, tmp_path: Path):
    order = await new_order(client, "provider-wrong-secret")
    wrong = Provider(service.url, "another-secret-of-enough-length-0123456789", tmp_path / "provider.log")
    try:
        r = wrong.pay(payment(order))
    finally:
        wrong.stop()
    assert r.status_code == 502, r.text
    assert r.json()["type"].endswith("/not-delivered")
    assert "the shop answered 401" in r.json()["detail"]
    assert await status_of(db, order["id"]) == "pending"


async def test_an_unreachable_service_is_a_bounded_502(client, tmp_path: Path):
    order = await new_order(client, "provider-no-service")
    nowhere = Provider(f"http://127.0.0.1:{free_port()}", WEBHOOK_SECRET, tmp_path / "provider.log")
    try:
        r = nowhere.pay(payment(order))
    finally:
        nowhere.stop()
    assert r.status_code == 502, r.text
    assert "could not be reached" in r.json()["detail"]

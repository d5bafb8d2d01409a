"""Checkout load: shoppers browse the catalog, place orders (a unique Idempotency-Key each),
retry some with the same key (one after the other, and some concurrently), read and list
their own orders and cancel some. At the end the run's invariants are checked in
PostgreSQL (infra/locust/invariants.py) and the process exits non-zero when one is broken.

    make load                                   # against http://127.0.0.1:8000 (LOAD_HOST)
    locust -f infra/locust/locustfile.py --headless -u 20 -r 5 -t 60s --host URL --csv PREFIX

Environment: ORDERS_JWT_SECRET (tokens are minted with orders.auth.mint; with none set,
`.dev/jwt_secret` of `make run` is used), ORDERS_JWT_AUDIENCE / ORDERS_JWT_ISSUER when the
service checks them, ORDERS_DATABASE_URL (required for the invariants; with none set and a
`.dev/` present, the embedded PostgreSQL of `make run`). Optional: LOAD_SUMMARY (path of a
JSON summary written at the end), LOAD_SERVER_PID (pid of the service, or of its uvicorn
supervisor: the RSS of its worker(s) is reported at the start and the end),
LOAD_WAIT_MIN / LOAD_WAIT_MAX (seconds between a shopper's tasks, default 0.5 / 2: about
20 order creations a minute per shopper, under the default rate limit of 60),
LOAD_SCARCE_STOCK (stock of the run's scarce SKUs, default 40).

Outcomes that the contract expects under load count as successes: 409 insufficient-stock
(scarce SKUs run out; cancels give stock back), 409 too-many-pending-orders (shoppers
never pay, so one who cancels little reaches ORDERS_MAX_PENDING_ORDERS_PER_CUSTOMER), 409
invalid-transition (a cancel of an order already cancelled), 409 idempotency-in-progress
(for concurrent requests with one key). Anything else unexpected is a failure.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import gevent
import requests
from locust import FastHttpUser, between, events, task
from locust.runners import WorkerRunner

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from orders.auth import mint  # noqa: E402
from orders.settings import Settings  # noqa: E402

RUN = os.environ.get("LOAD_RUN_ID") or time.strftime("%m%d%H%M%S") + secrets.token_hex(2)
CUSTOMER_PREFIX = f"load-{RUN}-"
DEV_DIR = ROOT / ".dev"


def _settings() -> Settings:
    overrides: dict[str, Any] = {"dev": True}
    if not os.environ.get("ORDERS_JWT_SECRET") and (DEV_DIR / "jwt_secret").exists():
        overrides["jwt_secret"] = (DEV_DIR / "jwt_secret").read_text().strip()
    settings = Settings(**overrides)  # type: ignore[call-arg]
    if not settings.jwt_secret:
        raise SystemExit("load: ORDERS_JWT_SECRET is required to mint tokens")
    return settings


def _database_url() -> str | None:
    url = os.environ.get("ORDERS_DATABASE_URL")
    if not url and DEV_DIR.exists():
        url = "postgresql://postgres@127.0.0.1:55432/postgres"  # `make run`'s embedded PostgreSQL
    return url


SETTINGS = _settings()
ADMIN_TOKEN = mint(SETTINGS, f"load-admin-{RUN}", roles=["admin"], ttl_s=86400)

# The run's own catalog: plenty of stock for most SKUs, little for a few (so that some
# orders meet 409 insufficient-stock and cancels matter).
SCARCE_STOCK = int(os.environ.get("LOAD_SCARCE_STOCK", "40"))
SKUS: dict[str, int] = {f"LOAD-{RUN}-P{i}": 1_000_000 for i in range(6)}
SKUS.update({f"LOAD-{RUN}-S{i}": SCARCE_STOCK for i in range(3)})
SKU_LIST = sorted(SKUS)


class Ledger:
    """What the clients were told, for the invariants at the end."""

    def __init__(self) -> None:
        self.created: dict[str, str] = {}  # order id -> customer, for every 201 (first answer or replay)
        self.keys_sent: set[tuple[str, str]] = set()
        self.key_orders: dict[tuple[str, str], set[str]] = {}
        self.cancelled: set[str] = set()
        self.outcomes: Counter[str] = Counter()
        self.rss_start: dict[int, float] = {}

    def to_json(self) -> dict[str, Any]:
        return {
            "customer_prefix": CUSTOMER_PREFIX,
            "skus": SKUS,
            "created": self.created,
            "keys_sent": sorted(self.keys_sent),
            "key_orders": [[c, k, sorted(ids)] for (c, k), ids in self.key_orders.items()],
            "cancelled": sorted(self.cancelled),
        }


LEDGER = Ledger()
_customers = itertools.count(1)


def _problem_type(resp: Any) -> str:
    try:
        return str(resp.json().get("type", "")).rsplit("/", 1)[-1]
    except Exception:
        return ""


class Shopper(FastHttpUser):
    wait_time = between(float(os.environ.get("LOAD_WAIT_MIN", "0.5")), float(os.environ.get("LOAD_WAIT_MAX", "2")))

    def on_start(self) -> None:
        self.customer = f"{CUSTOMER_PREFIX}{next(_customers)}"
        self.auth = {"Authorization": f"Bearer {mint(SETTINGS, self.customer, ttl_s=86400)}"}
        self.orders: dict[str, str] = {}  # my order id -> the status I last saw

    # -- catalog -----------------------------------------------------------------

    @task(3)
    def browse_catalog(self) -> None:
        with self.client.get("/v1/products?limit=20", name="/v1/products", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}")
                return
            cursor = r.json().get("next_cursor")
        if cursor and random.random() < 0.3:
            self.client.get(f"/v1/products?limit=20&cursor={cursor}", name="/v1/products?cursor")

    @task(2)
    def view_product(self) -> None:
        sku = random.choice(SKU_LIST)
        with self.client.get(f"/v1/products/{sku}", name="/v1/products/[sku]", catch_response=True) as r:
            if r.status_code != 200 or r.json().get("stock", -1) < 0:
                r.failure(f"{r.status_code} {r.text[:200]}")

    # -- placing orders -------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        lines = random.sample(SKU_LIST, random.randint(1, 3))
        return {
            "email": "load@example.com",
            "items": [{"sku": s, "quantity": random.randint(1, 3)} for s in lines],
            "shipping_address": {
                "name": "Load Test",
                "line1": "1 Main St",
                "line2": None,
                "city": "London",
                "postal_code": "N1 9GU",
                "country": "GB",
            },
        }

    def _post(self, key: str, body: dict[str, Any], name: str, concurrent: bool = False) -> str | None:
        """One POST /v1/orders; returns the order id of a 201 (first answer or replay)."""
        LEDGER.keys_sent.add((self.customer, key))
        headers = {**self.auth, "Idempotency-Key": key}
        with self.client.post("/v1/orders", json=body, headers=headers, name=name, catch_response=True) as r:
            status, slug = r.status_code, ""
            if status == 201:
                doc = r.json()
                oid = doc["id"]
                LEDGER.created[oid] = self.customer
                LEDGER.key_orders.setdefault((self.customer, key), set()).add(oid)
                self.orders.setdefault(oid, doc["status"])
                replayed = r.headers.get("Idempotent-Replayed") == "true"
                LEDGER.outcomes["201 replay" if replayed else "201 created"] += 1
                if doc["customer_id"] != self.customer:
                    r.failure("an order of another customer")
                return oid
            slug = _problem_type(r)
            LEDGER.outcomes[f"{status} {slug}"] += 1
            if status == 409 and slug in ("insufficient-stock", "too-many-pending-orders"):
                r.success()
            elif status == 409 and slug == "idempotency-in-progress" and concurrent:
                r.success()
            else:
                r.failure(f"{status} {slug} {r.text[:200]}")
        return None

    @task(4)
    def place_order(self) -> None:
        key = uuid.uuid4().hex
        body = self._body()
        roll = random.random()
        if roll < 0.1:
            # A double submit: the same key twice at once. Exactly one order; each answer is
            # the order (created or replayed) or 409 idempotency-in-progress.
            jobs = [gevent.spawn(self._post, key, body, "/v1/orders (concurrent same key)", True) for _ in range(2)]
            gevent.joinall(jobs)
            return
        first = self._post(key, body, "/v1/orders")
        if roll < 0.35:
            # A retry with the same key and body (a lost response): the same answer again.
            again = self._post(key, body, "/v1/orders (retry same key)")
            if first is not None and again != first:
                LEDGER.outcomes["retry answered another order"] += 1
                events.request.fire(
                    request_type="CHECK",
                    name="retry answers the same order",
                    response_time=0,
                    response_length=0,
                    exception=AssertionError(f"{first} != {again}"),
                )

    # -- my orders --------------------------------------------------------------------

    @task(2)
    def read_order(self) -> None:
        if not self.orders:
            return
        oid = random.choice(list(self.orders))
        with self.client.get(f"/v1/orders/{oid}", headers=self.auth, name="/v1/orders/[id]", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code} {r.text[:200]}")
                return
            doc = r.json()
            if doc["id"] != oid or doc["customer_id"] != self.customer:
                r.failure("another order")
            elif self.orders[oid] == "cancelled" and doc["status"] != "cancelled":
                r.failure(f"a read after the cancel shows {doc['status']}")  # read-your-writes through the cache

    @task(1)
    def list_orders(self) -> None:
        with self.client.get("/v1/orders?limit=10", headers=self.auth, name="/v1/orders", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code} {r.text[:200]}")
            elif any(o["customer_id"] != self.customer for o in r.json()["items"]):
                r.failure("another customer's order in my list")

    @task(1)
    def cancel_order(self) -> None:
        if not self.orders:
            return
        live = [o for o, s in self.orders.items() if s != "cancelled"]
        # Mostly a live order; now and then one already cancelled (409 invalid-transition).
        oid = random.choice(live) if live and random.random() < 0.85 else random.choice(list(self.orders))
        with self.client.post(
            f"/v1/orders/{oid}/cancel", headers=self.auth, name="/v1/orders/[id]/cancel", catch_response=True
        ) as r:
            if r.status_code == 200 and r.json()["status"] == "cancelled":
                self.orders[oid] = "cancelled"
                LEDGER.cancelled.add(oid)
                LEDGER.outcomes["200 cancelled"] += 1
            elif r.status_code == 409 and _problem_type(r) == "invalid-transition":
                LEDGER.outcomes["409 invalid-transition"] += 1
                r.success()
            else:
                r.failure(f"{r.status_code} {r.text[:200]}")


# -- set-up and the checks at the end ------------------------------------------------------


def _rss_mib(pid: int) -> dict[int, float]:
    """RSS of the service's worker(s): the process itself, or the children of a supervisor."""
    pids = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in f.read_text().split():
            if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():  # not a worker
                pids.append(int(child))
    out = {}
    for p in pids or [pid]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out[p] = round(int(line.split()[1]) / 1024, 1)
    return out


@events.test_start.add_listener
def create_catalog(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    host = (environment.host or "http://127.0.0.1:8000").rstrip("/")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for sku, stock in SKUS.items():
        body = {"name": f"Load {sku[-3:]}", "unit_price": random.randint(100, 5000), "currency": "USD", "stock": stock}
        r = requests.put(f"{host}/v1/products/{sku}", json=body, headers=headers, timeout=10)
        if r.status_code != 201:
            raise SystemExit(f"load: could not create SKU {sku}: {r.status_code} {r.text[:300]}")
    if os.environ.get("LOAD_SERVER_PID"):
        LEDGER.rss_start = _rss_mib(int(os.environ["LOAD_SERVER_PID"]))
    print(f"load: run {RUN}: {len(SKUS)} SKUs created on {host}; customers {CUSTOMER_PREFIX}N", flush=True)


@events.quitting.add_listener
def check_invariants(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    ledger = LEDGER.to_json()
    env = {**os.environ}
    dsn = _database_url()
    if dsn:
        env["ORDERS_DATABASE_URL"] = dsn
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("invariants.py"))],
        input=json.dumps(ledger),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result = {"violations": [f"the invariant check failed: {proc.stdout[-500:]} {proc.stderr[-2000:]}"]}
    stats = environment.stats.total
    summary = {
        "run": RUN,
        "requests": stats.num_requests,
        "failures": stats.num_failures,
        "outcomes": dict(LEDGER.outcomes),
        "invariants": result,
    }
    if os.environ.get("LOAD_SERVER_PID"):
        summary["rss_mib"] = {"start": LEDGER.rss_start, "end": _rss_mib(int(os.environ["LOAD_SERVER_PID"]))}
    if os.environ.get("LOAD_SUMMARY"):
        Path(os.environ["LOAD_SUMMARY"]).write_text(json.dumps(summary, indent=2))
    print("\nload: outcomes " + ", ".join(f"{k}: {v}" for k, v in sorted(LEDGER.outcomes.items())))
    if "rss_mib" in summary:
        print(f"load: worker RSS MiB at start {summary['rss_mib']['start']}, at the end {summary['rss_mib']['end']}")
    checked = result.get("checked", {})
    print(
        f"load: invariants checked on {checked.get('orders_in_db')} orders, {checked.get('keys_sent')} keys, "
        f"{checked.get('skus')} SKUs"
    )
    if result.get("violations"):
        print("load: INVARIANTS BROKEN:\n  " + "\n  ".join(result["violations"][:50]), flush=True)
        environment.process_exit_code = 1
    elif stats.num_failures:
        print(f"load: {stats.num_failures} failed requests", flush=True)
        environment.process_exit_code = 1
    else:
        print("load: invariants hold, no failed requests", flush=True)

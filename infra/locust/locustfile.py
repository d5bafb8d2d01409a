"""Checkout load: shoppers browse the catalog, place orders (a unique Idempotency-Key each),
retry some with the same key (one after the other, and some concurrently), pay most of
them through signed payment webhooks (the payment provider's part: some deliveries twice,
one after the other or at once, some after a payment.failed), abandon some (never paid
nor cancelled: the service must expire them), read and list their own orders and cancel
some pending ones. At the end the run's invariants are checked in PostgreSQL (and NATS
JetStream) by infra/locust/invariants.py; the process exits non-zero when one is broken.

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

Payments: LOAD_PAYMENTS = auto (default: on when the service answers POST
/v1/payments/events, off on a 404, e.g. a service without payments) | on | off.
ORDERS_PAYMENT_WEBHOOK_SECRET signs the events (the first of its comma-separated list, as
the service is configured); required when payments are on. LOAD_ABANDON_RATE (share of
new orders never paid, default 0.15), LOAD_PAY_FAILED_RATE (share of payments preceded by
a payment.failed, default 0.2), LOAD_DUPLICATE_RATE (share of payment.succeeded events
delivered twice, a third of them at once, default 0.15). After the run, the invariants
wait for the expiry of unpaid orders when ORDERS_PAYMENT_TIMEOUT_S (the service's) fits in
LOAD_EXPIRY_WAIT_S (default 120), and read order.paid from JetStream when ORDERS_NATS_URL
is set (stream ORDERS_NATS_STREAM, default ORDERS; LOAD_EVENTS_WAIT_S, default 30): see
infra/locust/invariants.py.

Outcomes that the contract expects under load count as successes: 409 insufficient-stock
(scarce SKUs run out; cancels give stock back), 409 too-many-pending-orders (shoppers
never pay, so one who cancels little reaches ORDERS_MAX_PENDING_ORDERS_PER_CUSTOMER), 409
invalid-transition (a cancel of an order already cancelled, or expired), 409
idempotency-in-progress (for concurrent requests with one key), a payment answered
refund_required (the order expired before it) and a 503 to a payment event (retried, as a
provider does). Anything else unexpected is a failure, and so is any payment event that
takes effect twice (a second `paid` for one event id or one order).
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

from infra.locust.webhook import event_body, signature, signing_secret  # noqa: E402
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

WEBHOOK_SECRET = signing_secret(os.environ.get("ORDERS_PAYMENT_WEBHOOK_SECRET"))
PAYMENTS_MODE = os.environ.get("LOAD_PAYMENTS", "auto")
if PAYMENTS_MODE not in ("auto", "on", "off"):
    raise SystemExit(f"load: LOAD_PAYMENTS is auto, on or off, not {PAYMENTS_MODE!r}")
ABANDON_RATE = float(os.environ.get("LOAD_ABANDON_RATE", "0.15"))
PAY_FAILED_RATE = float(os.environ.get("LOAD_PAY_FAILED_RATE", "0.2"))
DUPLICATE_RATE = float(os.environ.get("LOAD_DUPLICATE_RATE", "0.15"))
WEBHOOK_PATH = "/v1/payments/events"


class Ledger:
    """What the clients were told, for the invariants at the end."""

    def __init__(self) -> None:
        self.created: dict[str, str] = {}  # order id -> customer, for every 201 (first answer or replay)
        self.keys_sent: set[tuple[str, str]] = set()
        self.key_orders: dict[tuple[str, str], set[str]] = {}
        self.cancelled: set[str] = set()
        self.payments = False  # decided at the start (LOAD_PAYMENTS)
        self.started_at = time.time()
        self.paid: Counter[str] = Counter()  # order id -> `paid` answers (more than one is a bug)
        self.refund_required: set[str] = set()
        self.abandoned: set[str] = set()  # never paid nor cancelled by a client: must expire
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
            "payments": self.payments,
            "started_at": self.started_at,
            "paid": dict(self.paid),
            "refund_required": sorted(self.refund_required),
            "abandoned": sorted(self.abandoned),
        }


LEDGER = Ledger()
_customers = itertools.count(1)


def _problem_type(resp: Any) -> str:
    try:
        return str(resp.json().get("type", "")).rsplit("/", 1)[-1]
    except Exception:
        return ""


def _text(resp: Any) -> str:
    """The start of a body, for a failure message (none when the request got no answer)."""
    return (resp.text or "")[:200]


def _check_failed(name: str, detail: str) -> None:
    """A broken expectation that is not one request's answer, counted as a failure."""
    LEDGER.outcomes[f"check failed: {name}"] += 1
    events.request.fire(
        request_type="CHECK", name=name, response_time=0, response_length=0, exception=AssertionError(detail)
    )


class Shopper(FastHttpUser):
    wait_time = between(float(os.environ.get("LOAD_WAIT_MIN", "0.5")), float(os.environ.get("LOAD_WAIT_MAX", "2")))

    def on_start(self) -> None:
        self.customer = f"{CUSTOMER_PREFIX}{next(_customers)}"
        self.auth = {"Authorization": f"Bearer {mint(SETTINGS, self.customer, ttl_s=86400)}"}
        self.orders: dict[str, str] = {}  # my order id -> the status I last saw
        self.totals: dict[str, tuple[int, str]] = {}  # my order id -> (total, currency), what a payment carries
        # Each customer's first payment is redelivered, so that every run has duplicates
        # to answer, however short (the rest at DUPLICATE_RATE).
        self.redelivered = DUPLICATE_RATE == 0

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
                r.failure(f"{r.status_code} {_text(r)}")

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
                if oid not in self.orders:
                    self.orders[oid] = doc["status"]
                    self.totals[oid] = (doc["total"], doc["currency"])
                    if LEDGER.payments and random.random() < ABANDON_RATE:
                        LEDGER.abandoned.add(oid)
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
                r.failure(f"{status} {slug} {_text(r)}")
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
                _check_failed("retry answers the same order", f"{first} != {again}")

    # -- paying (the payment provider's webhook) ------------------------------------------

    def _deliver(self, body: bytes, name: str, expected: frozenset[str]) -> str | None:
        """One signed delivery of a payment event: its outcome, or None when it failed. A
        503 is retried a few times, as the provider does (its retries are what make a
        duplicate delivery harmless)."""
        for attempt in range(3):
            headers = {"Payment-Signature": signature(WEBHOOK_SECRET or "", body, int(time.time()))}
            headers["Content-Type"] = "application/json"
            with self.client.post(WEBHOOK_PATH, data=body, headers=headers, name=name, catch_response=True) as r:
                if r.status_code == 503 and attempt < 2:
                    LEDGER.outcomes["payment 503 retried"] += 1
                    r.success()
                    gevent.sleep(0.2)
                    continue
                outcome = r.json().get("outcome") if r.status_code == 200 else None
                LEDGER.outcomes[f"payment {outcome or r.status_code}"] += 1
                if outcome in expected:
                    return str(outcome)
                r.failure(f"{r.status_code} {outcome or _text(r)}, expected one of {sorted(expected)}")
                return None
        return None

    @task(4)
    def pay_order(self) -> None:
        if not LEDGER.payments:
            return
        payable = [o for o, s in self.orders.items() if s == "pending" and o not in LEDGER.abandoned]
        if not payable:
            return
        oid = random.choice(payable)
        total, currency = self.totals[oid]
        if random.random() < PAY_FAILED_RATE:
            # A declined card first: the order stays pending and the customer pays again.
            failed = event_body(f"evt-{RUN}-{uuid.uuid4().hex}", "payment.failed", oid, total, currency)
            self._deliver(failed, f"{WEBHOOK_PATH} (failed)", frozenset({"recorded"}))
        body = event_body(f"evt-{RUN}-{uuid.uuid4().hex}", "payment.succeeded", oid, total, currency)
        # refund_required: the order expired before its payment came (ORDERS_PAYMENT_TIMEOUT_S).
        effective = frozenset({"paid", "refund_required"})
        roll = random.random() if self.redelivered else DUPLICATE_RATE / 2
        self.redelivered = True
        if roll < DUPLICATE_RATE / 3:
            # The provider delivers one event twice at once (two replicas may take them):
            # one delivery takes effect, the other is a duplicate.
            name = f"{WEBHOOK_PATH} (concurrent duplicate)"
            jobs = [gevent.spawn(self._deliver, body, name, effective | {"duplicate"}) for _ in range(2)]
            gevent.joinall(jobs)
            outcomes = [j.value for j in jobs]
            if None not in outcomes and sum(o in effective for o in outcomes) != 1:
                _check_failed("one event takes effect once", f"order {oid}: {outcomes} for one event id")
        else:
            outcomes = [self._deliver(body, WEBHOOK_PATH, effective)]
            if roll < DUPLICATE_RATE and outcomes[0] is not None:
                # A redelivery (the provider did not see the first 200): nothing changes.
                outcomes.append(self._deliver(body, f"{WEBHOOK_PATH} (redelivery)", frozenset({"duplicate"})))
        if "paid" in outcomes:
            self.orders[oid] = "paid"
            LEDGER.paid[oid] += outcomes.count("paid")
        elif "refund_required" in outcomes:
            self.orders[oid] = "cancelled"
            LEDGER.refund_required.add(oid)

    # -- my orders --------------------------------------------------------------------

    @task(2)
    def read_order(self) -> None:
        if not self.orders:
            return
        oid = random.choice(list(self.orders))
        with self.client.get(f"/v1/orders/{oid}", headers=self.auth, name="/v1/orders/[id]", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code} {_text(r)}")
                return
            doc = r.json()
            if doc["id"] != oid or doc["customer_id"] != self.customer:
                r.failure("another order")
            elif self.orders[oid] in ("cancelled", "paid") and doc["status"] != self.orders[oid]:
                # read-your-writes through the cache, after a cancel or a payment
                r.failure(f"a read after the order was {self.orders[oid]} shows {doc['status']}")

    @task(1)
    def list_orders(self) -> None:
        with self.client.get("/v1/orders?limit=10", headers=self.auth, name="/v1/orders", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code} {_text(r)}")
            elif any(o["customer_id"] != self.customer for o in r.json()["items"]):
                r.failure("another customer's order in my list")

    @task(1)
    def cancel_order(self) -> None:
        if not self.orders:
            return
        if LEDGER.payments:
            # Only pending orders, never an abandoned one (it must expire) nor a paid one: the
            # invariants take an order both paid and cancelled for a race the service lost.
            live = [o for o, s in self.orders.items() if s == "pending" and o not in LEDGER.abandoned]
            done = [o for o, s in self.orders.items() if s == "cancelled"]
        else:
            live = [o for o, s in self.orders.items() if s != "cancelled"]
            done = list(self.orders)
        # Mostly a live order; now and then one already cancelled (409 invalid-transition).
        if live and (not done or random.random() < 0.85):
            oid = random.choice(live)
        elif done:
            oid = random.choice(done)
        else:
            return
        with self.client.post(
            f"/v1/orders/{oid}/cancel", headers=self.auth, name="/v1/orders/[id]/cancel", catch_response=True
        ) as r:
            if r.status_code == 200 and r.json()["status"] == "cancelled":
                self.orders[oid] = "cancelled"
                LEDGER.cancelled.add(oid)
                LEDGER.outcomes["200 cancelled"] += 1
            elif r.status_code == 409 and _problem_type(r) == "invalid-transition":
                # Cancelled before, or expired meanwhile (the service cancels unpaid orders).
                LEDGER.outcomes["409 invalid-transition"] += 1
                r.success()
            else:
                r.failure(f"{r.status_code} {_text(r)}")


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
    LEDGER.payments = _payments_on(host)
    LEDGER.started_at = time.time()
    if os.environ.get("LOAD_SERVER_PID"):
        LEDGER.rss_start = _rss_mib(int(os.environ["LOAD_SERVER_PID"]))
    payments = "payments through signed webhooks" if LEDGER.payments else "no payments"
    print(f"load: run {RUN}: {len(SKUS)} SKUs created on {host}; customers {CUSTOMER_PREFIX}N; {payments}", flush=True)


def _payments_on(host: str) -> bool:
    """LOAD_PAYMENTS, with `auto` asking the service: an unsigned event answers 401 where the
    webhook exists (and records nothing), 404 where it does not."""
    if PAYMENTS_MODE == "off":
        return False
    if PAYMENTS_MODE == "auto":
        r = requests.post(f"{host}{WEBHOOK_PATH}", data=b"{}", headers={"Content-Type": "application/json"}, timeout=10)
        if r.status_code == 404:
            return False
    if not WEBHOOK_SECRET:
        raise SystemExit("load: ORDERS_PAYMENT_WEBHOOK_SECRET (the service's) is required to sign payment events")
    return True


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
        # The expiry and the events are waited for, each bounded (infra/locust/invariants.py).
        timeout=120
        + float(os.environ.get("LOAD_EXPIRY_WAIT_S", "120"))
        + float(os.environ.get("LOAD_EVENTS_WAIT_S", "30")),
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
        "payments": LEDGER.payments,
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
    if LEDGER.payments:
        events_seen = checked.get("events", {})
        print(
            f"load: {checked.get('paid_orders')} orders paid, {checked.get('abandoned_cancelled')} of "
            f"{checked.get('abandoned')} abandoned ones cancelled; expiry {checked.get('expiry')}; order.paid events "
            + (
                f"{events_seen.get('order_paid_events')} in {events_seen.get('stream')}"
                if events_seen.get("checked")
                else "not read (no ORDERS_NATS_URL)"
            )
        )
    if result.get("violations"):
        print("load: INVARIANTS BROKEN:\n  " + "\n  ".join(result["violations"][:50]), flush=True)
        environment.process_exit_code = 1
    elif stats.num_failures:
        print(f"load: {stats.num_failures} failed requests", flush=True)
        environment.process_exit_code = 1
    else:
        print("load: invariants hold, no failed requests", flush=True)

"""Test harness: real PostgreSQL, Redis and SMTP.

* PostgreSQL: $ORDERS_TEST_DATABASE_URL, else the machine's on 127.0.0.1:5432, else an
  embedded server started under a temporary directory. Each session creates a fresh
  database and drops it at the end.
* Redis: $ORDERS_TEST_REDIS_URL, else 127.0.0.1:6379, else embedded; every session uses
  its own key prefix (and the app its own db number), so parallel runs never collide.
* SMTP: a real aiosmtpd server on a free port.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import nats.js.errors
import orjson
import pytest
from asgi_lifespan import LifespanManager

from orders.app import create_app
from orders.auth import mint
from orders.db.pool import init_connection
from orders.dev.postgres import fresh_database, server_dsn
from orders.dev.redis import EmbeddedRedis, server_url
from orders.dev.smtp import SmtpSink
from orders.settings import Settings

JWT_SECRET = "test-only-jwt-secret-0123456789-abcdefghij"
WEBHOOK_SECRET = "test-only-webhook-secret-0123456789-klmnopqrst"


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="orders-test-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_root: Path) -> Iterator[str]:
    """A DSN of a server where we may create databases."""
    with server_dsn(tmp_root) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def database_url(pg_admin_dsn: str) -> Iterator[str]:
    with fresh_database(pg_admin_dsn, "orders_test") as url:
        yield url


@pytest.fixture
def isolated_db(pg_admin_dsn: str) -> Iterator[str]:
    """A database of its own, for tests whose relays must not share outbox rows with the
    session's app (other SMTP targets, several instances, crashes)."""
    with fresh_database(pg_admin_dsn, "orders_iso") as url:
        yield url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of the test's own, for faults (pause, kill, restart) no other test may see."""
    with EmbeddedRedis(tmp_path) as server:
        yield server  # stop() also resumes a paused server first


@pytest.fixture
async def isolated_pool(isolated_db: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on `isolated_db` for assertions (after an app has migrated it)."""
    pool = await asyncpg.create_pool(isolated_db, min_size=0, max_size=3, init=init_connection)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def redis_url(tmp_root: Path) -> Iterator[str]:
    with server_url(tmp_root) as url:
        yield url


@pytest.fixture(scope="session")
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture(scope="session")
def cache_prefix() -> str:
    return f"orders-test-{secrets.token_hex(4)}:"


@pytest.fixture(scope="session")
def base_env(database_url: str, redis_url: str, smtp: SmtpSink, cache_prefix: str) -> dict[str, str]:
    """The ORDERS_* environment of a test instance (also given to server subprocesses)."""
    return {
        "ORDERS_DATABASE_URL": database_url,
        "ORDERS_REDIS_URL": redis_url,
        "ORDERS_CACHE_PREFIX": cache_prefix,
        "ORDERS_SMTP_HOST": smtp.host,
        "ORDERS_SMTP_PORT": str(smtp.port),
        "ORDERS_SMTP_TIMEOUT_S": "3",
        "ORDERS_JWT_SECRET": JWT_SECRET,
        "ORDERS_PAYMENT_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "ORDERS_DB_POOL_MIN": "2",
        "ORDERS_DB_POOL_MAX": "20",
        # Longer than the 2 s default: the concurrency tests queue 80 requests on 20
        # connections, and a busy 2-core CI box must not turn that queue into 503s.
        "ORDERS_DB_ACQUIRE_TIMEOUT_S": "5",
        "ORDERS_RATE_LIMIT_PER_MINUTE": "0",
        # Tests reuse customer names across the session and some place many orders for one
        # customer (fuzzing, rate limits, load); the cap has its own app in test_pending_cap.py.
        "ORDERS_MAX_PENDING_ORDERS_PER_CUSTOMER": "1000",
        "ORDERS_LOG_LEVEL": "warning",
        "ORDERS_RELAY_INTERVAL_S": "0.5",
        # A day: no order of a long session expires under a test; the expiry tests set 1 s.
        "ORDERS_PAYMENT_TIMEOUT_S": "86400",
    }


@pytest.fixture(scope="session")
def make_settings(base_env: dict[str, str]) -> Any:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {k.removeprefix("ORDERS_").lower(): v for k, v in base_env.items()}
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with its lifespan, behind an httpx client."""
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orders.test", timeout=30) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest.fixture(scope="session")
async def client(make_settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(make_settings()) as c:
        yield c


@pytest.fixture(scope="session")
async def db(database_url: str, client: httpx.AsyncClient) -> AsyncIterator[asyncpg.Pool]:
    """A separate pool for assertions on what the service wrote (schema migrated by `client`)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=5, init=init_connection)
    assert pool is not None
    yield pool
    await pool.close()


def token(sub: str, *, admin: bool = False, **claims: Any) -> str:
    settings = Settings(_env_file=None, jwt_secret=JWT_SECRET, dev=True)  # type: ignore[call-arg]
    return mint(settings, sub, roles=["admin"] if admin else None, **claims)


def auth(sub: str, *, admin: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, admin=admin)}"}


ADMIN = {"Authorization": f"Bearer {token('staff-1', admin=True)}"}


def new_key() -> str:
    return uuid.uuid4().hex


def address(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "Ada Lovelace", "line1": "1 Main St", "line2": None,
        "city": "London", "postal_code": "N1 9GU", "country": "GB", **overrides,
    }


def order_body(*items: tuple[str, int], email: str = "buyer@example.com") -> dict[str, Any]:
    return {
        "email": email,
        "items": [{"sku": s, "quantity": q} for s, q in items],
        "shipping_address": address(),
    }


async def make_product(client: httpx.AsyncClient, *, stock: int = 100, price: int = 1299, currency: str = "USD", name: str = "Mug") -> str:
    sku = f"T-{uuid.uuid4().hex[:12]}"
    r = await client.put(
        f"/v1/products/{sku}", headers=ADMIN,
        json={"name": name, "unit_price": price, "currency": currency, "stock": stock},
    )
    assert r.status_code == 201, r.text
    return sku


async def place(
    client: httpx.AsyncClient, customer: str, *items: tuple[str, int], key: str | None = None, email: str = "buyer@example.com"
) -> httpx.Response:
    return await client.post(
        "/v1/orders",
        headers={**auth(customer), "Idempotency-Key": key or new_key()},
        json=order_body(*items, email=email),
    )


class RecordingRelay:
    """Stands in for the relay's fast path: records what it is handed."""

    def __init__(self) -> None:
        self.dispatched: list[int] = []

    def dispatch(self, ids: list[int]) -> None:
        self.dispatched += ids


class ScriptedSink(SmtpSink):
    """Answers RCPT TO of some addresses with a reply, a given number of times (None: for
    as long as it stays in `replies`); every other address is accepted."""

    def __init__(self, replies: dict[str, tuple[str, int | None]]) -> None:
        super().__init__()
        self.replies = replies
        self.refusals: Counter[str] = Counter()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.replies.get(address)
        if reply is not None and (reply[1] is None or self.refusals[address] < reply[1]):
            self.refusals[address] += 1
            return reply[0]
        envelope.rcpt_tos.append(address)
        return "250 OK"


def metric_sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text exposition (None when absent)."""
    wanted = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
    for line in text.splitlines():
        if line.startswith(f"{name}{wanted} "):
            return float(line.split()[-1])
    return None


async def stream_messages(url: str, stream: str = "ORDERS") -> list[dict[str, Any]]:
    """Every message of a JetStream stream, in stream order: subject, Nats-Msg-Id, envelope."""
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=2)
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return []
        out = []
        if not info.state.messages:  # an empty stream says first_seq 0, which get_msg refuses
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append({"subject": msg.subject, "msg_id": (msg.headers or {}).get("Nats-Msg-Id"),
                        "event": orjson.loads(msg.data)})
        return out
    finally:
        await nc.close()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.1, what: str = "condition") -> Any:
    """wait_for() for synchronous tests: poll `predicate` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(interval)


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Poll an async or sync predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)

"""structlog set-up, Prometheus metrics and the request middleware (pure ASGI).

Every log line of a request, and of the background work it starts, carries its
`request_id` (structlog contextvars; asyncio tasks copy the context they start in).

With several workers (`orders serve`, ORDERS_WORKERS > 1) the metrics are prometheus_client's
multiprocess files under $PROMETHEUS_MULTIPROC_DIR, which `orders serve` sets before the
workers start, so that /metrics answers for all of them whichever one takes the scrape.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orders import tracing
from orders.body import limited_receive
from orders.middleware import HttpMiddleware

if TYPE_CHECKING:
    import asyncpg

# prometheus_client chose its storage from this variable when it was imported; so do we.
MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")

REQUESTS = Counter("orders_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "orders_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route", "status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CACHE_EVENTS = Counter("orders_cache_requests_total", "Cache lookups", ["result"])
# Multiprocess modes: each worker has its own pool, so the pool gauges add up over the live
# workers; the outbox gauges measure the shared database, so the latest reading of a live
# worker is the answer.
POOL_SIZE = Gauge("orders_db_pool_size", "Connections in the asyncpg pool", multiprocess_mode="livesum")
POOL_IN_USE = Gauge("orders_db_pool_in_use", "Connections of the pool in use", multiprocess_mode="livesum")
NOTIFICATIONS_PENDING = Gauge(
    "orders_notifications_pending", "Outbox rows not yet delivered", multiprocess_mode="livemostrecent"
)
NOTIFICATIONS_SENT = Counter("orders_notifications_sent_total", "Outbox rows delivered", ["kind"])
NOTIFICATIONS_FAILED = Counter(
    "orders_notifications_failed_total", "Outbox delivery attempts that failed", ["kind", "final"]
)
RELAY_LAG = Gauge(
    "orders_relay_lag_seconds", "Age of the oldest due, undelivered outbox row", multiprocess_mode="livemostrecent"
)
NOTIFICATIONS_OLDEST_PENDING = Gauge(
    "orders_notifications_oldest_pending_seconds",
    "Age of the oldest undelivered outbox row (due or backing off)",
    multiprocess_mode="livemostrecent",
)
NOTIFICATIONS_FAILED_ROWS = Gauge(
    "orders_notifications_failed_rows",
    "Outbox rows given up (status failed) and not re-queued, by kind",
    ["kind"],
    multiprocess_mode="livemostrecent",
)
EVENTS_UNPUBLISHED = Gauge(
    "orders_events_unpublished",
    "Order events written to the outbox and not yet acknowledged by JetStream",
    multiprocess_mode="livemostrecent",
)
EVENTS_OLDEST_UNPUBLISHED = Gauge(
    "orders_events_oldest_unpublished_seconds",
    "Age of the oldest order event not yet acknowledged by JetStream",
    multiprocess_mode="livemostrecent",
)
# The outbox's kinds of row, the `kind` label of the notification metrics.
OUTBOX_KINDS = ("email", "audit", "event")
# From 0 in every process: increase() misses the first failure of a series that appears at 1,
# and the OrdersNotificationsFailed alert (k8s/monitoring/prometheusrule.yaml) counts each one.
for _kind in OUTBOX_KINDS:
    NOTIFICATIONS_SENT.labels(_kind)
    for _final in ("true", "false"):
        NOTIFICATIONS_FAILED.labels(_kind, _final)
PAYMENT_OUTCOMES = ("paid", "duplicate", "amount_mismatch", "refund_required", "recorded", "ignored")
PAYMENT_EVENTS = Counter("orders_payment_events_total", "Authentic payment events handled, by outcome", ["outcome"])
EXPIRED_ORDERS = Counter("orders_expired_total", "Pending orders cancelled because their payment timed out")
for _outcome in PAYMENT_OUTCOMES:  # from 0, like the notification counters above
    PAYMENT_EVENTS.labels(_outcome)
HTTP_GUARDED = Counter(
    "orders_http_guarded_total",
    "Requests refused or connections closed by the HTTP guards of `orders serve`",
    ["reason"],
)
POOL_SAMPLE_INTERVAL_S = 5.0
# How late the event loop runs a timer: everything that holds the loop (a long callback,
# a GC pause, a synchronous render) delays every request of the worker by as much.
LOOP_LAG = Histogram(
    "orders_event_loop_lag_seconds",
    "How much later than due the event loop woke a sleeper (sampled every 0.05 s)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LOOP_LAG_INTERVAL_S = 0.05


def set_pool_gauges(pool: asyncpg.Pool) -> None:
    POOL_SIZE.set(pool.get_size())
    POOL_IN_USE.set(pool.get_size() - pool.get_idle_size())


@asynccontextmanager
async def pool_gauges(pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Alone, the process sets its pool gauges when it answers /metrics. With several
    workers a scrape reaches one of them: each refreshes its own every few seconds."""
    if MULTIPROC_DIR is None:
        yield
        return

    async def sample() -> None:
        while True:
            set_pool_gauges(pool)
            await asyncio.sleep(POOL_SAMPLE_INTERVAL_S)

    task = asyncio.get_running_loop().create_task(sample())
    try:
        yield
    finally:
        task.cancel()


@asynccontextmanager
async def loop_lag_monitor(interval_s: float = LOOP_LAG_INTERVAL_S) -> AsyncIterator[None]:
    """Samples the event loop's lag while the block runs: sleeps `interval_s` and observes
    how much longer than that it took to be woken (perf_counter: uvloop's clock has 1 ms steps)."""

    async def sample() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(interval_s)
            LOOP_LAG.observe(max(0.0, time.perf_counter() - start - interval_s))

    task = asyncio.get_running_loop().create_task(sample())
    try:
        yield
    finally:
        task.cancel()


def metrics_text() -> bytes:
    """The Prometheus exposition of this process, or of every worker's files."""
    if MULTIPROC_DIR is None:
        return generate_latest()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=MULTIPROC_DIR)
    return generate_latest(registry)


_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_REDACTED_KEYS = frozenset({"email", "to", "authorization", "token", "password", "jwt"})


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in _REDACTED_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


class _UtcTimestamp:
    """structlog's TimeStamper(fmt="iso", utc=True), same form ("2026-01-02T03:04:05.678901Z";
    six fraction digits even at a whole second, where TimeStamper writes none), at a fraction
    of its cost: the date and time to the second are formatted once a second, not once a
    line (it was the dearest step of every access log line)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


def _colors(stream: Any) -> bool:
    """Colour the console lines where they go to a terminal (every line, ours and uvicorn's, is
    written to stdout); NO_COLOR and FORCE_COLOR (no-color.org, force-color.org) override."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """structlog for our lines, stdlib (uvicorn, asyncio) rendered by the same chain."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        *tracing.log_processors(),
        structlog.processors.add_log_level,
        _UtcTimestamp(),
        _redact,
    ]
    if fmt == "console":
        renderer: Any = structlog.dev.ConsoleRenderer(colors=_colors(sys.stdout))
    else:
        renderer = structlog.processors.JSONRenderer(serializer=lambda o, **_: orjson.dumps(o, default=str).decode())
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write() per line (print() makes two, the line and its newline, when stdout is
        # unbuffered): no partial records in the container runtime's log, no line of another
        # worker in between.
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # format_exc_info: a stdlib record's exc_info (uvicorn's errors) becomes the
            # formatted `exception` field, as for our own lines, not a repr of the tuple.
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.processors.format_exc_info],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # RequestContext logs each request


access_log = structlog.get_logger("orders.access")
_app_log = structlog.get_logger("orders.app")  # the safety net's lines, as orders.app.CatchAll logs them


class Throttled:
    """A warning per cause at most once every `interval_s` seconds, with how many times the
    cause occurred since the last line (`count`): a flood of 503s or of refused connections
    must not flood the log too."""

    def __init__(self, logger: Any, event: str, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.event = event
        self.interval_s = interval_s
        self._seen: dict[str, list[float]] = {}  # cause -> [last logged (monotonic), count]; causes are a fixed set

    def __call__(self, cause: str, **fields: Any) -> None:
        now = time.monotonic()
        seen = self._seen.get(cause)
        if seen is None:
            seen = self._seen[cause] = [now - self.interval_s, 0]
        seen[1] += 1
        if now - seen[0] >= self.interval_s:
            self.logger.warning(self.event, cause=cause, count=int(seen[1]), **fields)
            seen[0], seen[1] = now, 0


# Why requests got 503 (pool exhausted, database unreachable, draining...): once per cause
# every 10 s, with how often it happened meanwhile.
unavailable_log = Throttled(structlog.get_logger("orders.unavailable"), "unavailable")

# The metric children of each (method, route, status) seen: `labels()` validates and locks
# on every call; routes are templates, so this stays small.
_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _request_metrics(method: str, route: str, status: int) -> tuple[Any, Any]:
    key = (method, route, status)
    pair = _children.get(key)
    if pair is None:
        pair = _children[key] = (REQUESTS.labels(method, route, status), LATENCY.labels(method, route, status))
    return pair


class RequestContext(HttpMiddleware):
    """The one middleware every request goes through: X-Request-ID in and out, the body
    limit (orders/body.py), the HTTP metrics and one access log line; with `on_error`, the
    safety net too: an unexpected exception becomes a bare 500 problem (the traceback goes
    to the log, never to the client), still with its X-Request-ID. One layer, not four:
    each layer is a call and a send wrapper more on every request (docs/PERFORMANCE.md).

    Without `on_error` (when CORS sits in between, so that the 500 carries its headers),
    app.py puts orders.app.CatchAll inside CORS instead.

    `fast_path` (orders/api/fast_get.py) may answer a request before the app sees it, with
    the same request id, metrics and log line; what it does not answer goes to the app."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        on_error: Callable[[], ASGIApp] | None = None,
        fast_path: Callable[[Scope, Send], Awaitable[bool]] | None = None,
    ) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes
        self.on_error = on_error
        self.fast_path = fast_path

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _SANE_REQUEST_ID.match(candidate):
                    request_id = candidate
                break
        # 32 random hex digits, as uuid4().hex was, for a quarter of its cost.
        request_id = request_id or os.urandom(16).hex()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 0
        start = time.perf_counter()
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            if self.fast_path is None or not await self.fast_path(scope, send_with_id):
                await self.app(scope, limited_receive(scope, receive, self.max_bytes), send_with_id)
        except ClientDisconnect:
            # The client went away while its body was being read: no server error, and
            # no answer (counted as 499 below).
            if self.on_error is None:
                raise
            _app_log.info("client_disconnected", method=scope["method"], path=scope["path"])
        except Exception:
            if self.on_error is None or status:
                status = status or 500
                if self.on_error is not None:
                    _app_log.exception("unhandled_error")
                raise
            _app_log.exception("unhandled_error")
            await self.on_error()(scope, receive, send_with_id)
        except BaseException:
            status = status or 500
            raise
        finally:
            # Returned without an answer: the client went away first (the safety net
            # answers every error). 499 as nginx counts it, so that it never inflates the 5xx.
            status = status or 499
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            count, latency = _request_metrics(method, template, status)
            count.inc()
            latency.observe(elapsed)
            if template not in ("/healthz", "/readyz", "/metrics"):
                access_log.info(
                    "request",
                    method=method,
                    route=template,
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                )
            structlog.contextvars.clear_contextvars()

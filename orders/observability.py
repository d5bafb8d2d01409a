"""structlog set-up, Prometheus metrics and the request middleware (pure ASGI).

Every log line of a request, and of the background work it starts, carries its
`request_id` (structlog contextvars; asyncio tasks copy the context they start in).
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from typing import Any

import orjson
import structlog
from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("orders_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "orders_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route", "status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CACHE_EVENTS = Counter("orders_cache_requests_total", "Cache lookups", ["result"])
POOL_SIZE = Gauge("orders_db_pool_size", "Connections in the asyncpg pool")
POOL_IN_USE = Gauge("orders_db_pool_in_use", "Connections of the pool in use")
NOTIFICATIONS_PENDING = Gauge("orders_notifications_pending", "Outbox rows not yet delivered")
NOTIFICATIONS_SENT = Counter("orders_notifications_sent_total", "Outbox rows delivered", ["kind"])
NOTIFICATIONS_FAILED = Counter(
    "orders_notifications_failed_total", "Outbox delivery attempts that failed", ["kind", "final"]
)
RELAY_LAG = Gauge("orders_relay_lag_seconds", "Age of the oldest due, undelivered outbox row")

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_REDACTED_KEYS = frozenset({"email", "to", "authorization", "token", "password", "jwt"})


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in _REDACTED_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """structlog for our lines, stdlib (uvicorn, asyncio) rendered by the same chain."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    if fmt == "console":
        renderer: Any = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
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
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
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

# The metric children of each (method, route, status) seen: `labels()` validates and locks
# on every call; routes are templates, so this stays small.
_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _request_metrics(method: str, route: str, status: int) -> tuple[Any, Any]:
    key = (method, route, status)
    pair = _children.get(key)
    if pair is None:
        pair = _children[key] = (REQUESTS.labels(method, route, status), LATENCY.labels(method, route, status))
    return pair


class RequestContext:
    """X-Request-ID in and out, one access log line and the HTTP metrics per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _SANE_REQUEST_ID.match(candidate):
                    request_id = candidate
                break
        request_id = request_id or uuid.uuid4().hex
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500
        start = time.perf_counter()
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
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

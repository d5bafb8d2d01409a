"""create_app(settings): the lifespan, middleware, routers and error handlers."""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from orders import tracing
from orders.api import admin, docs, health, orders, payments, products
from orders.api.fast_get import FastGet
from orders.api.openapi import add_schemas
from orders.api.problems import install_handlers, internal_error
from orders.cors import ProblemCORSMiddleware
from orders.middleware import HttpMiddleware
from orders.observability import RequestContext, configure_logging, loop_lag_monitor, pool_gauges
from orders.resources import open_resources
from orders.schemas import OrderCreate, PaymentEventIn, ProductIn, StatusChange
from orders.settings import Settings

log = structlog.get_logger("orders.app")

EXPOSED_HEADERS = ["ETag", "Location", "X-Request-ID", "Idempotent-Replayed", "Retry-After"]
# traceparent/tracestate: the checkout frontend's trace continues here (orders/tracing.py).
ALLOWED_HEADERS = [
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "If-Match",
    "X-Request-ID",
    "traceparent",
    "tracestate",
]


class CatchAll(HttpMiddleware):
    """The safety net when CORS is on, inside it (RequestContext carries it otherwise): an
    unexpected exception becomes a bare 500 problem (the traceback goes to the log, never
    to the client), inside RequestContext so that it still carries X-Request-ID. A client that went away while its body was being read
    is no server error: an info line, and no answer (RequestContext counts it as 499)."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            log.info("client_disconnected", method=scope["method"], path=scope["path"])
        except Exception:
            log.exception("unhandled_error")
            if started:
                raise
            await internal_error()(scope, receive, send)


def _watch_sigterm(app: FastAPI) -> Any:
    """Readiness turns 503 the moment SIGTERM arrives, before the server drains.

    Chains to the server's own handler (uvicorn's), which then stops accepting and
    drains; lifespan shutdown (below) comes after the in-flight requests finished.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        res = getattr(app.state, "res", None)
        if res is not None:
            res.start_draining()
        log.info("sigterm_received", detail="draining")
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    return previous


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()  # type: ignore[call-arg]
    configure_logging(settings.log_format, settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with open_resources(settings) as res, pool_gauges(res.pool), loop_lag_monitor():
            app.state.res = res
            previous = _watch_sigterm(app)
            # What start-up built (modules, routes, schemas, pools) lives as long as the
            # process: out of the collector's sight, a full collection under load scans
            # only what came after (shorter gen-2 pauses: docs/PERFORMANCE.md).
            gc.collect()
            gc.freeze()
            try:
                yield {"res": res}
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
        await asyncio.to_thread(tracing.flush)  # the relay's last deliveries included

    app = FastAPI(
        title="orders",
        version="1.0.0",
        description="Order service of the checkout. Errors are application/problem+json (RFC 9457).",
        lifespan=lifespan,
        # Served by orders/api/docs.py from packaged assets, not from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    install_handlers(app)
    # The routes go straight onto the application's router, not through include_router,
    # which re-walks an included router's routes on every request (docs/PERFORMANCE.md).
    # The routers carry only a prefix and tags, which their routes already hold.
    for router in (products.router, orders.router, payments.router, admin.router, health.router, docs.router):
        app.router.routes.extend(router.routes)
    app.router.routes.append(docs.assets)

    # Outermost last: RequestContext(app), or RequestContext(CORS(CatchAll(app))) so that a
    # 500 carries the CORS headers too.
    on_error: Callable[[], Any] | None = internal_error
    if settings.cors_origin_list:
        on_error = None
        app.add_middleware(CatchAll)
        app.add_middleware(
            ProblemCORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "PUT"],
            allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
    # Not with tracing on: the route's span and its Redis span are what a trace is for.
    fast_path = None
    if settings.fast_get and not tracing.wanted():
        route = next(r for r in app.router.routes if getattr(r, "endpoint", None) is orders.get_order)
        fast_path = FastGet(route, cors=bool(settings.cors_origin_list))
    app.add_middleware(RequestContext, max_bytes=settings.max_body_bytes, on_error=on_error, fast_path=fast_path)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = add_schemas(spec, OrderCreate, StatusChange, ProductIn, PaymentEventIn)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    tracing.instrument(app)
    return app

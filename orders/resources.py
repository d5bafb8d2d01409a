"""The long-lived resources of one process, owned by the ASGI lifespan.

Opened in order (pool, cache, mailer, NATS publisher, relay) and closed in reverse. Nothing here is
created at import time; the app reaches them through `request.state` (see deps.py).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import asyncpg
import structlog

from orders.auth import TokenVerifier
from orders.cache import Cache
from orders.db.migrate import migrate
from orders.db.pool import CONNECTION_ERRORS, create_pool
from orders.invalidation_log import InvalidationLog
from orders.notify.email import Mailer
from orders.notify.events import EventPublisher, publisher
from orders.notify.relay import Relay
from orders.ratelimit import RateLimiter
from orders.service.expiry import Expiry
from orders.service.price_list import PriceList
from orders.service.unit_of_work import UnitOfWork
from orders.settings import Settings

log = structlog.get_logger("orders.resources")


@dataclass
class Resources:
    settings: Settings
    pool: asyncpg.Pool
    cache: Cache
    mailer: Mailer
    relay: Relay
    limiter: RateLimiter
    verifier: TokenVerifier
    events: EventPublisher | None = None  # None: order events off (no ORDERS_NATS_URL)
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    # When SIGTERM arrived (time.monotonic()): the shutdown grace counts from there.
    sigterm_at: float | None = None
    # The catalog terms new orders are priced from (orders/service/price_list.py).
    price_list: PriceList = field(default_factory=PriceList)

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(
            self.pool,
            self.cache,
            self.relay,
            self.settings.db_acquire_timeout_s,
            price_list=self.price_list,
            events=self.settings.events_on,
        )

    def start_draining(self) -> None:
        if self.sigterm_at is None:
            self.sigterm_at = time.monotonic()
        self.draining.set()


class StartupAborted(Exception):
    """SIGTERM arrived while start-up was waiting (for its database)."""


@contextmanager
def _sigterm_ends_wait() -> Iterator[None]:
    """SIGTERM while start-up waits for the database ends the wait at once. The server's
    own handler still runs, but it acts only once start-up is over: without this, the
    process would exit when the wait gave up, tens of seconds later."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    previous = signal.getsignal(signal.SIGTERM)
    received = False

    def on_sigterm(signum: int, frame: object) -> None:
        nonlocal received
        received = True
        loop.call_soon_threadsafe(task.cancel)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except asyncio.CancelledError:
        if not received:
            raise
        task.uncancel()
        log.warning("startup_aborted", reason="SIGTERM while waiting for the database")
        raise StartupAborted("SIGTERM during start-up") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


async def _connect_pool(settings: Settings, attempts: int = 30) -> asyncpg.Pool:
    """The pool, waiting (bounded) for a database that is still starting."""
    for attempt in range(attempts):
        try:
            return await create_pool(settings)
        except CONNECTION_ERRORS as exc:
            if attempt == attempts - 1:
                raise
            log.warning("database_not_ready", error=type(exc).__name__, attempt=attempt + 1)
            await asyncio.sleep(1)
    raise AssertionError("unreachable")


@asynccontextmanager
async def open_resources(settings: Settings) -> AsyncIterator[Resources]:
    verifier = TokenVerifier(settings)
    with _sigterm_ends_wait():
        if settings.migrate_on_start:
            applied = await migrate(settings.dsn)
            log.info("migrations_checked", applied=applied)
        pool = await _connect_pool(settings)
    cache = Cache.connect(settings, InvalidationLog(pool, settings.db_acquire_timeout_s))
    mailer = Mailer(settings)
    events = publisher(settings)
    if events is not None:
        events.start()  # connects in the background: NATS down must not stop start-up
    elif not settings.dev:
        log.warning("events_off", detail="ORDERS_NATS_URL is not set: no order events are published")
    relay = Relay(pool, mailer, settings, replay_invalidations=cache.replay_invalidations, events=events)
    res = Resources(
        settings=settings,
        pool=pool,
        cache=cache,
        mailer=mailer,
        relay=relay,
        limiter=RateLimiter(cache, settings.rate_limit_per_minute),
        verifier=verifier,
        events=events,
    )
    relay.start()
    expiry = Expiry(res.unit_of_work, settings.payment_timeout_s)
    expiry.start()
    log.info("started", pool_max=settings.db_pool_max, cache=cache.enabled)
    try:
        yield res
    finally:
        res.start_draining()
        # Before the relay stops, which then flushes the emails of the last expiries.
        await expiry.stop()
        # ORDERS_SHUTDOWN_GRACE_S counts from SIGTERM: uvicorn's drain used part of it.
        assert res.sigterm_at is not None
        await relay.stop(res.sigterm_at + settings.shutdown_grace_s)
        if events is not None:
            await events.close()
        await mailer.close()
        await cache.close()
        try:
            await asyncio.wait_for(pool.close(), timeout=5)
        except TimeoutError:
            pool.terminate()
        log.info("stopped")

"""The NATS JetStream connection that order events are published on (a lifespan resource).

`start()` never waits for NATS: the connection is made in the background, retried with a
bounded backoff while NATS is down, and re-established by the client after a drop. Until
then `publish()` fails at once (EventsUnavailable), and the relay retries the row later:
an outage delays events, it never stops orders, nor start-up, nor /readyz.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext

from orders.settings import Settings

log = structlog.get_logger("orders.events")

SUBJECT_PREFIX = "orders."
CONNECT_BACKOFF_MAX_S = 10.0
CLOSE_TIMEOUT_S = 5.0
ERROR_LOG_S = 10.0


class EventsUnavailable(Exception):
    """NATS is not connected now: the event waits for a retry."""


class EventPublisher:
    def __init__(self, settings: Settings) -> None:
        assert settings.nats_url
        # Comma-separated: the servers of one cluster (the client fails over between them).
        self.servers = [u.strip() for u in settings.nats_url.split(",") if u.strip()]
        self.stream = settings.nats_stream
        self.connect_timeout_s = settings.nats_connect_timeout_s
        self.publish_timeout_s = settings.nats_publish_timeout_s
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        # Checked (created if missing) before the first publish after each (re)connect:
        # a NATS server that came back without its store has no stream.
        self._stream_ready = False
        self._stream_lock = asyncio.Lock()
        self._connector: asyncio.Task[None] | None = None
        self._error_logged_at = -ERROR_LOG_S
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def start(self) -> None:
        self._connector = asyncio.get_running_loop().create_task(self._connect_forever())

    async def _connect_forever(self) -> None:
        delay = 0.5
        while True:
            try:
                nc = await asyncio.wait_for(
                    nats.connect(
                        self.servers,
                        name="orders",
                        connect_timeout=self.connect_timeout_s,
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,  # after a drop: until it is back
                        reconnect_time_wait=1,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                    ),
                    timeout=self.connect_timeout_s * 2,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # down, refused, timed out: try again
                log.warning("nats_connect_failed", error=type(exc).__name__, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(CONNECT_BACKOFF_MAX_S, delay * 2)
                continue
            self._nc, self._js = nc, nc.jetstream(timeout=self.publish_timeout_s)
            log.info("nats_connected", stream=self.stream)
            return

    async def _on_error(self, exc: Exception) -> None:
        # The client retries every second while NATS is down: one line per ERROR_LOG_S.
        now = time.monotonic()
        if now - self._error_logged_at >= ERROR_LOG_S:
            self._error_logged_at = now
            log.warning("nats_error", error=type(exc).__name__)

    async def _on_disconnected(self) -> None:
        self._stream_ready = False
        if not self._closing:
            log.warning("nats_disconnected", detail="events wait until NATS is back")

    async def _on_reconnected(self) -> None:
        log.info("nats_reconnected")

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        async with self._stream_lock:
            if self._stream_ready:
                return
            try:
                await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                await js.add_stream(name=self.stream, subjects=[SUBJECT_PREFIX + ">"])
                log.info("nats_stream_created", stream=self.stream)
            self._stream_ready = True

    async def publish(self, event_type: str, event_id: str, body: bytes) -> None:
        """Publish one event to "orders." + its type and wait (bounded) for JetStream's ack.
        The event id is the Nats-Msg-Id: JetStream drops a re-publish within its
        duplicate window (a crash between the ack and the row marked sent)."""
        nc, js = self._nc, self._js
        if nc is None or js is None or not nc.is_connected:
            # Not handed to the client's reconnect buffer: the row waits in PostgreSQL instead.
            raise EventsUnavailable("NATS is not connected")
        async with asyncio.timeout(self.publish_timeout_s * 2):
            if not self._stream_ready:
                await self._ensure_stream(js)
            try:
                await js.publish(
                    SUBJECT_PREFIX + event_type,
                    body,
                    timeout=self.publish_timeout_s,
                    headers={"Nats-Msg-Id": event_id},
                )
            except nats.js.errors.NoStreamResponseError:
                self._stream_ready = False  # deleted, or a server without its store: made again
                raise

    async def close(self) -> None:
        self._closing = True
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connector
        nc, self._nc, self._js = self._nc, None, None
        if nc is None:
            return
        try:
            await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)
        except Exception as exc:
            log.warning("nats_close_failed", error=type(exc).__name__)


def publisher(settings: Settings) -> EventPublisher | None:
    """The publisher when events are on, else None."""
    return EventPublisher(settings) if settings.events_on else None

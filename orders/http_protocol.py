"""The HTTP/1.1 protocol of `orders serve`: uvicorn's httptools protocol plus the guards
that httptools and uvicorn lack (docs/API.md, "Limits").

- A request head (request line and headers) larger than ORDERS_MAX_HEADER_BYTES gets 431
  and its connection closes. No more than that is ever fed to the parser, which otherwise
  buffers a header of any size (and re-copies it on every read).
- A head must arrive whole within ORDERS_HEADER_TIMEOUT_S of its first byte, and a body
  may not stall longer than ORDERS_BODY_TIMEOUT_S between reads: 408, or a plain close when
  an answer can no longer be sent (another response is under way on the connection).
- At most ORDERS_MAX_CONNECTIONS connections per worker: one more gets 503 and is closed
  at once, before anything of it is read.
- On shutdown, a request whose body is still arriving gets 503 and its connection closes
  (nothing of it was processed: the client retries elsewhere), instead of holding the
  drain until uvicorn cancels it into a text/plain 500.

The cost per request is a byte counter, two loop.time() calls and, at most once per
ORDERS_HEADER_TIMEOUT_S per connection, a timer (it stays armed across requests and
re-arms itself for the request under way): the parser stays httptools.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import get_remote_addr
from uvicorn.server import ServerState

from orders.api.problems import PROBLEM_MEDIA_TYPE, problem
from orders.observability import HTTP_GUARDED, Throttled
from orders.settings import Settings

log = structlog.get_logger("orders.http")
guard_log = Throttled(log, "http_guard")

# reason -> (status, problem slug, title, detail) of the answer, when one can be sent.
ANSWERS = {
    "header_too_large": (431, "header-too-large", "Request header fields too large", "the request head is too large"),
    "header_timeout": (408, "request-timeout", "Request timeout", "the request head did not arrive in time"),
    "body_timeout": (408, "request-timeout", "Request timeout", "the request body stalled"),
    "too_many_connections": (503, "unavailable", "Service unavailable", "too many connections, retry later"),
    "shutdown": (503, "unavailable", "Service unavailable", "the service is shutting down, retry elsewhere"),
}


@dataclass(frozen=True)
class Limits:
    """The guards' settings (their defaults are those of orders.settings)."""

    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            settings.max_header_bytes, settings.header_timeout_s, settings.body_timeout_s, settings.max_connections
        )


class Config(uvicorn.Config):
    """uvicorn's Config with this protocol and its limits (both reach the workers of
    ORDERS_WORKERS > 1, which get the config pickled)."""

    def __init__(self, app: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(app, http=HttpProtocol, **kwargs)
        self.limits = limits


def _answer(reason: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    status, slug, title, detail = ANSWERS[reason]
    body = orjson.dumps(problem(status, slug, title, detail))
    head = [STATUS_LINE[status]]
    for name, value in [
        *default_headers,
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"x-request-id", uuid.uuid4().hex.encode()),
        *([(b"retry-after", b"1")] if status == 503 else []),
    ]:
        head += [name, b": ", value, b"\r\n"]
    return b"".join([*head, b"\r\n", body])


class HttpProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = config.limits
        self.max_head = limits.max_header_bytes
        self.head_timeout = limits.header_timeout_s
        self.body_timeout = limits.body_timeout_s
        self.max_connections = limits.max_connections
        # Bytes the current head may still take; None while its body arrives.
        self.head_left: int | None = self.max_head
        # When the request under way expires (loop time); None between requests.
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self.transport = transport  # for connection_lost
            self.client = get_remote_addr(transport)
            transport.write(_answer("too_many_connections", self.server_state.default_headers))
            transport.close()
            self._count("too_many_connections")
            return
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        left = self.head_left
        if left is None:  # a body: it made progress
            self.deadline = self.loop.time() + self.body_timeout
        elif len(data) > left:
            self._feed_past_limit(data, left)
            return
        else:
            if self.deadline is None:  # the first bytes of a head (even bare CRLFs)
                self._start_head_clock()
            self.head_left = left - len(data)
        super().data_received(data)

    def _feed_past_limit(self, data: bytes, left: int) -> None:
        """Feed what the head may still take; if the head did not end within it, 431.
        The rest (a body, the next request) is fed on as a read of its own. A pipelined
        head that begins in the same read as the previous request ends is counted from
        its next read: it may pass the limit by less than one read, never without bound."""
        self.head_left = 0
        super().data_received(data[:left])
        if self.transport.is_closing():  # a malformed request: uvicorn answered 400
            return
        if self.head_left == 0:
            self._refuse("header_too_large")
        else:
            self.data_received(data[left:])

    def _start_head_clock(self) -> None:
        self.deadline = self.loop.time() + self.head_timeout
        if self.timer is None:
            self.timer = self.loop.call_later(self.head_timeout, self._on_timer)

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.deadline is None:  # a pipelined head that began in the previous request's read
            self._start_head_clock()

    def on_headers_complete(self) -> None:
        self.head_left = None
        self.deadline = self.loop.time() + self.body_timeout
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.head_left = self.max_head
        self.deadline = None  # the timer, when it fires, finds nothing to do and stops

    def _on_timer(self) -> None:
        self.timer = None
        if self.deadline is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if now >= self.deadline and self.head_left is None and self._reading_waits_for_app():
            self.deadline = now + self.body_timeout  # the stall is ours, not the client's
        if now < self.deadline:
            self.timer = self.loop.call_later(self.deadline - now, self._on_timer)
            return
        self._refuse("header_timeout" if self.head_left is not None else "body_timeout")

    def _reading_waits_for_app(self) -> bool:
        """Reading is paused until the app takes what arrived, or the client waits for
        the `100 Continue` the app has not asked for yet."""
        return self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue)

    def shutdown(self) -> None:
        cycle = self.cycle
        if (
            self.head_left is None
            and cycle is not None
            and not cycle.response_started
            and not self.transport.is_closing()
        ):
            self._refuse("shutdown")  # its body is still arriving: nothing was processed
        else:
            super().shutdown()

    def _refuse(self, reason: str) -> None:
        """Answer `reason` if nothing else is being answered on the connection, then close.
        The request's app task (if it started) sees a disconnect and sends nothing."""
        cycle = self.cycle
        in_body = self.head_left is None and cycle is not None
        if in_body:
            can_answer = not self.pipeline and not cycle.response_started
        else:
            can_answer = not self.pipeline and (cycle is None or cycle.response_complete)
        if can_answer:
            self.transport.write(_answer(reason, self.server_state.default_headers))
        if in_body and not cycle.response_complete:
            cycle.keep_alive = False
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()
        self._count(reason)

    def _count(self, reason: str) -> None:
        HTTP_GUARDED.labels(reason).inc()
        guard_log(reason, client=self.client[0] if self.client else None)

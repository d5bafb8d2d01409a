"""Delivery of outbox rows: the fast path after a response, and the relay loop.

* `dispatch(ids)` is what a request's BackgroundTask calls: it queues that request's
  rows for the dispatcher and returns at once, so a slow or hung SMTP server never holds
  the HTTP connection (nor the next request on it). The queue is bounded
  (`ORDERS_NOTIFY_QUEUE_MAX` rows); past that the rows wait for the relay.
  Nothing is lost either way: the rows are in PostgreSQL.
* The dispatcher takes whatever is queued as one batch (so under load many orders share
  one claim, one SMTP session and one "sent" statement) and runs up to
  `ORDERS_RELAY_CONCURRENCY` batches at a time. Under saturation every SMTP command
  waits for a full turn of a busy event loop, so a few sessions alone fall far behind
  (docs/PERFORMANCE.md).
* The relay loop claims due rows with FOR UPDATE SKIP LOCKED plus a lease, so replicas
  share the work without sending a row twice. A failed row backs off exponentially, up
  to `ORDERS_RELAY_BACKOFF_MAX_S`. Transient failures (the network, timeouts, 4xx
  replies, a session that cannot be opened) are retried for as long as it takes; a
  permanent one (a 5xx reply to the row's message, a refused recipient, an address that
  cannot be encoded) makes the row `failed` at once (metric + error log): retrying it
  would get the same answer. An operator re-queues it (`orders outbox retry`, or
  POST /v1/admin/notifications/{id}/retry). The loop also replays recorded cache
  invalidations.
* Housekeeping, a task of its own every HOUSEKEEPING_S: the outbox metrics, and
  retention: sent rows and idempotency records past their retention are deleted batch
  after batch until none is left, so it keeps up with any sustained rate.
* `stop(deadline)` stops all of it, waits for batches under way and flushes what it can
  before the deadline; whatever is left stays pending for the next replica.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiosmtplib
import asyncpg
import orjson
import structlog

from orders import tracing
from orders.db import idempotency, outbox
from orders.db.outbox import FAST_PATH_HEAD_START_S
from orders.db.pool import connection
from orders.notify.email import Mailer, render
from orders.notify.events import EventPublisher
from orders.observability import (
    EVENTS_OLDEST_UNPUBLISHED,
    EVENTS_UNPUBLISHED,
    NOTIFICATIONS_FAILED,
    NOTIFICATIONS_FAILED_ROWS,
    NOTIFICATIONS_OLDEST_PENDING,
    NOTIFICATIONS_PENDING,
    NOTIFICATIONS_SENT,
    OUTBOX_KINDS,
    RELAY_LAG,
)
from orders.settings import Settings

log = structlog.get_logger("orders.notify")
audit_log = structlog.get_logger("audit")

DISPATCH_LINGER_S = 0.05
BACKPRESSURE_LOG_S = 5.0
BACKOFF_BASE_S = 1.0
HOUSEKEEPING_S = 30.0
# Rows one retention statement deletes: a short transaction, whatever the backlog.
RETENTION_BATCH = 2000
# Errors after which an SMTP session is unusable: the rest of the batch waits for a retry.
SESSION_ERRORS: tuple[type[BaseException], ...] = (
    aiosmtplib.SMTPServerDisconnected,
    aiosmtplib.SMTPConnectError,
    aiosmtplib.SMTPTimeoutError,
    TimeoutError,
    OSError,
)


def _span_attributes(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "orders.outbox.id": row["id"],
        "orders.order.id": str(row["order_id"]),
        "orders.outbox.attempt": row["attempts"],
    }


def _row_context(row: asyncpg.Record) -> Any:
    """The row's request and order on the log lines of its delivery."""
    return structlog.contextvars.bound_contextvars(
        request_id=row["payload"].get("request_id"), order_id=str(row["order_id"])
    )


class LeaseBudgetSpent(Exception):
    """A delivery batch ran out of lease time (a slow SMTP server)."""


def backoff(attempts: int, cap_s: float) -> float:
    """Exponential, with jitter: ~1, 2, 4, ... seconds, at most `cap_s`. The exponent is
    bounded: a row retried for days has thousands of attempts (2.0 ** 1100 overflows)."""
    return min(cap_s, BACKOFF_BASE_S * 2 ** min(30, max(0, attempts - 1))) * random.uniform(0.8, 1.0)


def transient(exc: BaseException) -> bool:
    """A failure of one message that says nothing final about its row: a 4xx reply.
    (Failures of the session itself are transient too; `_deliver_emails` knows those.)"""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(r.code < 500 for r in exc.recipients)
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code < 500


class Relay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        mailer: Mailer,
        settings: Settings,
        replay_invalidations: Callable[[], Awaitable[None]] | None = None,
        events: EventPublisher | None = None,
    ) -> None:
        self.pool = pool
        self.mailer = mailer
        # None: this relay leaves order events alone (the claims skip them).
        self.events = events
        self.settings = settings
        self.replay_invalidations = replay_invalidations
        self._queue: deque[int] = deque()
        self._queue_max = settings.notify_queue_max
        self._queued = asyncio.Event()
        self._left_to_relay = 0
        self._backpressure_logged_at = -BACKPRESSURE_LOG_S
        self._batches: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.relay_concurrency)
        self._dispatcher: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._housekeeper: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    # -- fast path -------------------------------------------------------------

    def dispatch(self, ids: list[int]) -> None:
        """Queue committed rows for the dispatcher (a request's BackgroundTask, through
        its unit of work); never waits."""
        if not ids:
            return
        if self._stopping.is_set() or len(self._queue) + len(ids) > self._queue_max:
            # The relay delivers them. One line per BACKPRESSURE_LOG_S, not one per
            # request: under overload that would be a log line per order.
            self._left_to_relay += len(ids)
            now = time.monotonic()
            if now - self._backpressure_logged_at >= BACKPRESSURE_LOG_S:
                log.warning("notify_backpressure", rows_left_to_relay=self._left_to_relay)
                self._left_to_relay, self._backpressure_logged_at = 0, now
            return
        self._queue.extend(ids)
        self._queued.set()

    async def _dispatch_forever(self) -> None:
        while True:
            await self._queued.wait()
            # Let the rows of the next few responses join this batch: below saturation
            # every order would otherwise pay its own claim, SMTP session and "sent" statements.
            await asyncio.sleep(DISPATCH_LINGER_S)
            self._queued.clear()
            while self._queue:
                await self._slots.acquire()
                ids = [self._queue.popleft() for _ in range(min(len(self._queue), self.settings.relay_batch))]
                task = asyncio.get_running_loop().create_task(self._deliver_ids(ids))
                self._batches.add(task)
                task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._slots.release()

    async def _deliver_ids(self, ids: list[int]) -> None:
        try:
            async with connection(self.pool, self.settings.db_acquire_timeout_s) as conn:
                rows = await outbox.claim_ids(conn, ids, self.settings.relay_lease_s, self.events is not None)
        except Exception as exc:
            log.warning("notify_claim_failed", error=type(exc).__name__, rows=len(ids))
            return
        await self._deliver_all(rows)

    # -- delivery --------------------------------------------------------------

    async def _deliver_all(self, rows: list[asyncpg.Record]) -> int:
        """Deliver claimed rows; returns how many went through."""
        if not rows:
            return 0
        audits = [r for r in rows if r["kind"] == "audit"]
        emails = [r for r in rows if r["kind"] == "email"]
        events = [r for r in rows if r["kind"] == "event"]
        delivered = 0
        if audits:
            delivered += await self._deliver_audits(audits)
        if events:
            delivered += await self._deliver_events(events)
        if emails:
            delivered += await self._deliver_emails(emails)
        return delivered

    async def _deliver_events(self, rows: list[asyncpg.Record]) -> int:
        """Publish claimed order events (at most one per order: the claim's guard), then
        the next event of each order they were published for, until none is left: a later
        change whose fast path found its predecessor still out is not left to the relay's
        next pass. Any failure is transient: NATS down, no ack in time."""
        publisher = self.events
        assert publisher is not None
        delivered = 0
        while rows:

            async def publish(row: asyncpg.Record) -> None:
                with tracing.delivery_span("nats publish", row["trace_context"], _span_attributes(row)):
                    p = row["payload"]
                    await publisher.publish(row["topic"], p["id"], orjson.dumps(p))

            results = await asyncio.gather(*(publish(r) for r in rows), return_exceptions=True)
            sent = [r for r, res in zip(rows, results, strict=True) if res is None]
            await self._failed(
                [(r, res, True) for r, res in zip(rows, results, strict=True) if isinstance(res, BaseException)]
            )
            # Published but not recorded: re-published, and dropped by Nats-Msg-Id.
            if not sent or not await self._record_sent(sent, "event"):
                break
            delivered += len(sent)
            if self._stopping.is_set():
                break
            try:
                async with connection(self.pool, self.settings.db_acquire_timeout_s) as conn:
                    rows = await outbox.claim_next_events(
                        conn, [r["order_id"] for r in sent], self.settings.relay_lease_s
                    )
            except Exception as exc:  # the relay's pass finds them
                log.warning("notify_claim_failed", error=type(exc).__name__, rows=len(sent))
                break
        return delivered

    async def _deliver_audits(self, rows: list[asyncpg.Record]) -> int:
        try:
            await self._mark_sent([r["id"] for r in rows], "audit")
        except Exception as exc:
            await self._failed([(r, exc, True) for r in rows])
            return 0
        for row in rows:
            p: dict[str, Any] = row["payload"]
            with (
                tracing.delivery_span("audit", row["trace_context"], _span_attributes(row)),
                _row_context(row),
            ):
                audit_log.info("audit", action=p["action"], actor=p["actor"], before=p["before"], after=p["after"])
        NOTIFICATIONS_SENT.labels("audit").inc(len(rows))
        return len(rows)

    async def _deliver_emails(self, rows: list[asyncpg.Record]) -> int:
        """One SMTP session for the batch; a row that fails is retried later on its own,
        and never takes the other rows of the session with it (RSET after it)."""
        sent: list[asyncpg.Record] = []
        failed: list[tuple[asyncpg.Record, BaseException, bool]] = []  # (row, error, transient)
        remaining = list(rows)
        # The batch's rows are leased for relay_lease_s: stop sending at half of it, so that
        # no row is still being sent when its lease ends and another claimer may take it.
        budget_end = time.monotonic() + self.settings.relay_lease_s / 2
        try:
            async with self.mailer.session() as smtp:
                while remaining:
                    if time.monotonic() > budget_end:
                        raise LeaseBudgetSpent("the batch outlasted half its lease; the rest is retried")
                    row = remaining[0]
                    try:
                        with tracing.delivery_span("smtp send", row["trace_context"], _span_attributes(row)):
                            await self.mailer.send(smtp, render(row["payload"], self.settings.mail_from))
                    except SESSION_ERRORS:
                        raise
                    except Exception as exc:  # refused recipient and the like: this row only
                        failed.append((remaining.pop(0), exc, transient(exc)))
                        await self.mailer.reset(smtp)  # if even RSET fails, the session is gone
                        continue
                    sent.append(remaining.pop(0))
        except Exception as exc:  # the session broke or never opened: not the rows' fault
            failed += [(r, exc, True) for r in remaining]
        await self._failed(failed)  # after the session: one statement for all of them
        # Sent but not recorded: the lease ends, it is sent again.
        if not sent or not await self._record_sent(sent, "email"):
            return 0
        for row in sent:
            with _row_context(row):
                log.info("email_sent", topic=row["topic"], message_id=row["payload"]["message_id"])
        return len(sent)

    async def _mark_sent(self, ids: list[int], kind: str) -> None:
        async with connection(self.pool, self.settings.db_acquire_timeout_s) as conn:
            await outbox.mark_sent(conn, ids, kind)

    async def _record_sent(self, rows: list[asyncpg.Record], kind: str) -> bool:
        """Delivered rows recorded `sent` and counted; False (and a warning) when the
        statement failed: their leases end and they are delivered again."""
        try:
            await self._mark_sent([r["id"] for r in rows], kind)
        except Exception as exc:
            log.warning("notify_mark_sent_failed", error=type(exc).__name__, rows=len(rows))
            return False
        NOTIFICATIONS_SENT.labels(kind).inc(len(rows))
        return True

    async def _failed(self, failures: list[tuple[asyncpg.Record, BaseException, bool]]) -> None:
        """Rows that failed, each with its error and whether it was transient: a transient
        failure backs off by the row's attempts, a permanent one is final at once.
        One statement records them all."""
        if not failures:
            return
        rows = [row for row, _, _ in failures]
        errors = [f"{type(exc).__name__}: {exc}"[:500] for _, exc, _ in failures]
        delays, give_ups = [], []
        for row, exc, is_transient in failures:
            give_up = not is_transient
            delay = backoff(row["attempts"], self.settings.relay_backoff_max_s)
            delays.append(delay)
            give_ups.append(give_up)
            NOTIFICATIONS_FAILED.labels(row["kind"], str(give_up).lower()).inc()
            with _row_context(row):
                (log.error if give_up else log.warning)(
                    "notification_failed",
                    kind=row["kind"],
                    attempts=row["attempts"],
                    transient=is_transient,
                    gave_up=give_up,
                    retry_in_s=None if give_up else round(delay, 1),
                    error=type(exc).__name__,
                )
        try:
            async with connection(self.pool, self.settings.db_acquire_timeout_s) as conn:
                await outbox.mark_retry(conn, [r["id"] for r in rows], errors, delays, give_ups)
        except Exception as record_error:  # the leases expire and the rows are retried anyway
            log.warning("notify_mark_retry_failed", error=type(record_error).__name__, rows=len(rows))

    # -- the relay loop ----------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        # The relay's own statements are not traced; each delivery is, in its request's trace.
        with tracing.untraced():
            self._dispatcher = loop.create_task(self._dispatch_forever())
            self._loop_task = loop.create_task(self._run())
            self._housekeeper = loop.create_task(self._housekeep_forever())

    async def _run(self) -> None:
        while not self._stopping.is_set():
            claimed = delivered = 0
            try:
                claimed, delivered = await self.run_once()
            except Exception as exc:
                log.warning("relay_pass_failed", error=type(exc).__name__)
            if claimed >= self.settings.relay_batch and delivered == claimed:
                continue  # a backlog that flows: keep draining without waiting
            try:
                await asyncio.wait_for(self._stopping.wait(), self.settings.relay_interval_s)
            except TimeoutError:
                pass

    async def run_once(self, *, ahead_s: float = 0.0) -> tuple[int, int]:
        """One pass: deliver a batch of due rows; returns (claimed, delivered)."""
        async with connection(self.pool, self.settings.db_acquire_timeout_s) as conn:
            rows = await outbox.claim_due(
                conn, self.settings.relay_batch, self.settings.relay_lease_s, ahead_s, self.events is not None
            )
        delivered = await self._deliver_all(rows)
        if self.replay_invalidations is not None:
            await self.replay_invalidations()
        return len(rows), delivered

    # -- housekeeping ------------------------------------------------------------

    async def _housekeep_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                async with connection(self.pool, self.settings.db_acquire_timeout_s) as conn:
                    stats = await outbox.stats(conn)
                NOTIFICATIONS_PENDING.set(stats["pending"])
                RELAY_LAG.set(stats["lag_s"])
                NOTIFICATIONS_OLDEST_PENDING.set(stats["oldest_s"])
                EVENTS_UNPUBLISHED.set(stats["events"])
                EVENTS_OLDEST_UNPUBLISHED.set(stats["events_oldest_s"])
                for kind in OUTBOX_KINDS:
                    NOTIFICATIONS_FAILED_ROWS.labels(kind).set(stats["failed"].get(kind, 0))
                await self.purge_expired()
            except Exception as exc:
                log.warning("housekeeping_failed", error=type(exc).__name__)
            try:
                await asyncio.wait_for(self._stopping.wait(), HOUSEKEEPING_S)
            except TimeoutError:
                pass

    async def purge_expired(self) -> dict[str, int]:
        """Retention: sent outbox rows and idempotency records past their age, deleted
        RETENTION_BATCH rows per statement (each its own short transaction) until a batch
        comes back short. Replicas skip each other's locked rows, so they share the work.
        Returns the rows deleted by table."""
        settings = self.settings
        purges = {
            "outbox": lambda conn: outbox.purge_sent(conn, settings.outbox_retention_h, RETENTION_BATCH),
            "idempotency_keys": lambda conn: idempotency.purge(conn, settings.idempotency_retention_h, RETENTION_BATCH),
        }
        purged = dict.fromkeys(purges, 0)
        for table, purge in purges.items():
            deleted = RETENTION_BATCH
            while deleted == RETENTION_BATCH and not self._stopping.is_set():
                async with connection(self.pool, self.settings.db_acquire_timeout_s) as conn:
                    deleted = await purge(conn)
                purged[table] += deleted
        if any(purged.values()):
            log.info("retention_purged", **purged)
        return purged

    async def stop(self, deadline: float) -> None:
        """Stop the loop; finish in-flight deliveries and flush until `deadline`
        (time.monotonic()); what is left stays pending for the next replica."""
        self._stopping.set()

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        for task in (self._loop_task, self._housekeeper):
            if task is not None:
                try:
                    await asyncio.wait_for(task, left())
                except (TimeoutError, asyncio.CancelledError):
                    pass
        # Batches under way first; rows still queued are claimed by the flush below.
        if self._batches:
            await asyncio.wait(set(self._batches), timeout=left())
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        self._queue.clear()
        try:
            async with asyncio.timeout(left()):
                while True:  # until nothing is left, or a delivery fails (SMTP is sick)
                    claimed, delivered = await self.run_once(ahead_s=FAST_PATH_HEAD_START_S)
                    if claimed == 0 or delivered < claimed:
                        break
        except TimeoutError:
            log.warning("relay_flush_incomplete", detail="left pending for the next replica")
        except Exception as exc:
            log.warning("relay_flush_failed", error=type(exc).__name__)
        for task in list(self._batches):
            task.cancel()
        if self._batches:
            await asyncio.wait(set(self._batches), timeout=1)
        NOTIFICATIONS_PENDING.set(0)

"""Delivery of outbox rows: the fast path after a response, and the relay loop.

* `dispatch(ids)` is what a request's BackgroundTask calls: it starts the delivery of
  that request's rows in a task of its own and returns at once, so a slow or hung SMTP
  server never holds the HTTP connection (nor the next request on it). In-flight
  deliveries are bounded (`ORDERS_NOTIFY_MAX_INFLIGHT`); past that the rows simply wait
  for the relay. Nothing is lost either way: the rows are in PostgreSQL.
* The relay loop claims due rows with FOR UPDATE SKIP LOCKED plus a lease, so replicas
  share the work without sending a row twice; failures back off exponentially up to a
  cap of attempts, after which the row is `failed` (metric + error log). It also
  replays recorded cache invalidations and purges old rows in small batches.
* `stop(grace)` stops the loop, waits for in-flight deliveries and flushes what it can
  before the deadline; whatever is left stays pending for the next replica.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog

from orders.db import idempotency, outbox
from orders.db.pool import connection
from orders.notify.email import Mailer, render
from orders.observability import NOTIFICATIONS_FAILED, NOTIFICATIONS_PENDING, NOTIFICATIONS_SENT, RELAY_LAG
from orders.settings import Settings

log = structlog.get_logger("orders.notify")
audit_log = structlog.get_logger("audit")

# The relay leaves a new row to its request's BackgroundTask for this long.
FAST_PATH_HEAD_START_S = 5.0
BACKOFF_BASE_S = 1.0


def backoff(attempts: int, cap_s: float) -> float:
    """Exponential, with jitter: ~1, 2, 4, ... seconds, at most `cap_s`."""
    return min(cap_s, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)) * random.uniform(0.8, 1.0)


class Relay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        mailer: Mailer,
        settings: Settings,
        replay_invalidations: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.pool = pool
        self.mailer = mailer
        self.settings = settings
        self.replay_invalidations = replay_invalidations
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()

    # -- fast path -------------------------------------------------------------

    async def dispatch(self, ids: list[int]) -> None:
        if not ids:
            return
        if len(self._inflight) >= self.settings.notify_max_inflight:
            log.warning("notify_backpressure", pending_rows=len(ids))
            return  # the relay delivers them
        task = asyncio.get_running_loop().create_task(self._deliver_ids(ids))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _deliver_ids(self, ids: list[int]) -> None:
        try:
            async with connection(self.pool, self.settings.db_acquire_timeout_s) as conn:
                rows = await outbox.claim_ids(conn, ids, self.settings.relay_lease_s)
        except Exception as exc:
            log.warning("notify_claim_failed", error=type(exc).__name__)
            return
        await self._deliver_all(rows)

    # -- delivery --------------------------------------------------------------

    async def _deliver_all(self, rows: list[asyncpg.Record]) -> int:
        if not rows:
            return 0
        return sum(await asyncio.gather(*(self._deliver(row) for row in rows)))

    async def _deliver(self, row: asyncpg.Record) -> bool:
        payload: dict[str, Any] = row["payload"]
        bound = structlog.contextvars.bound_contextvars(
            request_id=payload.get("request_id"), order_id=str(row["order_id"])
        )
        with bound:
            try:
                if row["kind"] == "email":
                    await self.mailer.send(render(payload, self.settings.mail_from))
                async with connection(self.pool, self.settings.db_acquire_timeout_s) as conn:
                    await outbox.mark_sent(conn, row["id"], row["kind"])
            except Exception as exc:
                await self._failed(row, exc)
                return False
            NOTIFICATIONS_SENT.labels(row["kind"]).inc()
            if row["kind"] == "audit":
                audit_log.info(
                    "audit",
                    action=payload["action"],
                    actor=payload["actor"],
                    before=payload["before"],
                    after=payload["after"],
                )
            else:
                log.info("email_sent", topic=row["topic"], message_id=payload["message_id"])
            return True

    async def _failed(self, row: asyncpg.Record, exc: Exception) -> None:
        give_up = row["attempts"] >= self.settings.relay_max_attempts
        delay = backoff(row["attempts"], self.settings.relay_backoff_max_s)
        NOTIFICATIONS_FAILED.labels(row["kind"], str(give_up).lower()).inc()
        error = f"{type(exc).__name__}: {exc}"[:500]
        (log.error if give_up else log.warning)(
            "notification_failed",
            kind=row["kind"],
            attempts=row["attempts"],
            gave_up=give_up,
            retry_in_s=None if give_up else round(delay, 1),
            error=type(exc).__name__,
        )
        try:
            async with connection(self.pool, self.settings.db_acquire_timeout_s) as conn:
                await outbox.mark_retry(conn, row["id"], error, delay, give_up)
        except Exception as exc2:  # the lease expires and the row is retried anyway
            log.warning("notify_mark_retry_failed", error=type(exc2).__name__)

    # -- the relay loop ----------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        tick = 0
        while not self._stopping.is_set():
            try:
                await self.run_once(housekeeping=tick % 30 == 0)
            except Exception as exc:
                log.warning("relay_pass_failed", error=type(exc).__name__)
            tick += 1
            try:
                await asyncio.wait_for(self._stopping.wait(), self.settings.relay_interval_s)
            except TimeoutError:
                pass

    async def run_once(self, *, housekeeping: bool = False, ahead_s: float = 0.0) -> tuple[int, int]:
        """One pass: deliver a batch of due rows; returns (claimed, delivered)."""
        s = self.settings
        async with connection(self.pool, s.db_acquire_timeout_s) as conn:
            rows = await outbox.claim_due(conn, s.relay_batch, s.relay_lease_s, ahead_s)
            if housekeeping:
                stats = await outbox.stats(conn)
                NOTIFICATIONS_PENDING.set(stats["pending"])
                RELAY_LAG.set(stats["lag_s"])
                await outbox.purge_sent(conn, s.outbox_retention_h, 500)
                await idempotency.purge(conn, s.idempotency_retention_h, 500)
        delivered = await self._deliver_all(rows)
        if self.replay_invalidations is not None:
            await self.replay_invalidations()
        return len(rows), delivered

    async def stop(self, deadline: float) -> None:
        """Stop the loop; finish in-flight deliveries and flush until `deadline`
        (time.monotonic()); what is left stays pending for the next replica."""
        self._stopping.set()
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(self._loop_task, max(0.1, deadline - time.monotonic()))
            except (TimeoutError, asyncio.CancelledError):
                pass
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=max(0.1, deadline - time.monotonic()))
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                while True:  # until nothing is left, or a delivery fails (SMTP is sick)
                    claimed, delivered = await self.run_once(ahead_s=FAST_PATH_HEAD_START_S)
                    if claimed == 0 or delivered < claimed:
                        break
        except TimeoutError:
            log.warning("relay_flush_incomplete", detail="left pending for the next replica")
        except Exception as exc:
            log.warning("relay_flush_failed", error=type(exc).__name__)
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=1)
        NOTIFICATIONS_PENDING.set(0)

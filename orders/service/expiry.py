"""The expiry of unpaid orders: a task of every replica's lifespan that cancels pending
orders older than ORDERS_PAYMENT_TIMEOUT_S (orders.service.payments.expire_overdue).

Replicas run it side by side: each order is taken under its row lock with SKIP LOCKED
and re-checked, so it expires once whichever replica gets it. It polls every
min(timeout / 2, 1 s), so an order expires within about a second of its deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from orders.service.payments import expire_overdue
from orders.service.unit_of_work import UnitOfWork

log = structlog.get_logger("orders.expiry")

EXPIRY_BATCH = 100
MAX_INTERVAL_S = 1.0
STOP_TIMEOUT_S = 5.0


class Expiry:
    def __init__(self, unit_of_work: Callable[[], UnitOfWork], timeout_s: float) -> None:
        self._unit_of_work = unit_of_work
        self.timeout_s = timeout_s
        self.interval_s = min(timeout_s / 2, MAX_INTERVAL_S)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def run_once(self) -> int:
        """Expire what is overdue now, batch after batch until a batch comes back short,
        or expires nothing: its orders were all held by others (another replica, a payment),
        and reading the same batch again at once would only skip them again; the next
        pass retries."""
        total = 0
        while not self._stopping.is_set():
            seen, expired = await expire_overdue(self._unit_of_work(), timeout_s=self.timeout_s, batch=EXPIRY_BATCH)
            total += expired
            if seen < EXPIRY_BATCH or not expired:
                break
        return total

    async def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                await self.run_once()
                if failures:
                    log.info("expiry_recovered", failed_passes=failures)
                    failures = 0
            except Exception as exc:
                # The database away, a statement timeout: the next pass tries again. Logged
                # once per outage, not once a second.
                if not failures:
                    log.warning("expiry_failed", error=type(exc).__name__, detail=str(exc)[:200])
                failures += 1
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        """Lets a pass under way finish its order (each is one short transaction)."""
        self._stopping.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._task, STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("expiry_stop_timeout")
        except Exception:
            log.exception("expiry_stop_failed")

"""Cache writes that could not reach Redis, kept in PostgreSQL until they can (cache.py).

`record()` keeps them (in `cache_invalidations`) when a write after a commit fails;
`replay()` applies them to Redis as tombstones and forgets them. The relay replays every
pass, and the cache before it trusts Redis again after an outage.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import asyncpg
import structlog

from orders.db import invalidations
from orders.db.pool import connection

if TYPE_CHECKING:
    from orders.cache import Cache

log = structlog.get_logger("orders.cache")

# Recorded cache invalidations replayed per Redis round trip, and per replay at most.
REPLAY_BATCH = 500
REPLAY_MAX_BATCHES = 40


class InvalidationLog:
    def __init__(self, pool: asyncpg.Pool, acquire_timeout_s: float) -> None:
        self.pool = pool
        self.timeout = acquire_timeout_s
        self._replaying = asyncio.Lock()

    async def record(self, entries: list[tuple[str, int]]) -> None:
        """Keep (key, version) pairs for replay; never raises (the entries' TTL bounds what is lost)."""
        try:
            async with connection(self.pool, self.timeout) as conn:
                await invalidations.record(conn, entries)
        except Exception as exc:
            log.warning("cache_invalidation_not_recorded", error=type(exc).__name__)

    async def replay(self, cache: Cache) -> None:
        """One replay at a time, whoever calls (the relay's pass, the cache coming back
        after an outage): a caller waits for the one under way, then finds what is left."""
        async with self._replaying:
            await self._replay_batches(cache)

    async def _replay_batches(self, cache: Cache) -> None:
        # Batch after batch until none is left (bounded): after a long outage, reads
        # trust Redis again only once every invalidation recorded meanwhile is applied.
        for _ in range(REPLAY_MAX_BATCHES):
            if not cache.enabled or not cache.breaker.closed:
                return
            async with connection(self.pool, self.timeout) as conn:
                entries = await invalidations.pending(conn, REPLAY_BATCH)
            if not entries:
                return
            ok, _ = await cache.call(lambda batch=entries: cache.cas_many([(k, v, None) for k, v in batch]))
            if not ok:
                return
            async with connection(self.pool, self.timeout) as conn:
                await invalidations.forget(conn, entries)
            log.info("cache_invalidations_replayed", count=len(entries))
            if len(entries) < REPLAY_BATCH:
                return

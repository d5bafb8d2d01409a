"""The unit of work of a use case: its connection and transaction, and what must happen
once that transaction has committed.

A use case writes through `transaction()` (or `autocommit()`, for a write that is one
statement or one function call: no BEGIN and COMMIT round trips) and says what the
commit changes:
`cache_write()` for each cache entry (a new version, or a tombstone) and `dispatch_later()`
for the outbox rows it wrote. Nothing of that happens unless the transaction commits:
then the cache entries are written (before the response, so that the client's next read
sees its change), and `dispatch()`, the one BackgroundTask of the route, hands the outbox
rows to the relay after the response. Reads go through `read()` and the cache.

The query modules (orders/db) are attributes and the connection comes from
`_connection()`, so that unit tests run the use cases through a unit of work with
in-memory ones (tests/unit/test_use_cases.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from orders.cache import Cache
from orders.db import idempotency, orders, outbox, payments, products
from orders.db.pool import connection, read
from orders.notify.relay import Relay
from orders.service.price_list import PriceList

T = TypeVar("T")

CacheEntry = tuple[str, int, dict[str, Any] | None]  # key, version, value (None: a tombstone)


class UnitOfWork:
    idempotency = idempotency
    orders = orders
    outbox = outbox
    payments = payments
    products = products

    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: Cache,
        relay: Relay,
        acquire_timeout_s: float,
        price_list: PriceList | None = None,
        *,
        events: bool = False,
    ) -> None:
        self.pool = pool
        # Order events on (ORDERS_NATS_URL): the use cases add their outbox rows.
        self.events = events
        self.cache = cache
        self.relay = relay
        self.timeout = acquire_timeout_s
        # The process's (Resources.price_list); a fresh one only where nothing shares it.
        self.price_list = price_list if price_list is not None else PriceList()
        self._cache_entries: list[CacheEntry] = []
        self._outbox_ids: list[int] = []

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction on a pooled connection (503 `unavailable` when none comes in
        time): committed when the block ends, rolled back when it raises. After the
        commit, and after the connection went back to the pool, the cache entries the
        block collected are written; a rollback drops them and the outbox ids."""
        async with self._after_commit(), self._connection() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection outside any transaction: each statement is its own
        transaction, committed when it returns (a write of one statement, or of one
        function call, costs one round trip: no BEGIN, no COMMIT). What the block collects
        happens as after transaction(); the block must not raise once a statement that
        wrote has returned, or its effects are dropped though the write committed."""
        async with self._after_commit(), self._connection() as conn:
            yield conn

    @asynccontextmanager
    async def _after_commit(self) -> AsyncIterator[None]:
        """The cache entries of the block, written after it ends with the connection back
        in the pool; when it raises, they and its outbox ids are dropped."""
        self._cache_entries = []
        dispatched = len(self._outbox_ids)
        try:
            yield
        except BaseException:
            del self._outbox_ids[dispatched:]
            raise
        if self._cache_entries:
            entries, self._cache_entries = self._cache_entries, []
            await self.cache.apply(entries)

    def _connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return connection(self.pool, self.timeout)

    async def read(self, fetch: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`fetch(conn)` outside any transaction, retried once on a connection that broke."""
        return await read(self.pool, self.timeout, fetch)

    def cache_write(self, key: str, version: int, value: dict[str, Any] | None) -> None:
        """After the commit, `key` becomes `value` at `version` (None: a tombstone)."""
        self._cache_entries.append((key, version, value))

    def dispatch_later(self, outbox_ids: list[int]) -> None:
        """Outbox rows this transaction writes, for `dispatch()` once it has committed."""
        self._outbox_ids += outbox_ids

    async def dispatch(self) -> None:
        """The route's BackgroundTask: the committed outbox rows to the relay's fast path."""
        if self._outbox_ids:
            self.relay.dispatch(self._outbox_ids)

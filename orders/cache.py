"""Cache-aside in Redis for orders and products: versioned, fail-open, self-healing.

Why it cannot serve stale data for long:

* Every entry is `"<version>|<json>"`, and a tombstone is `"<version>|"`. All writes go
  through one Lua compare-and-set that never replaces an entry with an older version.
  A reader that loaded version 1 from PostgreSQL before a cancel committed version 2
  cannot put version 1 back after the canceller wrote version 2 (or its tombstone): the
  cache-fill race is closed whatever order the commands reach Redis in, including a
  command that "timed out" on our side and runs later.
* After a commit the writer stores the new version (write-through) or a tombstone.
  When that fails (Redis down, slow, or the circuit open), the key and version are
  recorded in PostgreSQL (InvalidationLog); the relay replays them every second
  while Redis answers, and this process replays them before it reads from Redis again
  after an outage. So an entry written before an outage and changed during it is gone
  within about a second of Redis coming back, on every replica. (The one gap: a
  process killed between its commit and that record; the entry's TTL bounds it.)
* Fail-open: every Redis call is bounded by `ORDERS_REDIS_TIMEOUT_S`; after a failure
  the circuit opens and requests skip Redis entirely for a cool-down, then one probe
  decides. Redis trouble never fails a request and costs at most one timeout.
* Stampede protection: concurrent misses of one key in this process share one load,
  but never across a write: a post-commit write of a key detaches the load in flight,
  so a read that starts after the change loads again rather than joining a load that
  may have read the old row (with Redis down that load would be all it gets).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import structlog
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.retry import Retry

from orders.observability import CACHE_EVENTS
from orders.settings import Settings

if TYPE_CHECKING:
    from orders.invalidation_log import InvalidationLog

log = structlog.get_logger("orders.cache")

T = TypeVar("T")

# KEYS[1] key; ARGV: version, payload ("" for a tombstone), ttl seconds.
# Stores unless the current entry is newer, or equally new and not a tombstone being
# replaced by data (data of version v replaces a tombstone of version v).
_CAS = """
local cur = redis.call('GET', KEYS[1])
local v = tonumber(ARGV[1])
if cur then
  local sep = string.find(cur, '|', 1, true)
  local cv = tonumber(string.sub(cur, 1, sep - 1))
  if cv > v then return 0 end
  if cv == v and (ARGV[2] == '' or sep < string.len(cur)) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'EX', tonumber(ARGV[3]))
return 1
"""
_CAS_SHA = hashlib.sha1(_CAS.encode()).hexdigest()


def order_key(prefix: str, order_id: Any) -> str:
    return f"{prefix}order:{order_id}"


def product_key(prefix: str, sku: str) -> str:
    return f"{prefix}product:{sku}"


# Connections of the fast read's own (Cache.peek), at most; past them it waits for none and
# takes redis-py's pool.
DIRECT_CONNECTIONS = 64


def _get_command(key: str) -> bytes:
    """GET `key` in the Redis protocol."""
    k = key.encode()
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(k), k)


# The two children, once: labels() validates and locks on every call.
_HIT = CACHE_EVENTS.labels(result="hit")
_MISS = CACHE_EVENTS.labels(result="miss")


class CircuitBreaker:
    """Closed until a failure; open for `cooldown_s`; then one trial call decides."""

    def __init__(self, cooldown_s: float = 2.0) -> None:
        self.cooldown_s = cooldown_s
        self._open_until = 0.0
        self._trial = False

    @property
    def closed(self) -> bool:
        return self._open_until == 0.0

    def allow(self) -> bool:
        if self._open_until == 0.0:
            return True
        if time.monotonic() < self._open_until or self._trial:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        self._open_until = 0.0
        self._trial = False

    def abandon(self) -> None:
        """The call was cancelled (its request went away): neither success nor failure.
        A probe that ends so must not keep the breaker from ever probing again."""
        self._trial = False

    def failure(self) -> None:
        if self._open_until == 0.0:
            log.warning("redis_circuit_open", cooldown_s=self.cooldown_s)
        self._open_until = time.monotonic() + self.cooldown_s
        self._trial = False


class Cache:
    def __init__(self, redis: Redis | None, settings: Settings, invalidations: InvalidationLog | None = None) -> None:
        self.redis = redis
        self.prefix = settings.cache_prefix
        self.ttl = settings.cache_ttl_s
        self.timeout = settings.redis_timeout_s
        self.breaker = CircuitBreaker()
        # Where writes after a commit that Redis cannot take are kept for replay.
        self.invalidations = invalidations
        # Set while invalidations recorded during an outage are being replayed:
        # reads skip Redis until they are.
        self._replaying = False
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._direct_idle: list[AbstractConnection] = []
        self._direct_open = 0
        self._closed = False

    @classmethod
    def connect(cls, settings: Settings, invalidations: InvalidationLog | None = None) -> Cache:
        if settings.redis_url is None:
            return cls(None, settings, invalidations)
        redis = Redis.from_url(
            str(settings.redis_url),
            # No socket_timeout (redis-py's default is 5 s): with one it runs every send under
            # asyncio.wait_for (a task per command) and every read under a timer of its own;
            # call() bounds each command whole (connect, send, read) with one timer instead.
            # A command cut short so drops its connection (redis-py disconnects on cancellation).
            socket_timeout=None,
            socket_connect_timeout=settings.redis_timeout_s,
            retry=Retry(NoBackoff(), 0),
            max_connections=200,
            health_check_interval=0,
        )
        return cls(redis, settings, invalidations)

    @property
    def enabled(self) -> bool:
        return self.redis is not None

    async def close(self) -> None:
        self._closed = True
        for conn in self._direct_idle:
            await conn.disconnect()
        self._direct_idle.clear()
        if self.redis is not None:
            await self.redis.aclose()

    async def call(self, fn: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run one Redis operation under the breaker and the timeout: (ok, result)."""
        if self.redis is None or not self.breaker.allow():
            return False, None
        was_open = not self.breaker.closed
        try:
            async with asyncio.timeout(self.timeout):
                result = await fn()
        except Exception as exc:  # any Redis trouble: fail open
            self.breaker.failure()
            log.warning("redis_error", error=type(exc).__name__)
            return False, None
        except BaseException:  # cancelled from outside: release the probe, if it was one
            self.breaker.abandon()
            raise
        self.breaker.success()
        if was_open and self.invalidations is not None and not self._replaying:
            self._replaying = True  # reads skip Redis from now until the replay is done
            task = asyncio.get_running_loop().create_task(self._replay_after_outage())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True, result

    async def replay_invalidations(self) -> None:
        """Apply what was recorded while Redis could not take it (the relay's every pass)."""
        if self.invalidations is not None:
            await self.invalidations.replay(self)

    async def _replay_after_outage(self) -> None:
        try:
            await self.replay_invalidations()
        except Exception as exc:
            log.warning("cache_replay_failed", error=type(exc).__name__)
        finally:
            self._replaying = False

    async def ping(self) -> bool:
        assert self.redis is not None
        redis = self.redis
        ok, _ = await self.call(lambda: redis.ping())
        return ok

    # -- reads -----------------------------------------------------------------

    async def get(self, key: str) -> dict[str, Any] | None:
        if self.redis is None or self._replaying:
            return None
        redis = self.redis
        if not self.breaker.closed:
            # Coming back from an outage: probe with PING, never trust a GET before
            # the invalidations recorded meanwhile are replayed.
            await self.call(lambda: redis.ping())
            _MISS.inc()
            return None
        ok, raw = await self.call(lambda: redis.get(key))
        if not ok or raw is None:
            _MISS.inc()
            return None
        _, _, payload = raw.partition(b"|")
        if not payload:
            _MISS.inc()
            return None
        _HIT.inc()
        return orjson.loads(payload)

    async def peek(self, key: str) -> bytes | None:
        """The entry as Redis holds it ("<version>|<json>", or a tombstone "<version>|"),
        for the fast GET (orders/api/fast_get.py): None wherever get() would not trust Redis
        (no cache, a replay under way, the breaker not closed), when Redis fails (the
        breaker counts it, as for get()) or holds nothing. Counts no hit or miss: the
        caller counts the hit it serves, and the route's get() whatever it does not."""
        if self.redis is None or self._replaying or not self.breaker.closed:
            return None
        ok, raw = await self.call(lambda: self._direct_get(key))
        return raw if ok else None

    async def _direct_get(self, key: str) -> bytes | None:
        """GET on a connection of the fast read's own: redis-py's command path (its retry
        wrapper, the pool's lock, health and "has data" checks, observability hooks) was
        most of a cached read's Redis cost. A connection goes back to the idle list only
        after a whole reply was read; an error, a timeout or a cancellation drops it. A
        connection that died while idle (Redis restarted) is replaced once, not a failure."""
        assert self.redis is not None
        for attempt in (1, 2):
            reused = attempt == 1 and bool(self._direct_idle)
            if reused:
                conn = self._direct_idle.pop()
            elif self._direct_open < DIRECT_CONNECTIONS:
                conn = self.redis.connection_pool.make_connection()
                self._direct_open += 1
            else:
                value: bytes | None = await self.redis.get(key)
                return value
            done = False
            try:
                await conn.send_packed_command(_get_command(key), check_health=False)  # connects a new one
                value = await conn.read_response()
                done = True
                return value
            except (RedisConnectionError, OSError):
                if not reused:
                    raise
            finally:
                if done and not self._closed:
                    self._direct_idle.append(conn)
                else:
                    self._direct_open -= 1
                    await conn.disconnect(nowait=True)
            # Redis went away since the last read: the other idle connections are as dead.
            stale, self._direct_idle = self._direct_idle, []
            self._direct_open -= len(stale)
            for old in stale:
                await old.disconnect(nowait=True)
        raise AssertionError("unreachable: the second attempt uses a new connection")

    @staticmethod
    def count_hit() -> None:
        _HIT.inc()

    async def get_or_load(
        self, key: str, load: Callable[[], Awaitable[tuple[int, dict[str, Any]] | None]]
    ) -> dict[str, Any] | None:
        """Cached value, else `load()` (once per key in this process at a time) and fill."""
        cached = await self.get(key)
        if cached is not None:
            return cached
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            loaded = await load()
            value = None if loaded is None else loaded[1]
            future.set_result(value)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it twice
            raise
        finally:
            if self._inflight.get(key) is future:  # not detached by a write meanwhile
                del self._inflight[key]
        if loaded is not None:
            await self.store(key, loaded[0], loaded[1])
        return value

    # -- writes ----------------------------------------------------------------

    def _detach_loads(self, keys: list[str]) -> None:
        """After a commit: loads of these keys in flight may hold the old row; readers
        that come from now on start a load of their own instead of joining them."""
        for key in keys:
            self._inflight.pop(key, None)

    def _payload(self, value: dict[str, Any] | None) -> bytes:
        return b"" if value is None else orjson.dumps(value, option=orjson.OPT_UTC_Z)

    async def cas_many(self, entries: list[tuple[str, int, dict[str, Any] | None]]) -> None:
        """The compare-and-set script for every (key, version, value or None for a
        tombstone), in one pipeline; raises on Redis errors. EVALSHA directly: a
        pipeline of Script objects would ask SCRIPT EXISTS first, one more round trip
        each time. The script is loaded only when Redis says NOSCRIPT (new or flushed)."""
        assert self.redis is not None
        for attempt in (1, 2):
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, version, value in entries:
                        pipe.evalsha(_CAS_SHA, 1, key, version, self._payload(value), self.ttl)
                    await pipe.execute()
                return
            except NoScriptError:
                if attempt == 2:
                    raise
                await self.redis.script_load(_CAS)

    async def store(self, key: str, version: int, value: dict[str, Any] | None) -> bool:
        """One entry, as a cache fill: losing it loses nothing, so a failure is not
        recorded for replay. True when Redis answered."""
        if self.redis is None:
            return True
        ok, _ = await self.call(lambda: self.cas_many([(key, version, value)]))
        return ok

    async def apply(self, entries: list[tuple[str, int, dict[str, Any] | None]]) -> None:
        """After a commit: each key to its new version (a value, or None for a tombstone),
        in one round trip; recorded durably for replay when Redis cannot take it."""
        self._detach_loads([key for key, _, _ in entries])
        if self.redis is None or not entries:
            return
        ok, _ = await self.call(lambda: self.cas_many(entries))
        if not ok and self.invalidations is not None:
            await self.invalidations.record([(key, version) for key, version, _ in entries])

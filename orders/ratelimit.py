"""Per-customer limit of order creations: a fixed one-minute window in Redis.

One counter per customer and minute (`<prefix>rl:<minute>:<customer>`, INCR + EXPIRE in
one round trip: one EVALSHA of a short script, far less client CPU than a redis-py
pipeline), shared by all replicas; customers never share a counter. The service
calls `check()` once a creation has passed validation (replays included, docs/API.md), so a
malformed request never uses up the customer's allowance.

Fail-open: with Redis down, slow (the call is bounded by ORDERS_REDIS_TIMEOUT_S) or its
circuit open, every request passes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from redis.exceptions import NoScriptError

from orders.cache import Cache
from orders.errors import RateLimited

WINDOW_S = 60
# KEYS[1]: the counter; ARGV[1]: its lifetime. Atomic on the server, as INCR + EXPIRE were.
INCR_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return count
"""
INCR_SHA = hashlib.sha1(INCR_SCRIPT.encode()).hexdigest()


class RateLimiter:
    def __init__(self, cache: Cache, per_minute: int) -> None:
        self.cache = cache
        self.per_minute = per_minute
        self.clock: Callable[[], float] = time.time  # wall clock: windows are shared by replicas

    async def check(self, customer_id: str) -> None:
        """Counts one creation; raises RateLimited past the limit."""
        redis = self.cache.redis
        if self.per_minute <= 0 or redis is None:
            return
        now = self.clock()
        window = int(now // WINDOW_S)
        key = f"{self.cache.prefix}rl:{window}:{customer_id}"

        async def incr() -> int:
            # execute_command: redis-py's Script and evalsha() layers cost more than the call.
            try:
                count = await redis.execute_command("EVALSHA", INCR_SHA, 1, key, WINDOW_S + 5)
            except NoScriptError:  # a Redis that restarted or failed over: load it again
                await redis.script_load(INCR_SCRIPT)
                count = await redis.execute_command("EVALSHA", INCR_SHA, 1, key, WINDOW_S + 5)
            return int(count)

        ok, count = await self.cache.call(incr)
        if ok and count is not None and count > self.per_minute:
            retry_after = max(1, int((window + 1) * WINDOW_S - now) + 1)
            raise RateLimited(
                f"at most {self.per_minute} orders a minute",
                retry_after=retry_after,
            )

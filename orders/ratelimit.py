"""Per-customer limit of order creations: a fixed one-minute window in Redis.

Fail-open: with Redis down (or its circuit open) every request passes.
"""

from __future__ import annotations

import time

from orders.cache import Cache
from orders.errors import RateLimited

WINDOW_S = 60


class RateLimiter:
    def __init__(self, cache: Cache, per_minute: int) -> None:
        self.cache = cache
        self.per_minute = per_minute

    async def check(self, customer_id: str) -> None:
        """Counts one creation; raises RateLimited past the limit."""
        redis = self.cache.redis
        if self.per_minute <= 0 or redis is None:
            return
        now = time.time()
        window = int(now // WINDOW_S)
        key = f"{self.cache.prefix}rl:{window}:{customer_id}"

        async def incr() -> int:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, WINDOW_S + 5)
                count, _ = await pipe.execute()
            return int(count)

        ok, count = await self.cache.call(incr)
        if ok and count is not None and count > self.per_minute:
            retry_after = max(1, int((window + 1) * WINDOW_S - now) + 1)
            raise RateLimited(
                f"at most {self.per_minute} orders a minute",
                headers={"Retry-After": str(retry_after)},
            )

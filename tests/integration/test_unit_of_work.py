"""The unit of work against the real PostgreSQL and Redis: what a transaction collected
happens after its commit, and never when it rolled back or its COMMIT failed."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from orders.errors import Unavailable
from orders.service.unit_of_work import UnitOfWork
from tests.conftest import RecordingRelay
from tests.integration.test_resilience_postgres import _kill_backend_of


@pytest.fixture
def uow_parts(client: Any) -> tuple[Any, RecordingRelay, UnitOfWork]:
    res = client.app.state.res
    relay = RecordingRelay()
    return res, relay, UnitOfWork(res.pool, res.cache, relay, res.settings.db_acquire_timeout_s)


async def _cached(res: Any, key: str) -> bytes | None:
    value: bytes | None = await res.cache.redis.get(key)
    return value


async def test_effects_happen_after_the_commit(uow_parts):
    res, relay, uow = uow_parts
    key = f"{res.cache.prefix}uow:{secrets.token_hex(4)}"
    async with uow.transaction() as conn:
        assert await conn.fetchval("SELECT 1") == 1
        uow.cache_write(key, 3, {"v": 3})
        uow.dispatch_later([101, 102])
        assert await _cached(res, key) is None  # not before the commit
    assert await _cached(res, key) == b'3|{"v":3}'
    assert relay.dispatched == []
    await uow.dispatch()
    assert relay.dispatched == [101, 102]


async def test_a_rolled_back_transaction_leaves_no_effect(uow_parts):
    res, relay, uow = uow_parts
    key = f"{res.cache.prefix}uow:{secrets.token_hex(4)}"
    with pytest.raises(RuntimeError):
        async with uow.transaction():
            uow.cache_write(key, 1, {"v": 1})
            uow.dispatch_later([201])
            raise RuntimeError("refused")
    await uow.dispatch()
    assert await _cached(res, key) is None and relay.dispatched == []
    # The next transaction of the same unit of work starts clean.
    async with uow.transaction():
        uow.dispatch_later([202])
    await uow.dispatch()
    assert relay.dispatched == [202]


async def test_a_commit_that_fails_leaves_no_effect(uow_parts, database_url):
    res, relay, uow = uow_parts
    key = f"{res.cache.prefix}uow:{secrets.token_hex(4)}"
    with pytest.raises(Unavailable):
        async with uow.transaction() as conn:
            uow.cache_write(key, 1, {"v": 1})
            uow.dispatch_later([301])
            await _kill_backend_of(conn, database_url)  # the COMMIT meets a dead connection
    await uow.dispatch()
    assert await _cached(res, key) is None and relay.dispatched == []


async def test_autocommit_statements_commit_alone_and_effects_follow_the_block(uow_parts, db):
    """autocommit(): no BEGIN, each statement committed when it returns; the block's
    effects happen once it ends, and none when it raises."""
    res, relay, uow = uow_parts
    key = f"{res.cache.prefix}uow:{secrets.token_hex(4)}"
    name = f"uow_{secrets.token_hex(4)}"
    async with uow.autocommit() as conn:
        assert not conn.is_in_transaction()
        await conn.execute(f"CREATE TABLE {name} (v int)")
        uow.cache_write(key, 2, {"v": 2})
        uow.dispatch_later([401])
        async with db.acquire() as other:  # committed already, seen from elsewhere
            assert await other.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
        assert await _cached(res, key) is None
    assert await _cached(res, key) == b'2|{"v":2}'
    with pytest.raises(RuntimeError):
        async with uow.autocommit() as conn:
            await conn.execute(f"DROP TABLE {name}")
            uow.cache_write(key, 3, {"v": 3})
            uow.dispatch_later([402])
            raise RuntimeError("refused")
    await uow.dispatch()
    assert relay.dispatched == [401] and await _cached(res, key) == b'2|{"v":2}'

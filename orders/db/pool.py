"""The asyncpg pool of the lifespan, and bounded acquisition of its connections.

Whatever happens to the database, a request gets an answer in bounded time: 503
`unavailable` (with Retry-After) when no connection comes within the acquire timeout,
when the connection breaks while in use (server restart or crash, also on COMMIT or on
the ROLLBACK of a dead connection), or when a statement times out; never a hang,
never a 500. A broken connection never goes back to the pool. `read()` retries a read
once on a fresh connection; writes are retried only by clients, behind their
Idempotency-Key (a write whose connection broke may have committed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import asyncpg
import orjson
import structlog

from orders.errors import Unavailable
from orders.observability import unavailable_log
from orders.settings import Settings

log = structlog.get_logger("orders.db")

T = TypeVar("T")

# Errors that mean "the database is not reachable right now", not "the query is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


class ConnectionLost(Unavailable):
    """503: the connection broke while in use (a read may be retried on another one)."""


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda v: b"\x01" + orjson.dumps(v),
        decoder=lambda b: orjson.loads(b[1:]),
        format="binary",
    )


async def keep_session(conn: asyncpg.Connection) -> None:
    """Release to the pool without asyncpg's default reset query (`pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL;`): one round trip less per acquire.
    asyncpg still rolls back a transaction left open before calling this. Safe because
    nothing leaves session state on a pooled connection: advisory locks are transaction
    scoped, nothing LISTENs, cursors live in transactions, and settings are given at connect
    (use SET LOCAL inside a transaction, never SET)."""


async def create_pool(settings: Settings) -> asyncpg.Pool:
    server_settings = {"application_name": "orders", "timezone": "UTC"}
    if settings.db_statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.db_statement_timeout_ms)
    pool = await asyncpg.create_pool(
        settings.dsn,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        timeout=settings.db_acquire_timeout_s * 2,  # connect timeout of a new connection
        command_timeout=settings.db_command_timeout_s,
        statement_cache_size=settings.db_statement_cache_size,
        max_inactive_connection_lifetime=60.0,
        init=init_connection,
        reset=keep_session,
        server_settings=server_settings,
    )
    assert pool is not None
    return pool


@asynccontextmanager
async def connection(pool: asyncpg.Pool, timeout: float) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection within `timeout` seconds, else 503 `unavailable`.

    A connection error while using it is also mapped to 503: the caller may retry
    (reads freely, writes behind their Idempotency-Key).
    """
    try:
        conn = await pool.acquire(timeout=timeout)
    except CONNECTION_ERRORS as exc:
        if not isinstance(exc, asyncio.TimeoutError):
            cause = "db_unreachable"
        elif pool.get_size() >= pool.get_max_size() and pool.get_idle_size() == 0:
            cause = "pool_exhausted"  # every connection busy for the whole acquire timeout
        else:
            cause = "acquire_timeout"  # a new connection did not open in time
        unavailable_log(cause, error=type(exc).__name__, pool_size=pool.get_size())
        raise Unavailable("the database is not available") from exc
    try:
        yield conn
    except CONNECTION_ERRORS as exc:
        # A dead connection (server restart) must not go back to the pool. When the
        # server closed it, asyncpg has already detached it from the pool (and every
        # call on it, terminate() included, raises InterfaceError): nothing to do then.
        with contextlib.suppress(Exception):
            conn.terminate()
        unavailable_log("connection_lost", error=type(exc).__name__)
        raise ConnectionLost("the database connection was lost") from exc
    except asyncpg.QueryCanceledError as exc:  # statement_timeout: the connection is fine
        unavailable_log("statement_timeout", error=type(exc).__name__)
        raise Unavailable("the database did not answer in time") from exc
    finally:
        try:
            await pool.release(conn)
        except Exception as exc:
            # release() resets the connection; on a dead one that fails (and asyncpg
            # terminates it). The request's outcome is already decided: keep it.
            log.warning("db_release_failed", error=type(exc).__name__)


async def read(pool: asyncpg.Pool, timeout: float, fetch: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """`fetch(conn)` on a pooled connection, outside any transaction; when that
    connection breaks, once more on a fresh one. After a server restart the pool may
    still hold connections that died with it: the first read on one fails, its retry
    goes through. For reads only."""
    try:
        async with connection(pool, timeout) as conn:
            return await fetch(conn)
    except ConnectionLost as exc:
        log.warning("db_read_retried", error=type(exc.__cause__).__name__)
    async with connection(pool, timeout) as conn:
        return await fetch(conn)

"""The asyncpg pool of the lifespan, and bounded acquisition of its connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import orjson

from orders.errors import Unavailable
from orders.settings import Settings

# Errors that mean "the database is not reachable right now", not "the query is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
)


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda v: b"\x01" + orjson.dumps(v),
        decoder=lambda b: orjson.loads(b[1:]),
        format="binary",
    )


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
        raise Unavailable("the database is not available") from exc
    try:
        yield conn
    except CONNECTION_ERRORS as exc:
        # A dead connection (server restart) must not go back to the pool.
        conn.terminate()
        raise Unavailable("the database connection was lost") from exc
    finally:
        await pool.release(conn)

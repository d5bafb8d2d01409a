"""The bare ceilings of `make bench`, served exactly as `orders serve` serves the service
(same uvicorn config: uvloop, httptools, no access log, same worker supervisor), minus
everything of the service:

* GET /bare: FastAPI returning a constant JSON document;
* GET /bare/orders/{id}: FastAPI reading one order row by primary key through an asyncpg
  pool made by the service's own orders.db.pool.create_pool (same size, codecs, reset and
  timeouts), no cache, auth, logs or metrics: what a read costs without the service.

    python infra/bench/bare_app.py        # ORDERS_HOST / ORDERS_PORT / ORDERS_WORKERS,
                                          # ORDERS_DATABASE_URL / ORDERS_DB_POOL_MIN / _MAX
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from uuid import UUID

import orjson
from fastapi import FastAPI
from fastapi.responses import Response

from orders.db.pool import create_pool
from orders.settings import Settings

BODY = orjson.dumps({"status": "ok", "service": "bare"})
ROW_SQL = "SELECT * FROM orders WHERE id = $1"
NOT_FOUND = orjson.dumps({"status": 404})


def settings() -> Settings:
    return Settings(dev=True)  # type: ignore[call-arg]  # host/port/workers and the pool's settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    pool = await create_pool(settings())
    app.state.pool = pool
    try:
        yield
    finally:
        await pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/bare")
async def bare() -> Response:
    return Response(BODY, media_type="application/json")


@app.get("/bare/orders/{order_id}")
async def bare_row(order_id: UUID) -> Response:
    async with app.state.pool.acquire() as conn:
        row = await conn.fetchrow(ROW_SQL, order_id)
    if row is None:
        return Response(NOT_FOUND, status_code=404, media_type="application/json")
    # default=str: asyncpg's own UUID type, which orjson does not know
    return Response(orjson.dumps(dict(row), default=str), media_type="application/json")


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from orders.cli import Server, uvicorn_config

    s = settings()
    if s.workers > 1:
        from uvicorn.supervisors import Multiprocess

        config = uvicorn_config(s, "bare_app:app")
        sock = config.bind_socket()
        Multiprocess(config, sockets=[sock]).run()
        return 0
    Server(uvicorn_config(s, app)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

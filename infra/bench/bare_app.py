"""The "bare endpoint" ceiling of `make bench`: FastAPI returning a constant JSON document,
served exactly as `orders serve` serves the service (same uvicorn config: uvloop,
httptools, no access log, same worker supervisor), minus everything of the service.

    python infra/bench/bare_app.py        # ORDERS_HOST / ORDERS_PORT / ORDERS_WORKERS
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
from fastapi import FastAPI
from fastapi.responses import Response

BODY = orjson.dumps({"status": "ok", "service": "bare"})

app = FastAPI()


@app.get("/bare")
async def bare() -> Response:
    return Response(BODY, media_type="application/json")


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from orders.cli import Server, uvicorn_config
    from orders.settings import Settings

    settings = Settings(dev=True)  # type: ignore[call-arg]  # only host/port/workers are read
    if settings.workers > 1:
        from uvicorn.supervisors import Multiprocess

        config = uvicorn_config(settings, "bare_app:app")
        sock = config.bind_socket()
        Multiprocess(config, sockets=[sock]).run()
        return 0
    Server(uvicorn_config(settings, app)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

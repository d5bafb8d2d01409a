"""`orders serve` with uvicorn's plain httptools protocol instead of orders.http_protocol
(no head limit, timeouts or connection cap): the B side of the guards' A/B in `make bench`
(BENCH_PLAIN_HTTP=1). Everything else is `orders serve` as it is."""

from __future__ import annotations

import sys
from typing import Any

from orders import cli
from orders.settings import Settings

guarded_config = cli.uvicorn_config


def plain_config(settings: Settings, app: Any = "orders.main:app") -> Any:
    config = guarded_config(settings, app)
    config.http = "httptools"
    return config


if __name__ == "__main__":
    cli.uvicorn_config = plain_config
    sys.exit(cli.serve(Settings()))  # type: ignore[call-arg]

"""`orders dev` (what `make run` calls): the service with embedded PostgreSQL, Redis, NATS
(JetStream) and an SMTP sink under `.dev/` (unless ORDERS_DATABASE_URL / ORDERS_REDIS_URL /
ORDERS_NATS_URL / ORDERS_SMTP_HOST name other servers), migrated, with a demo catalog, on
127.0.0.1 unless ORDERS_HOST says otherwise; it prints a demo customer token and an admin
token. Ctrl-C stops all of it.

ORDERS_DEV_DIR (default `.dev`), ORDERS_DEV_PG_PORT (55432), ORDERS_DEV_REDIS_PORT (56379)
and ORDERS_DEV_NATS_PORT (54222) move the embedded servers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import asyncpg

from orders.auth import mint
from orders.cli import serve
from orders.db.migrate import migrate
from orders.dev.nats import EmbeddedNats
from orders.dev.postgres import EmbeddedPostgres
from orders.dev.process import Startable, free_port, port_free
from orders.dev.redis import EmbeddedRedis
from orders.dev.smtp import SmtpSink
from orders.settings import Settings

DEMO_CATALOG = [
    ("MUG-001", "Mug", 1299, "USD", 100),
    ("TSHIRT-M", "T-shirt, M", 2500, "USD", 50),
    ("TSHIRT-L", "T-shirt, L", 2500, "USD", 50),
    ("STICKER-PACK", "Sticker pack", 499, "USD", 1000),
    ("POSTER-A2", "Poster A2", 1800, "USD", 25),
    ("TOTE-BAG", "Tote bag", 1500, "EUR", 40),
]
# What the service binds when ORDERS_HOST is not set: it prints working tokens, so
# it is reachable from this machine only unless asked otherwise.
DEV_HOST = "127.0.0.1"


async def seed(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.executemany(
            "INSERT INTO products (sku, name, unit_price, currency, stock) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (sku) DO NOTHING",
            DEMO_CATALOG,
        )
    finally:
        await conn.close()


def _dev_secret(path: Path) -> str:
    """A random secret of this dev directory, made on first use and kept (0600)."""
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def run(port: int | None) -> int:
    root = Path(os.environ.get("ORDERS_DEV_DIR", ".dev")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    stack: list[Startable] = []
    try:
        if not os.environ.get("ORDERS_DATABASE_URL"):
            pg = EmbeddedPostgres(root, port=int(os.environ.get("ORDERS_DEV_PG_PORT", "55432")))
            os.environ["ORDERS_DATABASE_URL"] = pg.start()
            stack.append(pg)
        if not os.environ.get("ORDERS_REDIS_URL"):
            redis = EmbeddedRedis(root, port=int(os.environ.get("ORDERS_DEV_REDIS_PORT", "56379")))
            os.environ["ORDERS_REDIS_URL"] = redis.start()
            stack.append(redis)
        if not os.environ.get("ORDERS_NATS_URL"):
            nats_server = EmbeddedNats(root, port=int(os.environ.get("ORDERS_DEV_NATS_PORT", "54222")))
            os.environ["ORDERS_NATS_URL"] = nats_server.start()
            stack.append(nats_server)
        if not os.environ.get("ORDERS_SMTP_HOST"):
            sink = SmtpSink(root, port=1025 if port_free(1025) else free_port())
            host, smtp_port = sink.start()
            os.environ["ORDERS_SMTP_HOST"], os.environ["ORDERS_SMTP_PORT"] = host, str(smtp_port)
            stack.append(sink)
        os.environ.setdefault("ORDERS_JWT_SECRET", _dev_secret(root / "jwt_secret"))
        # For a payment provider simulator (docs/API.md, Payments): kept across runs, like the JWT secret.
        os.environ.setdefault("ORDERS_PAYMENT_WEBHOOK_SECRET", _dev_secret(root / "payment_webhook_secret"))
        os.environ.setdefault("ORDERS_LOG_FORMAT", "console")
        if port is not None:  # --port wins over ORDERS_PORT (environment or .env; default 8000)
            os.environ["ORDERS_PORT"] = str(port)
        settings = Settings(dev=True)  # type: ignore[call-arg]
        if "host" not in settings.model_fields_set:  # neither the environment nor .env names one
            settings.host = DEV_HOST
        asyncio.run(migrate(settings.dsn))
        asyncio.run(seed(settings.dsn))
        api_host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(settings.host) or (
            f"[{settings.host}]" if ":" in settings.host else settings.host
        )
        print("\norders dev: embedded servers under", root)
        print(f"  PostgreSQL {settings.dsn}\n  Redis      {settings.redis_url}")
        print(f"  NATS       {settings.nats_url} (order events on stream {settings.nats_stream})")
        print(f"  SMTP sink  {settings.smtp_host}:{settings.smtp_port} (mail saved in {root / 'mail'})")
        print(f"  API        http://{api_host}:{settings.port}/docs (listening on {settings.host})")
        print(f"\n  customer token (sub=demo-customer):\n    {mint(settings, 'demo-customer', ttl_s=86400)}")
        print(f"  admin token (sub=demo-admin):\n    {mint(settings, 'demo-admin', roles=['admin'], ttl_s=86400)}")
        print(
            f"  payment webhook secret (Payment-Signature of POST /v1/payments/events):\n    {settings.payment_webhook_secret}\n"
        )
        settings.migrate_on_start = False
        os.environ["ORDERS_MIGRATE_ON_START"] = "false"
        return serve(settings)
    except KeyboardInterrupt:
        return 0
    finally:
        for server in reversed(stack):
            server.stop()

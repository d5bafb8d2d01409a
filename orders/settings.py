"""Settings from the environment (ORDERS_ prefix) and an optional `.env` file.

The table of docs/API.md is the contract; the extra knobs below it are operational.
`Settings()` refuses unsafe values (no database URL, a missing or weak JWT secret)
unless `dev=True`, which only `orders dev` and the test suite set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, PostgresDsn, RedisDsn, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

MIN_SECRET_BYTES = 32
MIN_SECRET_DISTINCT_CHARS = 12


def check_secret(name: str, secret: str | None) -> None:
    """Refuse a signing secret that is missing, short or guessable: at least 32 bytes and
    12 distinct characters ("a" * 32 and "password" * 4 are long enough, not secret)."""
    value = secret or ""
    if len(value.encode()) < MIN_SECRET_BYTES or len(set(value)) < MIN_SECRET_DISTINCT_CHARS:
        raise ValueError(
            f"{name} is required and must be at least {MIN_SECRET_BYTES} bytes with at least"
            f" {MIN_SECRET_DISTINCT_CHARS} distinct characters (e.g. `openssl rand -base64 48`)"
        )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORDERS_", env_file=".env", extra="ignore")

    database_url: PostgresDsn | None = None
    db_pool_min: int = Field(5, ge=0, le=500)
    db_pool_max: int = Field(50, ge=1, le=500)
    db_acquire_timeout_s: float = Field(2.0, gt=0, le=60)
    db_statement_timeout_ms: int = Field(5000, ge=0)
    db_command_timeout_s: float = Field(10.0, gt=0)
    # 0 turns asyncpg's prepared statement cache off (PgBouncer < 1.21 in transaction mode).
    db_statement_cache_size: int = Field(1024, ge=0)
    migrate_on_start: bool = True

    redis_url: RedisDsn | None = None
    redis_timeout_s: float = Field(0.25, gt=0, le=10)
    cache_ttl_s: int = Field(300, ge=1)
    cache_prefix: str = "orders:"
    # The cached GET of one order answered below FastAPI (orders/api/fast_get.py); false:
    # every request goes through the route (an A/B, or to rule the fast path out).
    fast_get: bool = True

    smtp_host: str = "localhost"
    smtp_port: int = Field(1025, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    smtp_timeout_s: float = Field(10.0, gt=0, le=120)
    mail_from: str = "orders@example.com"

    jwt_secret: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None

    # Comma-separated: the payment provider's webhook signing secrets (several during a rotation).
    payment_webhook_secret: str | None = None
    # A pending order not paid within this long is cancelled (reason payment_timeout).
    payment_timeout_s: float = Field(900.0, gt=0, le=30 * 86400)

    cors_origins: str = ""
    max_body_bytes: int = Field(65536, ge=1024)
    shutdown_grace_s: float = Field(25.0, ge=0)
    # Idle keep-alive connections are closed after this long. Longer than the idle timeout
    # of the proxies in front (nginx and cloud load balancers: 60 s), so that a proxy never
    # reuses a connection the service is closing at that instant (a 502 at the proxy).
    keepalive_s: int = Field(75, ge=1, le=3600)
    # HTTP guards of `orders serve` (orders/http_protocol.py; plain uvicorn has none of them).
    max_header_bytes: int = Field(16384, ge=1024, le=1048576)
    header_timeout_s: float = Field(10.0, gt=0, le=300)
    body_timeout_s: float = Field(15.0, gt=0, le=300)
    max_connections: int = Field(1000, ge=1)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    rate_limit_per_minute: int = Field(60, ge=0)
    # Orders of one customer that may be pending (unpaid) at once; 0: no cap.
    max_pending_orders_per_customer: int = Field(10, ge=0, le=1_000_000)

    # Notification relay: how often it polls, how many rows a pass claims (transient failures
    # are retried forever, at most relay_backoff_max_s apart; permanent ones are final at
    # once: docs/DEPLOYMENT.md).
    relay_interval_s: float = Field(1.0, gt=0)
    relay_batch: int = Field(50, ge=1, le=1000)
    relay_lease_s: float = Field(60.0, gt=0)
    relay_backoff_max_s: float = Field(300.0, gt=0)
    # Fast-path delivery batches (each one SMTP session) under way at once, per worker.
    relay_concurrency: int = Field(16, ge=1, le=64)
    # Outbox rows queued for the fast path at most; past it they wait for the relay.
    notify_queue_max: int = Field(1000, ge=1)
    # Order events on NATS JetStream (docs/API.md, "Order events"); None: events off.
    nats_url: str | None = None
    nats_stream: str = Field("ORDERS", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    nats_connect_timeout_s: float = Field(2.0, gt=0, le=60)
    # The wait for JetStream's ack of one event; unacked, the row is retried (Nats-Msg-Id dedups).
    nats_publish_timeout_s: float = Field(5.0, gt=0, le=60)
    idempotency_retention_h: int = Field(48, ge=24)
    outbox_retention_h: int = Field(168, ge=1)

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)

    # Lifts the refusals below. Code sets it (`orders dev`, the tests); the environment cannot.
    dev: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _without(env_settings, "dev"), _without(dotenv_settings, "dev"), file_secret_settings)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.db_pool_min > self.db_pool_max:
            raise ValueError("ORDERS_DB_POOL_MIN must not exceed ORDERS_DB_POOL_MAX")
        # It is written into every email's From header as it is (orders/notify/email.py).
        if not self.mail_from.isascii() or not self.mail_from.isprintable() or "@" not in self.mail_from:
            raise ValueError("ORDERS_MAIL_FROM must be one line of printable ASCII with an address")
        if self.dev:
            return self
        if self.database_url is None:
            raise ValueError("ORDERS_DATABASE_URL is required (or run `orders dev`)")
        check_secret("ORDERS_JWT_SECRET", self.jwt_secret)
        # Each secret of a rotation must be strong; none at all is refused like a weak one.
        secrets: list[str | None] = [*self.payment_webhook_secrets] or [None]
        for secret in secrets:
            check_secret("ORDERS_PAYMENT_WEBHOOK_SECRET", secret)
        return self

    @property
    def payment_webhook_secrets(self) -> list[str]:
        return [s.strip() for s in (self.payment_webhook_secret or "").split(",") if s.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def events_on(self) -> bool:
        """Order events are written and published only with a NATS URL (an empty one: off)."""
        return bool(self.nats_url)

    @property
    def dsn(self) -> str:
        if self.database_url is None:
            raise RuntimeError("no database configured")
        return str(self.database_url)


def _without(source: PydanticBaseSettingsSource, name: str) -> Callable[[], dict[str, Any]]:
    """`source` less the field `name`."""

    def read() -> dict[str, Any]:
        return {k: v for k, v in source().items() if k != name}

    read.__name__ = type(source).__name__
    return read

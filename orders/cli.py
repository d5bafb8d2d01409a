"""`orders serve | migrate | dev | outbox`."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from socket import socket
from types import FrameType
from uuid import UUID

import uvicorn
from uvicorn.supervisors import Multiprocess

from orders.domain.cursor import BIGINT_MAX
from orders.settings import Settings


class Server(uvicorn.Server):
    """uvicorn, except that a graceful stop on SIGTERM exits 0 rather than re-raising
    the signal (a completed drain is a clean exit for the orchestrator)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def uvicorn_config(settings: Settings, app: object | str = "orders.main:app") -> uvicorn.Config:
    # httptools behind orders.http_protocol: its head size limit, head and body timeouts
    # and connection cap (plain `uvicorn orders.main:app` has none of them).
    from orders.http_protocol import Config, Limits

    return Config(
        app,
        Limits.from_settings(settings),
        host=settings.host,
        port=settings.port,
        workers=settings.workers if isinstance(app, str) else None,
        loop="uvloop",
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=True,
        server_header=False,
        # Bounded: uvicorn's default waits forever. The rest of the grace goes to
        # flushing notifications in the lifespan shutdown.
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s * 0.6)),
        timeout_keep_alive=settings.keepalive_s,
    )


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def metrics_dir() -> Iterator[str]:
    """prometheus_client's multiprocess directory for this server's workers, in the
    environment they inherit: $PROMETHEUS_MULTIPROC_DIR emptied of a previous run's
    files, else a private directory under the temp dir (removed at exit)."""
    given = os.environ.get(MULTIPROC_ENV)
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="orders-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield str(path)
    finally:
        if not given:
            shutil.rmtree(path, ignore_errors=True)


class Supervisor(Multiprocess):
    """uvicorn's worker supervisor, which also tells prometheus_client about each worker
    that is gone (died and replaced, or retired by SIGHUP or SIGTTOU): its live gauges
    leave /metrics, its counters keep counting in the totals."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket], metrics_path: str) -> None:
        super().__init__(config, sockets)
        self.metrics_path = metrics_path
        self.pids: set[int] = set()

    def forget_exited(self) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        pids = {p.pid for p in self.processes if p.pid is not None}
        for pid in self.pids - pids:
            mark_process_dead(pid, self.metrics_path)
        self.pids = pids

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self.forget_exited()

    def handle_signals(self) -> None:
        super().handle_signals()
        self.forget_exited()


def serve(settings: Settings) -> int:
    if settings.workers > 1:
        # Each worker imports orders.main:app, which reads the same environment; the
        # metrics directory is in it before any worker imports prometheus_client.
        with metrics_dir() as path:
            config = uvicorn_config(settings, "orders.main:app")
            sock = config.bind_socket()
            # uvicorn >= 0.50: the supervisor makes its workers (no `target=` any more).
            Supervisor(config, sockets=[sock], metrics_path=path).run()
        return 0
    # One process: prometheus_client's in-memory metrics, no files (it also reads the
    # variable's old lower-case name).
    os.environ.pop(MULTIPROC_ENV, None)
    os.environ.pop(MULTIPROC_ENV.lower(), None)
    from orders.app import create_app

    Server(uvicorn_config(settings, create_app(settings))).run()
    return 0


def migrate(settings: Settings) -> int:
    from orders.db.migrate import migrate as run_migrations

    applied = asyncio.run(run_migrations(settings.dsn))
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


async def _outbox(settings: Settings, args: argparse.Namespace) -> int:
    """`orders outbox list | retry`: the queries of /v1/admin/notifications, on one connection."""
    import asyncpg

    from orders.db import outbox

    conn = await asyncpg.connect(settings.dsn, timeout=10, command_timeout=settings.db_command_timeout_s)
    try:
        if args.action == "list":
            rows = await outbox.page(conn, status=args.status, order_id=args.order, before_id=None, limit=args.limit)
            print("id\torder_id\tkind\tstatus\tattempts\tlast_error")
            for r in rows:
                error = " ".join((r["last_error"] or "-").split())  # one line per row, whatever the error
                print(f"{r['id']}\t{r['order_id']}\t{r['kind']}\t{r['status']}\t{r['attempts']}\t{error}")
            return 0
        retried = await outbox.retry(conn, None if args.all_failed else args.ids)
        done = sorted(r["id"] for r in retried)
        print(f"re-queued {len(done)} row(s){': ' + ' '.join(map(str, done)) if done else ''}")
        code = 0
        for row_id in sorted(set(args.ids) - set(done)):  # a pending or sent row is never sent again
            row = await outbox.get(conn, row_id)
            why = "no such row" if row is None else f"not failed ({row['status']}): left as it is"
            print(f"orders outbox: {row_id}: {why}", file=sys.stderr)
            code = 1
        return code
    finally:
        await conn.close()


def _bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high`, else a usage error that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: an integer from {low} to {high}")
        return value

    return parse


def outbox(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_outbox(settings, args))


def dev(port: int | None) -> int:
    """`orders dev`: in a checkout with the dev extra installed (orders.dev is not in the wheel)."""
    try:
        from orders.dev.runner import run
    except ModuleNotFoundError as exc:
        print(
            f"orders dev: the dev tooling is not installed ({exc.name} is missing): "
            "run `make run` in a checkout of the repository",
            file=sys.stderr,
        )
        return 2
    return run(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orders", description="The orders service")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the HTTP server (uvicorn) with the ORDERS_* settings")
    sub.add_parser("migrate", help="apply pending SQL migrations and exit")
    dev_parser = sub.add_parser("dev", help="embedded PostgreSQL, Redis, NATS and SMTP sink, demo data, port 8000")
    dev_parser.add_argument("--port", type=int, help="the HTTP port (default: ORDERS_PORT, else 8000)")
    outbox_parser = sub.add_parser("outbox", help="list the notification outbox, re-queue failed rows")
    actions = outbox_parser.add_subparsers(dest="action", required=True)
    list_parser = actions.add_parser("list", help="outbox rows, newest first: a line per row")
    list_parser.add_argument("--status", choices=["pending", "sent", "failed"])
    list_parser.add_argument("--order", type=UUID, metavar="ORDER_ID")
    list_parser.add_argument(
        "--limit", type=_bounded(1, 10_000), default=100, help="rows at most (1 to 10000, default 100)"
    )
    retry_parser = actions.add_parser("retry", help="re-queue failed rows: pending and due now")
    retry_parser.add_argument("ids", nargs="*", type=_bounded(1, BIGINT_MAX), metavar="ID")
    retry_parser.add_argument("--all-failed", action="store_true", help="every failed row")
    args = parser.parse_args(argv)
    if args.command == "outbox" and args.action == "retry" and bool(args.ids) == args.all_failed:
        retry_parser.error("give row ids or --all-failed, not both")
    if args.command == "dev":
        return dev(args.port)
    try:
        settings = Settings()  # type: ignore[call-arg]
    except Exception as exc:  # pydantic ValidationError: say what is missing, no traceback
        print(f"orders: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "outbox":
        return outbox(settings, args)
    return serve(settings) if args.command == "serve" else migrate(settings)


if __name__ == "__main__":
    sys.exit(main())

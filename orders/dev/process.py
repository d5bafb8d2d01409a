"""What the embedded servers of orders.dev share: ports, processes, pid files, logs.

Servers listen on 127.0.0.1 only and keep their files under a root directory chosen by
the caller (`.dev/` for `orders dev`, a tmp dir for the tests); a root directory is used
by one process at a time. Each server looks for binaries on the machine first and then
in a Python package that bundles them (`prefer_machine=False`: the package first).

Leftover servers: if a server from a previous run still runs on the same data dir /
pid file (the previous `orders dev` was killed with SIGKILL, say), `start()` stops it
and starts a fresh one, rather than reusing it: the caller then always gets a server
it owns, on the port it asked for, with the binaries and settings of this run, and
`stop()` stops it. A pid file whose process is gone (or is now some unrelated process)
is removed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take it before the server binds it; `start()` retries with
    a new port when a port it picked itself turns out to be in use.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def listening(port: int, host: str = HOST) -> bool:
    """Something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound right now."""
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def given_or_started(
    variable: str, machine_port: int, machine_url: str, embedded: Callable[[], EmbeddedServer]
) -> Iterator[str]:
    """The URL of a server for the tests (and the e2e run): $variable, else the machine's
    (`machine_url`) when something listens on 127.0.0.1:machine_port, else `embedded()`,
    started here and stopped afterwards."""
    given = os.environ.get(variable)
    if given:
        yield given
    elif listening(machine_port):
        yield machine_url
    else:
        with embedded() as server:
            yield server.url


class Startable:
    """A context manager that start()s on entry and stop()s on exit."""

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedServer(Startable):
    """What the embedded servers share: their directory `root/<subdir>`, their port
    (picked automatically unless given, kept across restarts), the start-up retries on
    another port when it was taken, and the context manager."""

    name: str
    subdir: str
    url_format: str  # what clients connect to, from {host} and {port}

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        *,
        prefer_machine: bool = True,
        start_timeout: float = START_TIMEOUT_S,
        stop_timeout: float = STOP_TIMEOUT_S,
    ) -> None:
        self.root = Path(root).absolute()
        self.dir = self.root / self.subdir
        self.port: int | None = port  # the actual port once started
        self._requested_port = port
        self._prefer_machine = prefer_machine
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self.binaries_source: str | None = None  # set by start(): "machine" or the package

    @property
    def url(self) -> str:
        """What clients connect to (a DSN for PostgreSQL); RuntimeError until started."""
        if self.port is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.url_format.format(host=HOST, port=self.port)

    def _start_on_a_port(self, start_on: Callable[[int], None]) -> None:
        """`start_on(port)`, on the requested port, else on a free one (up to three, when
        one turns out taken). On a restart, the port picked last time is tried first, so
        that the DSN/URL stays the same."""
        attempts = 3 if self._requested_port is None else 1
        for attempt in range(1, attempts + 1):
            previous = self.port if attempt == 1 else None
            port = self._requested_port or previous or free_port()
            try:
                start_on(port)
            except PortInUse:
                if attempt == attempts:
                    raise RuntimeError(f"{self.name}: port {port} already in use") from None
                continue
            self.port = port
            return
        raise AssertionError("unreachable")


class PortInUse(Exception):
    """The server could not bind its port; `start()` may retry with another one."""


class ChildServer(EmbeddedServer):
    """An embedded server run as a child process of ours (Redis, NATS), with its pid file
    and its log (stdout and stderr) in `root/<subdir>/<subdir>.pid|.log`.

    Subclasses say how to find the executable, its command line for a port and when it
    is ready; the rest (leftovers, start on a port, bounded stop) is here.
    """

    # What the command line of a leftover server from our pid file may contain: a pid
    # that now belongs to an unrelated process is not touched.
    process_names: tuple[str, ...]

    def __init__(self, root: Path, port: int | None = None, **kw: Any) -> None:
        super().__init__(root, port, **kw)
        self.pidfile = self.dir / f"{self.subdir}.pid"
        self.logfile = self.dir / f"{self.subdir}.log"
        self.executable: Path | None = None  # set by start(), with binaries_source
        self._proc: subprocess.Popen[bytes] | None = None
        # The subclass's module logger, so that log records keep their logger name.
        self._log = logging.getLogger(type(self).__module__)

    # -- hooks

    def _find_executable(self) -> tuple[Path, str]:
        """(executable, "machine" | the package); RuntimeError if there is none."""
        raise NotImplementedError

    def _argv(self, port: int) -> list[str]:
        """The server's command line (after the executable) for `port`."""
        raise NotImplementedError

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, offset: int, deadline: float) -> bool:
        """Until the server answers on `port` (its log so far starts at `offset`); False
        when it died or at the deadline."""
        raise NotImplementedError

    def _make_dirs(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def _before_terminate(self, pid: int) -> None:
        """Called by stop() before SIGTERM."""

    # -- the lifecycle

    def start(self) -> str:
        if self._proc is not None and self._proc.poll() is None:
            return self.url
        self.executable, self.binaries_source = self._find_executable()
        self._make_dirs()
        self._stop_leftover()
        self._start_on_a_port(self._start_on)
        self._log.info("%s (%s) started on %s", self.subdir, self.executable, self.url)
        return self.url

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (for fault tests), else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self) -> None:
        """SIGTERM, bounded by `stop_timeout`, then SIGKILL; no-op if not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        self._before_terminate(proc.pid)
        proc.terminate()
        try:
            proc.wait(self._stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        self.pidfile.unlink(missing_ok=True)
        self._log.info("%s (pid %s) stopped", self.subdir, proc.pid)

    # -- internals

    def _stop_leftover(self) -> None:
        pid = read_pid(self.pidfile)
        name = next((n for n in self.process_names if pid is not None and process_matches(pid, n)), None)
        if pid is not None and name is not None:
            self._log.warning("%s from a previous run still runs (pid %s): stopping it", name, pid)
            if not terminate_pid(pid, name, (signal.SIGTERM, signal.SIGKILL), self._stop_timeout):
                raise RuntimeError(f"{name} (pid {pid}) did not stop")
        self.pidfile.unlink(missing_ok=True)

    def _start_on(self, port: int) -> None:
        assert self.executable is not None
        offset = file_size(self.logfile)
        with self.logfile.open("ab") as out:
            proc = subprocess.Popen(
                [str(self.executable), *self._argv(port)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=clean_env(),
                start_new_session=True,  # Ctrl-C of `orders dev` reaches the server through stop()
            )
        self._proc = proc
        deadline = time.monotonic() + self._start_timeout
        if self._wait_ready(proc, port, offset, deadline):
            return
        self.stop()
        tail = log_tail(self.logfile, offset)
        # Redis says "Address already in use", nats-server "address already in use".
        if "address already in use" in tail.lower():
            raise PortInUse(port)
        raise RuntimeError(
            f"{self.executable.name} did not start on port {port} within {self._start_timeout} s, "
            f"see {self.logfile}:\n{tail}"
        )


def log_tail(path: Path, offset: int = 0, limit: int = 3000) -> str:
    """The end of a log file (from `offset` on), for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace").strip()


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def process_matches(pid: int, needle: str) -> bool:
    """Whether `pid` is alive and its command line contains `needle`.

    Guards against a pid file whose pid got reused by an unrelated process. Zombies
    (empty command line) count as gone. Without /proc (macOS), any live pid matches.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return False
    return needle.encode() in cmdline


def read_pid(pidfile: Path) -> int | None:
    try:
        first = pidfile.read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


def terminate_pid(pid: int, needle: str, signals: Sequence[signal.Signals], timeout: float) -> bool:
    """Send each signal in turn, waiting (bounded) for the process to go; True if it went."""
    per_signal = timeout / max(len(signals), 1)
    for sig in signals:
        if not process_matches(pid, needle):
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + per_signal
        while time.monotonic() < deadline:
            if not process_matches(pid, needle):
                return True
            time.sleep(0.05)
    return not process_matches(pid, needle)


def wait_for_tcp(
    port: int,
    deadline: float,
    alive: Callable[[], bool],
    probe: bytes | None = None,
    expect: bytes | None = None,
) -> bool:
    """Poll 127.0.0.1:port until it accepts (and answers `probe` with `expect`).

    Returns False as soon as `alive()` says the server died, or at the deadline.
    """
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((HOST, port), timeout=1.0) as s:
                if probe is None:
                    return True
                s.sendall(probe)
                if expect is not None and s.recv(64).startswith(expect):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def package_dir(name: str) -> Path | None:
    """The directory of an installed package, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def pick_binaries(
    machine: list[Path], packaged: Path | None, package: str, prefer_machine: bool, hint: str
) -> tuple[Path, str]:
    """The first of the machine's binaries, else the package's (the other way round with
    prefer_machine=False), and where it comes from: "machine" or the package's name.
    RuntimeError(hint) when there is none."""
    ours = [(path, "machine") for path in machine]
    theirs = [(packaged, package)] if packaged is not None else []
    candidates = ours + theirs if prefer_machine else theirs + ours
    if not candidates:
        raise RuntimeError(hint)
    return candidates[0]


def is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def clean_env() -> dict[str, str]:
    """The environment for the servers: no PG*/REDIS* variables that could redirect them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "REDIS"))}
    env["LC_ALL"] = "C"
    return env


def wait_for_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until `url` answers 200; fails at once when `proc` (the server) exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")

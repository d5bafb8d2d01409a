"""`make bench`: the orders service against its three ceilings, measured in one run.

What it does (everything on this machine, loopback only, bounded in time):

1. a fresh database `orders_bench` (dropped at the end), its own Redis db and key
   prefix (deleted at the end), an SMTP sink so that the confirmation emails really go
   out, a catalog of BENCH_SKUS products and BENCH_CUSTOMERS pre-minted customer tokens.
   The sink is Postfix's smtp-sink (C, made for benchmarks: it costs next to nothing per
   message), taken from Debian's postfix package with `apt-get download` + `dpkg -x` into
   .dev/bench/postfix/ once (nothing installed); when that is impossible, or with
   BENCH_SINK=python, a counting aiosmtpd sink in this process, said in the report;
2. for each worker count in BENCH_WORKERS: `orders serve` as production runs it
   (uvicorn + uvloop + httptools, JSON logs at info to a file, rate limit on) and
   wrk driving
     - POST /v1/orders: two lines, a unique Idempotency-Key per request, a random
       customer per request (infra/bench/orders.lua), as fast as it answers; then
       waiting until the outbox backlog of the run is delivered (CPU counted until
       then, "sustained" = orders / (run + delivery time));
     - the same at a fixed rate, BENCH_PACE_SHARE (0.5) of that sustained rate, for
       latency below saturation (orders.lua schedules the sends; the achieved rate is
       checked against the target),
     - GET /v1/orders/{id} of orders in the cache (infra/bench/get_order.lua),
   then checks that the sink received every email the outbox marked sent, and runs the
   bare app (infra/bench/bare_app.py, same uvicorn settings and worker count): a constant
   answer (ceiling b) and one order row read by id through an asyncpg pool (ceiling c);
3. the order transaction as plain SQL through pgbench (ceiling a): a script generated
   from the service's own SQL (orders.PLACE_SQL: the same call of orders_place(), in
   autocommit, one round trip, values passed as bind parameters with the sizes of a real
   order), same database, same client count; plus a second script that adds the outbox
   delivery statements the service runs per order after the response (claim, mark email
   sent, mark audit sent);
4. prints throughput, latency (p50, p99, max), non-2xx counts, the ratios orders/pgbench,
   cached GET/bare and cached GET/one-row read, CPU milliseconds per request by process
   (service, PostgreSQL and Redis servers, the sink, wrk or pgbench: /proc readings at
   the start and end of each run), the event-loop lag histogram of each service run
   when /metrics has orders_event_loop_lag_seconds, and the RSS of the worker(s) at start
   and end; writes it all to infra/bench/results/<stamp>/ (summary.json, server logs,
   pgbench scripts, the sink's counters).

Environment knobs: BENCH_DURATION (s, default 15), BENCH_WARMUP (s, 3), BENCH_CONNECTIONS
(64), BENCH_WORKERS ("1 2"), BENCH_POOL_MAX (per worker, default 40: 2 workers x 40 = 80 stay
far under max_connections=100), BENCH_PROFILE=1 (py-spy on a worker during an extra
order run: infra/bench/results/<stamp>/profile-*.txt and its summary), BENCH_PACE_SHARE,
BENCH_PHASES (a subset of "create get bare row pgbench", for quick iterations; "getroute"
adds the cached GET with ORDERS_FAST_GET=false, the A of the fast path's A/B),
BENCH_SINK (postfix, or python), BENCH_PLAIN_HTTP=1 (the service without the HTTP guards of
orders.http_protocol, for their A/B), BENCH_EVENTS=1 (order events on: a nats-server of the
bench's own, see below), BENCH_PG_ADMIN_DSN, BENCH_REDIS_URL.

BENCH_EVENTS=1 prices the order events (docs/API.md, "Order events"): the bench starts a
nats-server with JetStream of its own (orders.dev.nats.EmbeddedNats: a free port of
127.0.0.1, its store under results/<stamp>/tmp/, deleted at the end; never the machine's
NATS) and gives the service its ORDERS_NATS_URL, so each order also writes an outbox row of
kind 'event' that the service publishes; pgbench's scripts write that row too and claim and
mark it sent as the service does; the CPU table gains a nats-server column; and the check
after each worker count's runs also compares the stream's messages with the event rows the
outbox marked sent (equal, none pending).

wrk, PostgreSQL and the service share the machine's cores: compare the ratios of one
run, never absolute numbers across runs or machines.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import orjson

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from orders.auth import mint  # noqa: E402
from orders.db import orders, outbox  # noqa: E402
from orders.dev.nats import EmbeddedNats  # noqa: E402
from orders.dev.postgres import execute, with_database  # noqa: E402
from orders.dev.process import free_port, listening  # noqa: E402
from orders.dev.redis import forget_keys  # noqa: E402
from orders.dev.smtp import SmtpSink  # noqa: E402
from orders.settings import Settings  # noqa: E402

DB_NAME = "orders_bench"
SKU_LO = 1000  # SKUs are B1000 .. B<SKU_LO + BENCH_SKUS - 1>: fixed width, so sorted as numbers
UNIT_PRICE = 1299


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


DURATION = env_int("BENCH_DURATION", 15)
WARMUP = env_int("BENCH_WARMUP", 3)
CONNECTIONS = env_int("BENCH_CONNECTIONS", 64)
THREADS = 2
WORKERS = [int(w) for w in os.environ.get("BENCH_WORKERS", "1 2").split()]
POOL_MAX = env_int("BENCH_POOL_MAX", 40)
NSKUS = env_int("BENCH_SKUS", 1000)
NCUSTOMERS = env_int("BENCH_CUSTOMERS", 20000)
NGET_ORDERS = env_int("BENCH_GET_ORDERS", 1000)
PACE_SHARE = float(os.environ.get("BENCH_PACE_SHARE", "0.5"))  # of the peak, for the latency run
PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0")
PHASES = set(os.environ.get("BENCH_PHASES", "create get bare row pgbench").split())  # a subset, for quick iterations
# BENCH_PLAIN_HTTP=1: the service on plain httptools, without orders.http_protocol's guards (their A/B).
PLAIN_HTTP = os.environ.get("BENCH_PLAIN_HTTP", "") not in ("", "0")
SERVE_ARGV = [sys.executable, str(BENCH_DIR / "plain_serve.py")] if PLAIN_HTTP else [str(BIN / "orders"), "serve"]
ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
SINK = os.environ.get("BENCH_SINK", "postfix")  # "python": the aiosmtpd fallback, for an A/B of the sink
# BENCH_EVENTS=1: order events on, published to a nats-server the bench starts (its cost priced).
EVENTS = os.environ.get("BENCH_EVENTS", "") not in ("", "0")


def log(*args: Any) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}]", *args, flush=True)


# --------------------------------------------------------------------------- tools


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    log("wrk is missing: installing it from Debian (apt-get install wrk)")
    for cmd in (
        ["apt-get", "install", "-y", "-qq", "wrk"],
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "wrk"],
    ):
        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
        found = shutil.which("wrk")
        if found:
            return found
    # oha (the other fast generator) is not on PyPI as a tool; no other fallback here.
    sys.exit("bench: wrk is required and could not be installed (apt-get install wrk)")


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """The worker processes of a uvicorn supervisor (not multiprocessing's resource tracker)."""
    out: list[int] = []
    for child in _kids(pid):
        try:
            if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
        except OSError:
            pass
    return out


# --------------------------------------------------------------------------- CPU by process

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: str) -> list[str] | None:
    """The fields of a /proc stat file after the command name: [0] is field 3 (state)."""
    try:
        raw = Path(path).read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _kids(pid: int) -> list[int]:
    out: list[int] = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            out += [int(c) for c in Path(task).read_text().split()]
        except OSError:
            pass
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, of its children it has reaped (cutime and
    cstime: the PostgreSQL backends of closed connections, for the postmaster) and of its
    live descendants. A difference of two readings is what the tree spent in between,
    processes that came and went included."""
    f = _stat_fields(f"/proc/{pid}/stat")
    if f is None:
        return 0.0
    secs = sum(int(x) for x in f[11:15]) / CLK_TCK  # utime, stime, cutime, cstime
    return secs + sum(tree_cpu(kid) for kid in _kids(pid))


def thread_cpu(tid: int) -> float:
    f = _stat_fields(f"/proc/self/task/{tid}/stat")
    return 0.0 if f is None else (int(f[11]) + int(f[12])) / CLK_TCK


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def postgres_server_pid(dsn: str) -> int | None:
    """The postmaster of the server behind `dsn` (the parent of a backend of ours), when it
    runs on this machine: its tree is every process of that server. The names are checked
    because a server in a container reports pids of another namespace."""

    async def postmaster() -> int | None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:  # read while the backend lives: it exits when the connection closes
            pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
            f = _stat_fields(f"/proc/{pid}/stat")
            if f is None or not _comm(pid).startswith("postgres") or not _comm(int(f[1])).startswith("postgres"):
                return None
            return int(f[1])
        finally:
            await conn.close()

    return asyncio.run(postmaster())


def redis_server_pid(url: str) -> int | None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    return pid if _comm(pid).startswith(("redis", "valkey")) else None


CPU_PARTS = ("service", "postgres", "redis", "smtp sink", "nats-server", "load generator")


class CpuMeter:
    """CPU seconds by part over a phase: /proc readings of each part's process tree at the
    start and at the end (nothing sampled in between, so the meter costs nothing). The load
    generator is measured apart, from its rusage when it exits (run_child)."""

    def __init__(self, parts: dict[str, Callable[[], float]]) -> None:
        self.parts = parts
        self.first = {name: read() for name, read in parts.items()}

    def stop(self) -> dict[str, float]:
        return {name: read() - self.first[name] for name, read in self.parts.items()}


def run_child(cmd: list[str], env: dict[str, str] | None, timeout: float) -> tuple[int, str, str, float]:
    """Run a command to its end: (exit status, stdout, stderr, its CPU seconds from wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise RuntimeError(f"{cmd[0]} did not finish in {timeout} s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(), err.read().decode(), usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- SMTP sinks

POSTFIX_DIR = ROOT / ".dev" / "bench" / "postfix"  # gitignored, kept between runs


def fetch_smtp_sink() -> tuple[Path | None, str]:
    """Postfix's smtp-sink (C, made for benchmarks) from Debian's postfix package, unpacked
    once into .dev/ without installing anything: (its path, its version), or (None, why not)."""
    binary = POSTFIX_DIR / "usr" / "sbin" / "smtp-sink"
    version_file = POSTFIX_DIR / "VERSION"
    if not binary.exists():
        if not (shutil.which("apt-get") and shutil.which("dpkg")):
            return None, "apt-get and dpkg are needed to fetch it"
        with tempfile.TemporaryDirectory() as tmp:
            for cmd in (
                ["apt-get", "download", "postfix"],
                ["apt-get", "update", "-qq"],
                ["apt-get", "download", "postfix"],
            ):
                subprocess.run(cmd, cwd=tmp, capture_output=True, timeout=180, check=False)
                debs = glob.glob(f"{tmp}/postfix_*.deb")
                if debs:
                    break
            else:
                return None, "`apt-get download postfix` failed"
            staging = Path(tmp) / "x"
            subprocess.run(["dpkg", "-x", debs[0], str(staging)], check=True, timeout=120)
            version = subprocess.run(
                ["dpkg-deb", "-f", debs[0], "Version"], capture_output=True, text=True, check=False
            ).stdout.strip()
            (staging / "VERSION").write_text(version + "\n")
            if POSTFIX_DIR.exists():
                shutil.rmtree(POSTFIX_DIR)
            POSTFIX_DIR.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staging), POSTFIX_DIR)
    # Its own libraries come from the package; the rest (libc, libdb, ICU...) must resolve
    # from this system, which a package of another Debian release may not find.
    ldd = subprocess.run(["ldd", str(binary)], env=postfix_env(), capture_output=True, text=True, check=False)
    missing = [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]
    if ldd.returncode != 0 or missing:
        return None, f"its libraries do not resolve here: {', '.join(missing) or ldd.stderr.strip()}"
    return binary, version_file.read_text().strip() if version_file.exists() else "?"


def postfix_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "LD_LIBRARY_PATH": str(POSTFIX_DIR / "usr" / "lib" / "postfix")}


class PostfixSink:
    """smtp-sink on a free port of 127.0.0.1, throwing every message away. `-c` makes it
    write running counters ("sess=.. quit=.. mesg=N", one per update, separated by \\r) to
    its stdout, a file here: `received()` is the last mesg=N."""

    def __init__(self, binary: Path, version: str, out: Path) -> None:
        self.binary = binary
        self.label = f"Postfix smtp-sink {version}"
        self.counters = out / "smtp-sink.counters"
        self.errors = out / "smtp-sink.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> tuple[str, int]:
        port = free_port()
        argv = [str(self.binary), "-c", "-4"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # it refuses to run as root without a user to switch to
        argv += [f"127.0.0.1:{port}", "256"]  # the listen backlog
        with self.counters.open("wb") as counters, self.errors.open("wb") as errors:
            self.proc = subprocess.Popen(
                argv, env=postfix_env(), stdout=counters, stderr=errors, start_new_session=True
            )
        deadline = time.monotonic() + 10
        while not listening(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"smtp-sink did not start: {self.errors.read_text()[-2000:]}")
            time.sleep(0.05)
        return "127.0.0.1", port

    def received(self) -> int:
        found = re.findall(rb"mesg=(\d+)", self.counters.read_bytes()[-200:])
        return int(found[-1]) if found else 0

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class CountingSink(SmtpSink):
    """The fallback when smtp-sink cannot be had: orders.dev.smtp.SmtpSink accepting every
    message over real SMTP but only counting it (parsing and keeping tens of thousands of
    messages would cost several ms of CPU per order), in a thread of this process."""

    label = "Python aiosmtpd sink (fallback: costs more CPU per message than smtp-sink)"
    count = 0
    tid = 0

    def start(self) -> tuple[str, int]:
        host, port = super().start()
        thread = self._controller._thread if self._controller is not None else None
        self.tid = (thread.native_id or 0) if thread is not None else 0
        return host, port

    def received(self) -> int:
        return self.count

    def cpu(self) -> float:
        return thread_cpu(self.tid) if self.tid else 0.0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        return "250 Message accepted for delivery"


def start_sink(out: Path) -> tuple[PostfixSink | CountingSink, str, int]:
    """smtp-sink unless BENCH_SINK=python or it cannot be had (then said in the report)."""
    if SINK == "python":
        reason = "BENCH_SINK=python"
    else:
        binary, detail = fetch_smtp_sink()
        if binary is not None:
            sink: PostfixSink | CountingSink = PostfixSink(binary, detail, out)
            host, port = sink.start()
            return sink, host, port
        reason = f"Postfix smtp-sink unavailable: {detail}"
    log(f"SMTP sink: the Python fallback ({reason})")
    sink = CountingSink()
    sink.label += f" [{reason}]"
    host, port = sink.start()
    return sink, host, port


# --------------------------------------------------------------------------- servers


class Server:
    """`orders serve` (or the bare app) as a subprocess: ready when /readyz (or /bare) answers."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workers: int, out: Path, probe: str) -> None:
        self.name, self.workers, self.probe = name, workers, probe
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = out / f"{name}.log"
        self.env = {**env, "ORDERS_HOST": "127.0.0.1", "ORDERS_PORT": str(self.port), "ORDERS_WORKERS": str(workers)}
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Server:
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        ok = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                ok = ok + 1 if httpx.get(self.url + self.probe, timeout=2).status_code == 200 else 0
            except httpx.HTTPError:
                ok = 0
            if ok >= 5 and len(self.worker_pids()) == self.workers:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready in {timeout} s")

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [self.proc.pid] if self.workers == 1 else children(self.proc.pid)

    def rss_mib(self) -> list[float]:
        return [round(rss_kib(p) / 1024, 1) for p in self.worker_pids()]

    def cpu(self) -> float:
        """CPU seconds of the server's process tree (supervisor and workers) so far."""
        return tree_cpu(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- load generators


def run_wrk(
    wrk: str,
    script: str,
    url: str,
    seconds: int,
    env: dict[str, str],
    parts: dict[str, Callable[[], float]] | None = None,
    connections: int = CONNECTIONS,
    then: Callable[[], dict[str, Any]] | None = None,
    metrics_url: str | None = None,
) -> dict[str, Any]:
    """One wrk run; `then()` runs after it with the CPU meter still on (the delivery of a
    create run's outbox backlog), and what it returns joins the result. With `parts`, CPU
    per request by part; with `metrics_url`, the event-loop lag histogram of the run."""
    cmd = [
        wrk,
        "-t",
        str(THREADS),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH_DIR / script),
        url,
    ]
    lag_before = loop_lag(metrics_url) if metrics_url else None
    meter = CpuMeter(parts or {})
    code, stdout, stderr, wrk_cpu = run_child(cmd, {**os.environ, **env, "BENCH_THREADS": str(THREADS)}, seconds + 60)
    extra = then() if then is not None else {}
    cpu = {**meter.stop(), "load generator": wrk_cpu}
    lag_after = loop_lag(metrics_url) if metrics_url else None
    for line in stdout.splitlines():
        if line.startswith("WRK_JSON "):
            r = json.loads(line[len("WRK_JSON ") :])
            secs = r["duration_us"] / 1e6
            errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
            result = {
                "rps": r["requests"] / secs,
                "requests": r["requests"],
                "p50_ms": r["p50_us"] / 1000,
                "p99_ms": r["p99_us"] / 1000,
                "max_ms": r["max_us"] / 1000,
                "mean_ms": r["mean_us"] / 1000,
                "non2xx": r["non2xx"],
                "socket_errors": errors,
                "cpu_ms_per_request": per_request(cpu, r["requests"]) if parts else {},
                **extra,
            }
            if lag_before is not None and lag_after is not None:
                result["loop_lag"] = lag_delta(lag_before, lag_after)
            return result
    raise RuntimeError(f"wrk gave no report (exit {code}):\n{stdout}\n{stderr}")


def per_request(cpu: dict[str, float], requests: int) -> dict[str, float]:
    return {k: round(1000 * v / max(1, requests), 3) for k, v in cpu.items()}


LAG = "orders_event_loop_lag_seconds"


def loop_lag(url: str) -> dict[str, Any] | None:
    """The service's event-loop lag histogram (summed over its label sets), when /metrics
    has one: {"buckets": {le: cumulative count}, "sum": s, "count": n}."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    hist: dict[str, Any] = {"buckets": {}, "sum": 0.0, "count": 0.0}
    found = False
    for line in text.splitlines():
        if not line.startswith(LAG):
            continue
        name, value = re.split(r"[{ ]", line, maxsplit=1)[0], float(line.rsplit(" ", 1)[1])
        if name == LAG + "_bucket":
            le = re.search(r'le="([^"]+)"', line).group(1)  # type: ignore[union-attr]
            hist["buckets"][le] = hist["buckets"].get(le, 0.0) + value
            found = True
        elif name == LAG + "_sum":
            hist["sum"] += value
        elif name == LAG + "_count":
            hist["count"] += value
    return hist if found else None


def lag_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        "buckets": {le: after["buckets"][le] - before["buckets"].get(le, 0.0) for le in after["buckets"]},
        "sum": after["sum"] - before["sum"],
        "count": after["count"] - before["count"],
    }


def _pg_array(values: list[str]) -> str:
    quoted = ['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values]
    return "{" + ",".join(quoted) + "}"


def _sub(sql: str, mapping: dict[int, str]) -> str:
    """The service's SQL with each $n replaced by a pgbench variable (bind parameter) or expression."""
    return re.sub(r"\$(\d+)", lambda m: mapping[int(m.group(1))], sql.strip())


SKUS = "ARRAY['B' || :s1, 'B' || :s2]"


def pgbench_scripts(out: Path, sample: dict[str, Any]) -> tuple[Path, Path, list[str]]:
    """Two scripts: the order transaction, and the transaction plus the outbox delivery."""
    head = "\n".join(
        [
            f"\\set cid random(1, {NCUSTOMERS})",
            f"\\set s1 random({SKU_LO}, {SKU_LO + NSKUS // 2 - 1})",
            f"\\set s2 random({SKU_LO + NSKUS // 2}, {SKU_LO + NSKUS - 1})",
            "\\set key random(1, 9000000000000000000)",
        ]
    )
    names = "ARRAY['Bench product B' || :s1, 'Bench product B' || :s2]"
    # One call of orders_place() in autocommit, as the service makes it. $1 (the order id,
    # made by the service in Python) is gen_random_uuid(); $8 (the service's clock) is now().
    place = _sub(
        orders.PLACE_SQL,
        {
            1: "gen_random_uuid()",
            2: ":cid",
            3: ":cur",
            4: ":email",
            5: ":subtotal",
            6: ":total",
            7: ":ship",
            8: "now()",
            9: ":pos",
            10: SKUS,
            11: names,
            12: ":qty",
            13: ":prices",
            14: ":totals",
            15: ":evt",
            16: ":delay",
            17: ":kinds",
            18: ":topics",
            19: ":payloads",
            20: ":key",
            21: ":hash",
            22: ":resp",
            23: SKUS,
            24: ":qty",
            25: names,
            26: ":prices",
            27: "0",  # no pending cap, as the bench's service runs (its customers never pay)
            28: "NULL",  # no trace context: the service runs with tracing off
        },
    )
    tx = f"{head}\n{place};\n"
    # $3: the relay publishes order events, as the bench's service runs (ORDERS_NATS_URL
    # set with BENCH_EVENTS=1, else not).
    claim_ids = _sub(outbox.CLAIM_IDS_SQL, {1: ":outbox_ids", 2: ":lease", 3: "true" if EVENTS else "false"})
    # The service marks rows sent in batches (many orders per statement under load);
    # here, per order, as the unbatched worst case. The rows are in the order the service
    # writes them: email, audit, then the event (with events on).
    email_sent = _sub(outbox.EMAIL_SENT_SQL, {1: "ARRAY[(:outbox_ids::bigint[])[1]]"})
    audit_sent = _sub(outbox.AUDIT_SENT_SQL, {1: "ARRAY[(:outbox_ids::bigint[])[2]]"})
    delivery = [claim_ids, email_sent, audit_sent]
    if EVENTS:
        delivery.append(_sub(outbox.EVENT_SENT_SQL, {1: "ARRAY[(:outbox_ids::bigint[])[3]]"}))
    full = f"{head}\n{place} \\gset\n" + "".join(f"{sql};\n" for sql in delivery)
    tx_path, full_path = out / "pgbench-order-tx.sql", out / "pgbench-order-tx-outbox.sql"
    tx_path.write_text(tx)
    full_path.write_text(full)
    order = orjson.loads(sample["response_body"])
    variables = {
        "cur": "USD",
        "email": order["email"],
        "subtotal": str(order["subtotal"]),
        "total": str(order["total"]),
        "ship": orjson.dumps(order["shipping_address"]).decode(),
        "pos": "{0,1}",
        "qty": "{1,2}",
        "prices": f"{{{UNIT_PRICE},{UNIT_PRICE}}}",
        "totals": f"{{{UNIT_PRICE},{2 * UNIT_PRICE}}}",
        "evt": orjson.dumps({"status": "pending", "total": order["total"], "currency": "USD"}).decode(),
        "delay": "5.0",
        "kinds": "{email,audit,event}" if EVENTS else "{email,audit}",
        "topics": "{order.created,order.created,order.created}" if EVENTS else "{order.created,order.created}",
        "payloads": _pg_array(
            [sample["email_payload"], sample["audit_payload"], *([sample["event_payload"]] if EVENTS else [])]
        ),
        "hash": "\\x" + sample["request_hash"].hex(),
        "resp": "\\x" + sample["response_body"].hex(),
        "lease": "60.0",
    }
    return tx_path, full_path, [f"-D{k}={v}" for k, v in variables.items()]


def run_pgbench(
    script: Path,
    dsn: str,
    seconds: int,
    defines: list[str],
    out: Path,
    tag: str,
    parts: dict[str, Callable[[], float]],
) -> dict[str, Any]:
    u = urlsplit(dsn)
    base = [
        "pgbench",
        "-n",
        "-M",
        "prepared",
        "-c",
        str(CONNECTIONS),
        "-j",
        str(THREADS),
        "-h",
        u.hostname or "127.0.0.1",
        "-p",
        str(u.port or 5432),
        "-U",
        u.username or "postgres",
        *defines,
        "-f",
        str(script),
    ]
    dbname = u.path.lstrip("/")
    if WARMUP:
        subprocess.run([*base, "-T", str(WARMUP), dbname], capture_output=True, text=True, check=True)
    prefix = out / f"pgbench-{tag}"
    meter = CpuMeter(parts)
    code, stdout, stderr, pgbench_cpu = run_child(
        [*base, "-T", str(seconds), "-l", "--log-prefix", str(prefix), dbname], None, seconds + 120
    )
    cpu = {**meter.stop(), "load generator": pgbench_cpu}
    if code != 0:
        raise RuntimeError(f"pgbench failed:\n{stdout}\n{stderr}")
    tps = float(re.search(r"tps = ([\d.]+)", stdout).group(1))  # type: ignore[union-attr]
    failed = re.search(r"number of failed transactions: (\d+)", stdout)
    lat: list[float] = []
    for f in glob.glob(f"{prefix}.*"):
        for line in Path(f).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                lat.append(int(parts[2]) / 1000)
        os.unlink(f)
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) > 100 else [0.0] * 99
    return {
        "rps": tps,
        "requests": len(lat),
        "p50_ms": q[49],
        "p99_ms": q[98],
        "max_ms": lat[-1] if lat else 0.0,
        "non2xx": int(failed.group(1)) if failed else 0,
        "socket_errors": 0,
        "cpu_ms_per_request": per_request(cpu, len(lat)),
    }


# --------------------------------------------------------------------------- setup


async def seed_catalog(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.copy_records_to_table(
            "products",
            records=[
                (f"B{n}", f"Bench product B{n}", UNIT_PRICE, "USD", 1_000_000_000)
                for n in range(SKU_LO, SKU_LO + NSKUS)
            ],
            columns=["sku", "name", "unit_price", "currency", "stock"],
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def seed_orders(url: str, tokens: list[str], n: int) -> list[tuple[str, str]]:
    """n orders through the API (so that they are in the cache): (id, owner token)."""
    body = {
        "email": "buyer@example.com",
        "items": [{"sku": f"B{SKU_LO}", "quantity": 1}, {"sku": f"B{SKU_LO + NSKUS - 1}", "quantity": 2}],
        "shipping_address": {
            "name": "Ada Lovelace",
            "line1": "1 Main St",
            "line2": None,
            "city": "London",
            "postal_code": "N1 9GU",
            "country": "GB",
        },
    }
    sem = asyncio.Semaphore(16)
    out: list[tuple[str, str]] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def one(i: int) -> None:
            token = tokens[i % len(tokens)]
            async with sem:
                r = await client.post(
                    "/v1/orders",
                    json=body,
                    headers={"Authorization": f"Bearer {token}", "Idempotency-Key": f"seed-{i}"},
                )
            r.raise_for_status()
            out.append((r.json()["id"], token))

        await asyncio.gather(*(one(i) for i in range(n)))
    return out


async def sample_order(dsn: str) -> dict[str, Any]:
    """The parameter values of one real order, so that pgbench sends values of the same size."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        k = await conn.fetchrow("SELECT request_hash, response_body, order_id FROM idempotency_keys LIMIT 1")
        rows = await conn.fetch("SELECT kind, payload::text AS payload FROM outbox WHERE order_id = $1", k["order_id"])
    finally:
        await conn.close()
    payloads = {r["kind"]: r["payload"] for r in rows}
    return {
        "request_hash": bytes(k["request_hash"]),
        "response_body": bytes(k["response_body"]),
        "email_payload": payloads["email"],
        "audit_payload": payloads["audit"],
        "event_payload": payloads.get("event", ""),
    }


async def outbox_pending(dsn: str) -> int:
    for attempt in range(20):  # the machine's PostgreSQL is shared: it may be full for a moment
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
            break
        except (asyncpg.TooManyConnectionsError, OSError):
            if attempt == 19:
                raise
            await asyncio.sleep(0.5)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE status = 'pending'"))
    finally:
        await conn.close()


async def emails_sent(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE kind = 'email' AND status = 'sent'"))
    finally:
        await conn.close()


async def events_outbox(dsn: str) -> tuple[int, int]:
    """(order events the outbox marked sent, order events still pending)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'sent') AS sent,"
            " count(*) FILTER (WHERE status = 'pending') AS pending FROM outbox WHERE kind = 'event'"
        )
        return int(row["sent"]), int(row["pending"])
    finally:
        await conn.close()


async def stream_messages(url: str, stream: str) -> int:
    """The messages the JetStream stream holds (0 when the service never created it)."""
    import nats
    import nats.js.errors

    async with asyncio.timeout(30):
        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        try:
            try:
                info = await nc.jetstream(timeout=10).stream_info(stream)
            except nats.js.errors.NotFoundError:
                return 0
            return int(info.state.messages)
        finally:
            await nc.close()


def drain(dsn: str, timeout: float = 120) -> dict[str, Any]:
    """Wait for the service to deliver the outbox backlog of a run: the backlog (rows),
    the seconds it took, and what is still pending when `timeout` ran out."""
    start = time.monotonic()
    backlog = left = asyncio.run(outbox_pending(dsn))
    while left and time.monotonic() - start < timeout:
        time.sleep(0.25)
        left = asyncio.run(outbox_pending(dsn))
    return {"outbox_backlog": backlog, "drain_s": round(time.monotonic() - start, 2), "undelivered": left}


def profile(worker: int, seconds: int, out: Path, tag: str) -> subprocess.Popen[bytes]:
    raw = out / f"profile-{tag}.txt"
    return subprocess.Popen(
        [
            str(BIN / "py-spy"),
            "record",
            "--pid",
            str(worker),
            "--duration",
            str(seconds),
            "--rate",
            "200",
            "--nonblocking",
            "--gil",
            "--format",
            "raw",
            "-o",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


# --------------------------------------------------------------------------- main


def fmt_row(name: str, r: dict[str, Any]) -> str:
    return (
        f"| {name:<44} | {r['rps']:>9.0f} | {r['p50_ms']:>8.2f} | {r['p99_ms']:>8.2f} | {r['max_ms']:>8.1f} | "
        f"{r['non2xx']:>7} | {r['socket_errors']:>7} |"
    )


def check_emails(sink: PostfixSink | CountingSink, dsn: str, tag: str) -> dict[str, Any]:
    """Every email the service marked sent reached the sink (after the backlog went out):
    the sink's own count against the outbox, before pgbench writes "sent" rows of its own."""
    left = drain(dsn)["undelivered"]
    check = {"sink_received": sink.received(), "outbox_emails_sent": asyncio.run(emails_sent(dsn)), "pending": left}
    check["ok"] = check["sink_received"] >= check["outbox_emails_sent"] > 0 and not left
    log(
        f"{tag}: the sink received {check['sink_received']} messages; the outbox has "
        f"{check['outbox_emails_sent']} emails sent, {left} rows pending: {'OK' if check['ok'] else 'MISMATCH'}"
    )
    return check


def check_events(nats_url: str, stream: str, dsn: str, tag: str) -> dict[str, Any]:
    """After check_emails (the backlog delivered): the stream holds exactly the order events
    the outbox marked sent (JetStream dedups a re-publish by its Nats-Msg-Id, so more would
    be a duplicate and fewer a loss), and none is pending."""
    sent, pending = asyncio.run(events_outbox(dsn))
    check = {"stream_messages": asyncio.run(stream_messages(nats_url, stream)), "outbox_events_sent": sent}
    check["pending"] = pending
    check["ok"] = check["stream_messages"] == sent > 0 and not pending
    log(
        f"{tag}: the stream holds {check['stream_messages']} events; the outbox has {sent} events sent, "
        f"{pending} pending: {'OK' if check['ok'] else 'MISMATCH'}"
    )
    return check


def main() -> int:
    wrk = ensure_wrk()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = BENCH_DIR / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    dsn = with_database(ADMIN_DSN, DB_NAME)
    prefix = f"orders-bench-{secrets.token_hex(4)}:"
    secret = secrets.token_urlsafe(48)
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        log(f"WARNING: load average {load1:.2f} before the start: other processes compete for the 2 cores")
    log(
        f"results in {out}; {DURATION}s per run, {CONNECTIONS} connections, workers {WORKERS}, pool max {POOL_MAX}/worker"
    )
    execute(ADMIN_DSN, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    execute(ADMIN_DSN, f'CREATE DATABASE "{DB_NAME}"')
    sink, host, smtp_port = start_sink(out)
    log(f"SMTP sink: {sink.label} on {host}:{smtp_port}")
    # CPU is read from /proc: the whole PostgreSQL server and Redis server the bench uses
    # (other clients of theirs count too: run it on a quiet machine).
    machine: dict[str, Callable[[], float]] = {"smtp sink": sink.cpu}
    bus: EmbeddedNats | None = None
    if EVENTS:
        # A server of the bench's own (never the machine's 4222): its CPU is the events' alone.
        bus = EmbeddedNats(out / "tmp")
        try:
            bus.start()
        except BaseException:
            sink.stop()
            raise
        log(f"order events on: nats-server {bus.executable} ({bus.binaries_source}) on {bus.url}")
        machine["nats-server"] = lambda bus=bus: tree_cpu(bus.pid) if bus.pid else 0.0
    pg_pid, redis_pid = postgres_server_pid(dsn), redis_server_pid(REDIS_URL)
    for name, pid in (("postgres", pg_pid), ("redis", redis_pid)):
        if pid is None:
            log(f"{name} does not run on this machine (not in /proc): no CPU figure for it")
        else:
            machine[name] = lambda pid=pid: tree_cpu(pid)
    servers: list[Server] = []
    results: dict[str, Any] = {
        "config": {
            "duration_s": DURATION,
            "connections": CONNECTIONS,
            "workers": WORKERS,
            "pool_max_per_worker": POOL_MAX,
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg()[0],
            "smtp_sink": sink.label,
            "events": bus.url if bus is not None else None,
        },
        "runs": {},
        "emails": {},
        "events": {},
    }
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
        env.update(
            {
                "ORDERS_DATABASE_URL": dsn,
                "ORDERS_REDIS_URL": REDIS_URL,
                "ORDERS_CACHE_PREFIX": prefix,
                "ORDERS_SMTP_HOST": host,
                "ORDERS_SMTP_PORT": str(smtp_port),
                "ORDERS_JWT_SECRET": secret,
                "ORDERS_PAYMENT_WEBHOOK_SECRET": secrets.token_urlsafe(48),
                "ORDERS_DB_POOL_MIN": str(min(5, POOL_MAX)),
                "ORDERS_DB_POOL_MAX": str(POOL_MAX),
                "ORDERS_LOG_FORMAT": "json",
                "ORDERS_LOG_LEVEL": "info",
                "ORDERS_MIGRATE_ON_START": "false",
                # Random customers who never pay: the cap would refuse some of them over
                # the runs. Its bookkeeping (the customer's row, the triggers) still runs.
                "ORDERS_MAX_PENDING_ORDERS_PER_CUSTOMER": "0",
            }
        )
        if bus is not None:
            env["ORDERS_NATS_URL"] = bus.url
        subprocess.run([str(BIN / "orders"), "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        asyncio.run(seed_catalog(dsn))
        settings = Settings(_env_file=None, jwt_secret=secret, dev=True)  # type: ignore[call-arg]
        tokens = [mint(settings, str(n), ttl_s=7200) for n in range(1, NCUSTOMERS + 1)]
        (out / "tokens.txt").write_text("\n".join(tokens) + "\n")
        wrk_env = {
            "BENCH_DIR": str(BENCH_DIR),
            "BENCH_TOKENS": str(out / "tokens.txt"),
            "BENCH_SKU_LO": str(SKU_LO),
            "BENCH_SKU_MID": str(SKU_LO + NSKUS // 2),
            "BENCH_SKU_HI": str(SKU_LO + NSKUS - 1),
            "BENCH_ORDERS": str(out / "orders.txt"),
        }
        got: list[tuple[str, str]] = []
        for workers in WORKERS:
            tag = f"w{workers}"
            srv = Server(f"orders-{tag}", SERVE_ARGV, env, workers, out, "/readyz").start()
            servers.append(srv)
            parts = {"service": srv.cpu, **machine}
            rss_start = srv.rss_mib()
            if not got:
                got = asyncio.run(seed_orders(srv.url, tokens, NGET_ORDERS))
                (out / "orders.txt").write_text("".join(f"{i} {t}\n" for i, t in got))
            log(f"{tag}: orders serve up (pids {srv.worker_pids()}, RSS {rss_start} MiB)")
            run: dict[str, Any] = {"rss_start_mib": rss_start}
            if "create" in PHASES:
                run_wrk(wrk, "orders.lua", srv.url, WARMUP, {**wrk_env, "BENCH_RUN": f"{stamp}-{tag}-warm"})
                drain(dsn)  # the warm-up's deliveries stay out of the measured run's CPU
                create = run_wrk(
                    wrk,
                    "orders.lua",
                    srv.url,
                    DURATION,
                    {**wrk_env, "BENCH_RUN": f"{stamp}-{tag}"},
                    parts,
                    then=lambda: drain(dsn),
                    metrics_url=srv.url,
                )
                # What the service sustains: the run's orders over the run plus the time
                # their emails and audit entries took to go out after it.
                create["sustained_rps"] = create["requests"] / (create["requests"] / create["rps"] + create["drain_s"])
                log(
                    f"{tag}: POST /v1/orders {create['rps']:.0f}/s p99 {create['p99_ms']:.1f} ms, outbox backlog "
                    f"{create['outbox_backlog']} drained in {create['drain_s']} s: {create['sustained_rps']:.0f}/s sustained"
                )
                run["create"] = create
                # Latency below saturation: the same requests sent at a fixed rate,
                # PACE_SHARE of the sustained one (orders.lua schedules them), same
                # connections. Closed-loop at saturation, latency is only Little's law.
                target = PACE_SHARE * create["sustained_rps"]
                paced = run_wrk(
                    wrk,
                    "orders.lua",
                    srv.url,
                    DURATION,
                    {**wrk_env, "BENCH_RUN": f"{stamp}-{tag}-paced", "BENCH_RATE": f"{target:.1f}"},
                    parts,
                    then=lambda: drain(dsn),
                    metrics_url=srv.url,
                )
                paced["target_rps"] = target
                run["paced"] = paced
                log(
                    f"{tag}: POST /v1/orders at {target:.0f}/s: achieved {paced['rps']:.0f}/s, "
                    f"p50 {paced['p50_ms']:.1f} ms p99 {paced['p99_ms']:.1f} ms, backlog {paced['outbox_backlog']}"
                )
            if "get" in PHASES:
                run_wrk(wrk, "get_order.lua", srv.url, WARMUP, wrk_env)
                run["get"] = run_wrk(wrk, "get_order.lua", srv.url, DURATION, wrk_env, parts, metrics_url=srv.url)
                log(f"{tag}: cached GET {run['get']['rps']:.0f}/s")
            if PROFILE and workers == WORKERS[0]:
                worker = srv.worker_pids()[0]
                for what, script, extra in (
                    ("create", "orders.lua", {"BENCH_RUN": f"{stamp}-{tag}-prof"}),
                    ("get", "get_order.lua", {}),
                ):
                    if what not in PHASES:
                        continue
                    spy = profile(worker, DURATION - 2, out, f"{what}-{tag}")
                    time.sleep(1)
                    run_wrk(wrk, script, srv.url, DURATION, {**wrk_env, **extra})
                    spy.wait(timeout=60)
                    drain(dsn)
                    log(f"profile of {what} written: {out}/profile-{what}-{tag}.txt")
            run["rss_end_mib"] = srv.rss_mib()
            results["emails"][tag] = check_emails(sink, dsn, tag)
            if bus is not None:
                results["events"][tag] = check_events(bus.url, Settings.model_fields["nats_stream"].default, dsn, tag)
            srv.stop()
            if "getroute" in PHASES:
                # The A of the fast GET's A/B: the same reads, every one through the route.
                slow = Server(
                    f"orders-{tag}-route", SERVE_ARGV, {**env, "ORDERS_FAST_GET": "false"}, workers, out, "/readyz"
                ).start()
                servers.append(slow)
                slow_parts = {"service": slow.cpu, **machine}
                run_wrk(wrk, "get_order.lua", slow.url, WARMUP, wrk_env)
                run["getroute"] = run_wrk(wrk, "get_order.lua", slow.url, DURATION, wrk_env, slow_parts)
                log(f"{tag}: cached GET through the route (ORDERS_FAST_GET=false) {run['getroute']['rps']:.0f}/s")
                slow.stop()
            if PHASES & {"bare", "row"}:
                bare = Server(
                    f"bare-{tag}",
                    [sys.executable, str(BENCH_DIR / "bare_app.py")],
                    {**env, "PYTHONPATH": str(BENCH_DIR)},
                    workers,
                    out,
                    "/bare",
                ).start()
                servers.append(bare)
                bare_parts = {"service": bare.cpu, **machine}
                if "bare" in PHASES:
                    run_wrk(wrk, "bare.lua", bare.url + "/bare", WARMUP, wrk_env)
                    run["bare"] = run_wrk(wrk, "bare.lua", bare.url + "/bare", DURATION, wrk_env, bare_parts)
                    log(f"{tag}: bare {run['bare']['rps']:.0f}/s")
                if "row" in PHASES:
                    row_env = {**wrk_env, "BENCH_GET_PATH": "/bare/orders/"}
                    run_wrk(wrk, "get_order.lua", bare.url, WARMUP, row_env)
                    run["row"] = run_wrk(wrk, "get_order.lua", bare.url, DURATION, row_env, bare_parts)
                    log(f"{tag}: bare one-row asyncpg read {run['row']['rps']:.0f}/s")
                bare.stop()
            results["runs"][tag] = run
        if "pgbench" in PHASES:
            sample = asyncio.run(sample_order(dsn))
            tx, full, defines = pgbench_scripts(out, sample)
            log("pgbench: the order transaction")
            results["pgbench_tx"] = run_pgbench(tx, dsn, DURATION, defines, out, "tx", machine)
            log(f"pgbench tx {results['pgbench_tx']['rps']:.0f}/s; pgbench: transaction + outbox delivery")
            results["pgbench_full"] = run_pgbench(full, dsn, DURATION, defines, out, "full", machine)
    finally:
        for s in servers:
            s.stop()
        sink.stop()
        if bus is not None:
            bus.stop()
            shutil.rmtree(bus.store, ignore_errors=True)  # the events themselves; nats.log stays
        execute(ADMIN_DSN, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        forget_keys(REDIS_URL, prefix)
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    if PROFILE:
        for f in sorted(out.glob("profile-*.txt")):
            subprocess.run([sys.executable, str(BENCH_DIR / "profile_summary.py"), str(f)], check=False)
    return 0


def print_table(results: dict[str, Any]) -> None:
    c = results["config"]
    print(
        f"\n## make bench: {c['connections']} connections, {c['duration_s']} s per run, {c['cpus']} CPUs, "
        f"pool max {c['pool_max_per_worker']}/worker\n\nSMTP sink: {c['smtp_sink']}\n"
        + (f"Order events: on, published to the bench's nats-server ({c['events']})\n" if c.get("events") else "")
    )
    print(
        "| run                                          |     req/s |  p50 ms  |  p99 ms  |  max ms  | non-2xx | sockerr |"
    )
    print(
        "|----------------------------------------------|-----------|----------|----------|----------|---------|---------|"
    )
    tx, full = results.get("pgbench_tx"), results.get("pgbench_full")
    names = {
        "create": "POST /v1/orders",
        "paced": f"POST /v1/orders at {PACE_SHARE:.0%} of sustained",
        "get": "GET /v1/orders/{id} cached",
        "getroute": "GET /v1/orders/{id} cached, route only",
        "bare": "bare FastAPI GET",
        "row": "bare FastAPI one-row asyncpg read",
    }
    rows: list[tuple[str, dict[str, Any]]] = []
    for tag, r in results["runs"].items():
        rows += [(f"{label} ({tag})", r[what]) for what, label in names.items() if what in r]
    if tx and full:
        rows += [("pgbench: order transaction (ceiling a)", tx), ("pgbench: transaction + outbox delivery", full)]
    for name, r in rows:
        print(fmt_row(name, r))
    print(
        "\nCPU milliseconds per request, by process (all on the same cores; for POST, until its emails and"
        " audit entries (and order events, with events on) were delivered; postgres and redis: every process"
        " of their servers; load generator: wrk, or pgbench):\n"
    )
    # The nats-server column only when the bench ran one (BENCH_EVENTS=1).
    shown = [p for p in CPU_PARTS if p != "nats-server" or any(p in r["cpu_ms_per_request"] for _, r in rows)]
    print("| run | " + " | ".join(shown) + " | total |\n|---|" + "---:|" * (len(shown) + 1))
    for name, r in rows:
        cpu = r["cpu_ms_per_request"]
        cells = [f"{cpu[p]:.3f}" if p in cpu else "–" for p in shown]
        print(f"| {name} | " + " | ".join(cells) + f" | {sum(cpu.values()):.3f} |")
    print()
    for tag, r in results["runs"].items():
        parts = []
        if "create" in r:
            c = r["create"]
            print(
                f"{tag}: create left an outbox backlog of {c['outbox_backlog']} rows, delivered in {c['drain_s']} s"
                f" ({c['undelivered']} left): {c['sustained_rps']:.0f} orders/s sustained with their delivery"
            )
            if tx and full:
                parts += [
                    f"orders/pgbench(tx) = {c['rps'] / tx['rps']:.2f}",
                    f"sustained/pgbench(tx+outbox) = {c['sustained_rps'] / full['rps']:.2f}",
                ]
        if "paced" in r:
            p = r["paced"]
            share = p["rps"] / p["target_rps"] if p["target_rps"] else 0.0
            print(
                f"{tag}: paced run: target {p['target_rps']:.0f}/s, achieved {p['rps']:.0f}/s ({share:.0%})"
                + ("" if share >= 0.95 else ": SHORT OF THE TARGET, its p99 is not the one at that rate")
            )
        if "get" in r and "bare" in r:
            parts.append(f"cached GET/bare = {r['get']['rps'] / r['bare']['rps']:.2f}")
        if "get" in r and "row" in r:
            parts.append(f"cached GET/one-row asyncpg read = {r['get']['rps'] / r['row']['rps']:.2f}")
        if "getroute" in r and "bare" in r:
            parts.append(f"route-only GET/bare = {r['getroute']['rps'] / r['bare']['rps']:.2f}")
        parts.append(f"worker RSS MiB start {r['rss_start_mib']} -> end {r['rss_end_mib']}")
        print(f"{tag}: " + "   ".join(parts))
    for tag, e in results["emails"].items():
        print(
            f"{tag}: emails: the sink received {e['sink_received']}, the outbox marked {e['outbox_emails_sent']} sent"
            f" ({e['pending']} pending): {'OK' if e['ok'] else 'MISMATCH'}"
        )
    for tag, e in results.get("events", {}).items():
        print(
            f"{tag}: events: the stream holds {e['stream_messages']}, the outbox marked {e['outbox_events_sent']} sent"
            f" ({e['pending']} pending): {'OK' if e['ok'] else 'MISMATCH'}"
        )
    print_loop_lag(rows)


def print_loop_lag(rows: list[tuple[str, dict[str, Any]]]) -> None:
    lagged = [(name, r["loop_lag"]) for name, r in rows if "loop_lag" in r]
    if not lagged:
        print(f"\nEvent-loop lag: not measured (/metrics has no {LAG}).")
        return
    bounds = sorted((le for le in lagged[0][1]["buckets"] if le != "+Inf"), key=float)
    print("\nEvent-loop lag (orders_event_loop_lag_seconds over the run, all workers): samples above each bound\n")
    print(
        "| run | samples | mean ms | "
        + " | ".join(f"> {float(b) * 1000:g} ms" for b in bounds)
        + " |\n|---|---:|---:|"
        + "---:|" * len(bounds)
    )
    for name, lag in lagged:
        n = lag["count"]
        mean = 1000 * lag["sum"] / n if n else 0.0
        above = [f"{n - lag['buckets'].get(b, 0.0):.0f}" for b in bounds]
        print(f"| {name} | {n:.0f} | {mean:.2f} | " + " | ".join(above) + " |")


if __name__ == "__main__":
    sys.exit(main())

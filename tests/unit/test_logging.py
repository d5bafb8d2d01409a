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

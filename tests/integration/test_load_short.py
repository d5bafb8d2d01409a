"""A short locust run (infra/locust/locustfile.py) against a real `orders serve`.

Asserts only what must hold under load: every request answered as the contract says
(expected 409s are successes in the locustfile) and the invariants of the run (checked
by the locustfile in PostgreSQL: one order per key, stock conserved, every 201 stored; and
every order's events in NATS JetStream, once each, in version order).
Never timings.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orders.dev.nats import EmbeddedNats
from tests.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).with_name("locust")


@pytest.mark.slow
def test_short_checkout_load_keeps_the_invariants(base_env, tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ORDERS_", "LOAD_"))}
    nats_server = EmbeddedNats(tmp_path)
    # Order events on: the invariants include every order's events in the stream.
    env = {**clean, **base_env, "ORDERS_NATS_URL": nats_server.start()}
    server = ServerProcess(env, tmp_path)
    with server, nats_server:
        assert server.proc is not None
        url = server.url
        summary_path = tmp_path / "summary.json"
        run = subprocess.run(
            [
                str(LOCUST),
                "-f",
                str(ROOT / "infra/locust/locustfile.py"),
                "--headless",
                "--host",
                url,
                "-u",
                "6",
                "-r",
                "6",
                "-t",
                "5s",
                "--stop-timeout",
                "10",
                "--csv",
                str(tmp_path / "load"),
                "--only-summary",
                "--loglevel",
                "WARNING",
            ],
            env={
                **env,
                "LOAD_SUMMARY": str(summary_path),
                "LOAD_WAIT_MIN": "0.05",
                "LOAD_WAIT_MAX": "0.2",
                "LOAD_SCARCE_STOCK": "15",
                "LOAD_SERVER_PID": str(server.proc.pid),
            },
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        report = f"locust exit {run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
        assert summary_path.exists(), report
        summary = json.loads(summary_path.read_text())
        assert summary["invariants"]["violations"] == [], report
        with (tmp_path / "load_stats.csv").open() as f:
            total = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
        assert int(total["Request Count"]) > 50, report
        assert int(total["Failure Count"]) == 0, report
        assert summary["outcomes"].get("201 created", 0) > 0, report
        assert summary["invariants"]["checked"]["orders_acknowledged"] > 0, report
        assert summary["invariants"]["checked"]["events"] >= summary["invariants"]["checked"]["orders_in_db"], report
        assert run.returncode == 0, report
    assert server.proc.returncode == 0  # and the server stopped gracefully after the run

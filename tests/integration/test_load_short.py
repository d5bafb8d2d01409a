"""A short locust run (infra/locust/locustfile.py) against a real `orders serve`.

Asserts only what must hold under load: every request answered as the contract says
(expected 409s are successes in the locustfile) and the invariants of the run (checked
by the locustfile in PostgreSQL: one order per key, stock conserved, every 201 stored; and
every order's events in NATS JetStream, once each, in version order).
Never timings.

The run pays most orders through the signed webhook and abandons some, which the service
(ORDERS_PAYMENT_TIMEOUT_S=2) must expire; the order events are read from a nats-server of the test's own
(ORDERS_NATS_URL): one per version of every order, one order.paid per paid order.
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
WEBHOOK_SECRET = "test-only-payment-webhook-secret-0123456789"


@pytest.mark.slow
def test_short_checkout_load_keeps_the_invariants(base_env, tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ORDERS_", "LOAD_"))}
    with EmbeddedNats(tmp_path) as nats_server:
        run_load(clean, base_env, tmp_path, nats_server.url)


def run_load(clean: dict[str, str], base_env: dict[str, str], tmp_path: Path, nats_url: str) -> None:
    # The same payment and event settings for the service and the run (a service without
    # payments or events ignores them).
    shared = {
        "ORDERS_PAYMENT_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "ORDERS_PAYMENT_TIMEOUT_S": "2",
        "ORDERS_NATS_URL": nats_url,
    }
    server = ServerProcess({**base_env, **shared}, tmp_path)
    env = {**clean, **base_env, **shared}
    with server:
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
                "LOAD_ABANDON_RATE": "0.3",
                "LOAD_EVENTS_WAIT_S": "20",
            },
            capture_output=True,
            text=True,
            timeout=180,
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
        checked = summary["invariants"]["checked"]
        assert checked["orders_acknowledged"] > 0, report
        # Payments on exactly when the service has the webhook (LOAD_PAYMENTS=auto).
        assert summary["payments"] is True, report
        assert checked["paid_orders"] > 0 and checked["paid_answers"] > 0, report
        assert summary["outcomes"].get("payment duplicate", 0) > 0, report
        assert checked["expiry"].startswith("waited"), report
        assert 0 < checked["abandoned_cancelled"] == checked["abandoned"], report
        assert checked["events"]["checked"], report
        assert checked["events"]["events"] >= checked["orders_in_db"], report
        assert checked["events"]["order_paid_events"] == checked["paid_orders"], report
        assert run.returncode == 0, report
    assert server.proc.returncode == 0  # and the server stopped gracefully after the run

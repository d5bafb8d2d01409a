"""A short locust run (infra/locust/locustfile.py) against a real `orders serve`.

Asserts only what must hold under load: every request answered as the contract says
(expected 409s are successes in the locustfile) and the invariants of the run (checked
by the locustfile in PostgreSQL: one order per key, stock conserved, every 201 stored).
Never timings.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from orders.devservers import free_port

ROOT = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).with_name("locust")


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not ready in {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL (of the whole process group) if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.slow
def test_short_checkout_load_keeps_the_invariants(base_env, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ORDERS_", "LOAD_"))}
    env = {**clean, **base_env, "ORDERS_HOST": "127.0.0.1", "ORDERS_PORT": str(port)}
    server_log = tmp_path / "server.log"
    with server_log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "orders", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
    try:
        _wait_ready(server, url, server_log)
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
                "LOAD_SERVER_PID": str(server.pid),
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
        assert run.returncode == 0, report
    finally:
        _stop(server)
    assert server.returncode is not None

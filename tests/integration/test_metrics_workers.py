"""/metrics with ORDERS_WORKERS > 1 (docs/API.md, Operations): every scrape answers for
all the workers, whichever one takes it; a worker that is gone leaves its counts in the
totals and its live gauges out; a previous run's files never count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_until
from tests.server import ServerProcess

pytestmark = pytest.mark.slow

HEALTHZ = {"method": "GET", "route": "/healthz", "status": "200"}
# Two workers that serve only probes need few connections (PostgreSQL is shared).
SMALL_POOLS = {"ORDERS_DB_POOL_MIN": "1", "ORDERS_DB_POOL_MAX": "2"}


def _sample(text: str, name: str, labels: dict[str, str] | None = None) -> list[float]:
    return [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and (labels is None or s.labels == labels)
    ]


def _healthz_count(text: str) -> float:
    values = _sample(text, "orders_http_requests_total", HEALTHZ)
    return values[0] if values else 0.0


def _scrape(url: str) -> str:
    r = httpx.get(url + "/metrics", timeout=10)  # a new connection each time: any worker may answer
    assert r.status_code == 200
    return r.text


def _healthz_by_worker(directory: Path) -> dict[int, float]:
    """What each worker's own counter file holds for GET /healthz."""
    return {
        int(path.stem.split("_")[1]): sum(
            s.value
            for m in MultiProcessCollector.merge([str(path)])
            for s in m.samples
            if s.name == "orders_http_requests_total" and s.labels == HEALTHZ
        )
        for path in directory.glob("counter_*.db")
    }


def _pool_size_in_files(directory: Path) -> float:
    """orders_db_pool_size over the live workers, read from their files (no scrape)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return registry.get_sample_value("orders_db_pool_size") or 0.0


def _worker_pids(directory: Path, server: ServerProcess) -> set[int]:
    """The processes with live gauges, less the supervisor (if it imported the metrics)."""
    assert server.proc is not None
    return {int(p.stem.rsplit("_", 1)[1]) for p in directory.glob("gauge_livesum_*.db")} - {server.proc.pid}


def test_every_scrape_counts_the_requests_of_all_workers(base_env, isolated_db, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # TMPDIR: where `orders serve` makes its private metrics directory (then removes it).
    server = ServerProcess(base_env, tmp_path, ORDERS_DATABASE_URL=isolated_db, ORDERS_WORKERS="2", TMPDIR=str(tmp),
                           **SMALL_POOLS)
    with server:
        (directory,) = wait_until(lambda: list(tmp.glob("orders-metrics-*")), timeout=30, what="the metrics directory")
        wait_until(lambda: len(_worker_pids(directory, server)) == 2, timeout=30, what="two workers")
        # Each worker samples its own pool (at least one connection each), scraped or not.
        wait_until(lambda: _pool_size_in_files(directory) >= 2, timeout=30, what="both workers' pool gauges")
        before = _healthz_count(_scrape(server.url))
        total = 80
        # A new connection for each request, so that both workers take some.
        for _ in range(total):
            assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        by_worker = _healthz_by_worker(directory)
        assert len([n for n in by_worker.values() if n > 0]) == 2, f"one worker took every request: {by_worker}"
        for _ in range(10):
            assert _healthz_count(_scrape(server.url)) == before + total

        # A worker that dies: its counts stay in the totals, its live gauges leave.
        victim = min(_worker_pids(directory, server))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in _worker_pids(directory, server) and len(_worker_pids(directory, server)) == 2,
                   timeout=30, what="the dead worker forgotten and replaced")
        texts = [_scrape(server.url) for _ in range(5)]
        assert all(_healthz_count(t) == before + total for t in texts)
        # One series per gauge (the sum over the live workers, or the latest reading of
        # the shared outbox), not one per process.
        for gauge in ("orders_db_pool_size", "orders_db_pool_in_use", "orders_notifications_pending",
                      "orders_relay_lag_seconds"):
            assert all(len(_sample(t, gauge)) == 1 for t in texts), gauge
    assert not directory.exists(), "the private metrics directory is removed at exit"


def test_a_given_directory_is_emptied_of_a_previous_run(base_env, isolated_db, tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir()
    # A previous run's counts, written the way a worker writes them.
    subprocess.run(
        [sys.executable, "-c", "from orders.observability import REQUESTS; REQUESTS.labels('GET', '/healthz', 200).inc(1000)"],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}, check=True, timeout=60,
    )
    assert list(directory.glob("counter_*.db"))
    server = ServerProcess(base_env, tmp_path, ORDERS_DATABASE_URL=isolated_db, ORDERS_WORKERS="2",
                           PROMETHEUS_MULTIPROC_DIR=str(directory), **SMALL_POOLS)
    with server:
        for _ in range(3):
            assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        assert _healthz_count(_scrape(server.url)) == 3
    assert directory.exists(), "a directory the operator named is kept"

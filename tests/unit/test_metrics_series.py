"""Series that the alerts (k8s/monitoring/prometheusrule.yaml) count with increase() exist at 0
from the start of every process: a series that first appears at 1 hides that first event
from increase(), so the first notification given up after a restart would never alert."""

from __future__ import annotations

import os
import subprocess
import sys


def test_notification_counters_are_exposed_at_zero_before_any_delivery():
    env = {k: v for k, v in os.environ.items() if k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run(
        [sys.executable, "-c", "import sys, orders.observability as o; sys.stdout.write(o.metrics_text().decode())"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    for kind in ("email", "audit", "event"):
        assert f'orders_notifications_sent_total{{kind="{kind}"}} 0.0' in out, out
        for final in ("true", "false"):
            assert f'orders_notifications_failed_total{{final="{final}",kind="{kind}"}} 0.0' in out, out

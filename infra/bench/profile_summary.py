"""Summarise a py-spy raw profile (collapsed stacks: "frame;frame;... count").

    python infra/bench/profile_summary.py infra/bench/results/<stamp>/profile-create-w1.txt

Prints the share of samples (on-CPU time of the sampled process; py-spy leaves idle
threads out unless --idle) by package, self and inclusive, the top functions by self
time, and the inclusive share of a few functions of interest.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")
INTEREST = [  # (label, regex on one frame "Qualified.name (path/file.py:line)")
    ("request handling (RequestContext and all below)", r"^RequestContext\.__call__ \(.*orders/observability\.py"),
    ("JWT verify (TokenVerifier.verify)", r"^TokenVerifier\.verify \("),
    ("FastAPI dependency solving", r"^solve_dependencies \("),
    ("sync dependency in threadpool (run_in_threadpool)", r"^run_in_threadpool \("),
    ("body parse + pydantic validation", r"^(parse_json|validate) \(.*orders/body\.py"),
    ("service.place_order", r"^place_order \(.*orders/service/orders\.py"),
    ("  price list (a miss reads the catalog)", r"^PriceList\.terms \("),
    ("  DB: orders_place(), the one round trip", r"^place \(.*orders/db/orders\.py"),
    ("  rate limiter (Redis)", r"^RateLimiter\.check \("),
    ("  cache write-through (Redis)", r"^Cache\.apply \("),
    ("service.get_order", r"^get_order \(.*orders/service/orders\.py"),
    ("  cache read (Redis)", r"^Cache\.get \("),
    ("access log line (structlog)", r"^BoundLoggerFilteringAtInfo\.info|^PrintLogger\.msg|^_proxy_to_logger"),
    ("prometheus labels/observe", r"prometheus_client"),
    ("asyncpg pool acquire/release", r"^(Pool|PoolConnectionHolder)\.(acquire|release|_acquire)"),
    (
        "outbox delivery in the worker (relay.py, all below)",
        r"^Relay\.(_deliver|_deliver_ids|run_once|_deliver_all) \(",
    ),
    ("  email rendering (email package)", r"^render \(.*orders/notify/email\.py"),
    ("  SMTP exchange (aiosmtplib)", r"^Mailer\.send \("),
]


ROOT = str(Path(__file__).resolve().parents[2]) + "/"


def package(file: str) -> str:
    if "site-packages/" in file:
        rest = file.split("site-packages/", 1)[1]
        return rest.split("/", 1)[0].removesuffix(".py")
    if "/orders/" in file or file.startswith("orders/"):
        tail = file.split("orders/", 1)[1]
        return "orders/" + tail
    if "/lib/python3" in file:
        rest = file.split("/lib/python3", 1)[1].split("/", 1)[-1]
        return "stdlib:" + rest.split("/", 1)[0].removesuffix(".py")
    return file or "?"


def main(path: str, top: int = 25) -> None:
    stacks: list[tuple[list[str], int]] = []
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    total = sum(c for _, c in stacks) or 1
    self_fn: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    incl_pkg: Counter[str] = Counter()
    incl_interest: Counter[str] = Counter()
    for frames, count in stacks:
        leaf = frames[-1]
        m = FRAME.match(leaf)
        file = m.group("file") if m else leaf
        self_fn[leaf] += count
        self_pkg[package(file)] += count
        seen = set()
        for f in frames:
            m = FRAME.match(f)
            seen.add(package(m.group("file") if m else f))
        for p in seen:
            incl_pkg[p] += count
        for name, needle in INTEREST:
            if any(re.search(needle, f) for f in frames):
                incl_interest[name] += count
    print(f"\n### {Path(path).name}: {total} samples\n")
    print("| package / module | self % | inclusive % |\n|---|---:|---:|")
    for pkg, n in self_pkg.most_common(18):
        print(f"| {pkg} | {100 * n / total:.1f} | {100 * incl_pkg[pkg] / total:.1f} |")
    print("\n| of interest (inclusive) | % |\n|---|---:|")
    for name, _ in INTEREST:
        print(f"| {name} | {100 * incl_interest[name] / total:.1f} |")
    print(f"\n| top {top} functions by self time | self % |\n|---|---:|")
    for fn, n in self_fn.most_common(top):
        short = re.sub(r"/[^ ]*site-packages/", "", fn)
        short = re.sub(r"/[^ ]*/lib/python3\.\d+/", "", short)
        short = short.replace(ROOT, "")
        print(f"| {short} | {100 * n / total:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)

"""The checks of .ci/image that are easier in Python, run from the host (the repo's .venv).

    check.py contents INVENTORY.json       judge what the image holds (the inventory
                                           .ci/image takes inside it): no dev module, no
                                           dev-only distribution, no pip, no build config
    check.py logs CTR.LOG                  every line the server wrote, as the container runtime
                                           recorded it, is whole and one JSON object, none at
                                           level error or critical
    check.py ready URL                     wait for /readyz (200, "ready")
    check.py order URL SKU MAILDIR         PUT a product (admin), place one order, read it
                                           back, and wait for its email in the SMTP sink
    check.py stop-under-load URL SKU DSN STOP-COMMAND...
                                           GETs and POSTs from several clients, one POST held
                                           inside the server (its stock update waits on a row
                                           lock), then STOP-COMMAND (podman stop) while all of
                                           it is in flight

Tokens are minted with $ORDERS_JWT_SECRET, the secret the container was given. Each
command prints what it saw and exits non-zero on any broken promise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import json
import os
import re
import sys
import time
import tomllib
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import httpx
import jwt

# Development tooling that must never be in the image (docs/DEPLOYMENT.md).
DEV_MODULES = ("orders.dev", "orders.devservers")
BUILD_TOOLS = {"pip", "setuptools", "wheel"}


def token(sub: str, *, admin: bool = False) -> str:
    claims: dict[str, object] = {"sub": sub, "exp": int(time.time()) + 3600}
    if admin:
        claims["roles"] = ["admin"]
    return jwt.encode(claims, os.environ["ORDERS_JWT_SECRET"], algorithm="HS256")


def auth(sub: str, *, admin: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, admin=admin)}"}


def order_body(sku: str, email_to: str) -> dict[str, object]:
    return {
        "email": email_to,
        "items": [{"sku": sku, "quantity": 1}],
        "shipping_address": {
            "name": "Ada Lovelace",
            "line1": "1 Main St",
            "city": "London",
            "postal_code": "N1 9GU",
            "country": "GB",
        },
    }


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement ("uvicorn[standard]>=0.50" -> "uvicorn")."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def contents(inventory_path: Path, pyproject_path: Path) -> None:
    inv = json.loads(inventory_path.read_text())
    project = tomllib.loads(pyproject_path.read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    dev_only = {_name(r) for r in project["optional-dependencies"]["dev"]} - runtime
    modules, dists = inv["modules"], {_name(d) for d in inv["distributions"]}
    print(
        f"python {inv['python']} ({inv['executable']}), {len(modules)} modules in orders, "
        f"{len(dists)} distributions: {', '.join(sorted(dists))}"
    )
    problems = []
    dev = [m for m in modules if any(m == d or m.startswith(d + ".") for d in DEV_MODULES)]
    if dev:
        problems.append(f"dev modules in the image: {', '.join(dev)}")
    if dists & dev_only:
        problems.append(f"dev-only distributions in the image: {', '.join(sorted(dists & dev_only))}")
    if dists & BUILD_TOOLS:
        problems.append(f"build tools in the image's venv: {', '.join(sorted(dists & BUILD_TOOLS))}")
    if inv["leftovers"]:
        problems.append(f"build-time configuration left in the image: {inv['leftovers']}")
    if "orders.app" not in modules or "orders.cli" not in modules:
        problems.append("the orders package is incomplete: no orders.app or orders.cli")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"no dev module ({', '.join(DEV_MODULES)}), no dev-only distribution, no pip, no build-time config")


def logs(path: Path) -> None:
    """The container's log as the runtime recorded it (podman's k8s-file driver writes the
    CRI format that CRI-O and the kubelet keep on a node: `TIME STREAM P|F TEXT`, where
    P marks a partial line). Every record must be a whole line holding one JSON object."""
    records = path.read_text(encoding="utf-8", errors="replace").splitlines()
    problems = []
    for n, record in enumerate(records, 1):
        _, stream, tag, text = [*record.split(" ", 3), "", "", ""][:4]
        if tag != "F":
            problems.append(f"record {n} is a partial line ({stream} {tag}): {text[:200]!r}")
            continue
        try:
            line = json.loads(text)
            if not isinstance(line, dict):
                raise ValueError
        except ValueError:
            problems.append(f"record {n} ({stream}) is not one JSON object: {text[:200]!r}")
            continue
        if line.get("level") in ("error", "critical") or "Traceback" in str(line.get("event")):
            problems.append(f"record {n}: {text[:300]}")
    for p in problems[:20]:
        print(f"FAIL: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"server log: {len(records)} lines, each whole and one JSON object, none at level error or critical")


def ready(url: str, timeout: float) -> None:
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < timeout:
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            last = f"{r.status_code} {r.text}"
            if r.status_code == 200 and r.json().get("status") == "ready":
                print(f"ready after {time.monotonic() - started:.1f} s: {r.text}")
                return
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    fail(f"/readyz not ready within {timeout:.0f} s (last: {last})")


def order(url: str, sku: str, maildir: Path) -> None:
    with httpx.Client(base_url=url, timeout=10) as c:
        r = c.put(
            f"/v1/products/{sku}",
            headers=auth("ci-admin", admin=True),
            json={"name": "CI mug", "unit_price": 1299, "currency": "USD", "stock": 100_000},
        )
        if r.status_code not in (200, 201):
            fail(f"PUT /v1/products/{sku}: {r.status_code} {r.text}")
        r = c.post(
            "/v1/orders",
            headers={**auth("ci-customer"), "Idempotency-Key": uuid.uuid4().hex},
            json=order_body(sku, "ci-buyer@example.com"),
        )
        if r.status_code != 201:
            fail(f"POST /v1/orders: {r.status_code} {r.text}")
        placed = r.json()
        r = c.get(f"/v1/orders/{placed['id']}", headers=auth("ci-customer"))
        if r.status_code != 200 or r.json() != placed:
            fail(f"GET /v1/orders/{placed['id']}: {r.status_code} {r.text}")
    print(f"order {placed['id']} placed: {placed['status']}, total {placed['total']} {placed['currency']}")

    # The confirmation email, through the service's SMTP client, into the sink's Maildir.
    wanted = f"<order-{placed['id']}.created@orders>"
    started = time.monotonic()
    while time.monotonic() - started < 30:
        for path in (maildir / "new").glob("*"):
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            if msg["Message-ID"] == wanted:
                text = msg.get_body(("plain",))
                if msg["To"] != "ci-buyer@example.com" or text is None or placed["id"] not in text.get_content():
                    fail(f"the confirmation email is not the order's: To {msg['To']}, text {text}")
                print(
                    f"confirmation email delivered to the SMTP sink after {time.monotonic() - started:.1f} s: "
                    f"{msg['Subject']!r}"
                )
                return
        time.sleep(0.2)
    fail(f"no email with Message-ID {wanted} in {maildir} within 30 s")


async def stop_under_load(url: str, sku: str, dsn: str, stop_command: list[str], clients: int = 8) -> None:
    done = asyncio.Event()  # the stop command has returned
    stop_sent = asyncio.Event()
    refused = asyncio.Event()  # a new connection was refused after the stop: the listener is closed
    held = asyncio.Event()  # the held POST waits on its row lock inside the server
    released: list[float] = []  # when the lock was released
    warm = asyncio.Event()  # 200 requests answered
    results: list[tuple[str, float, float, int | str]] = []  # (what, start, end, status or error)
    created: list[str] = []

    async def client_loop(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            i = 0
            while not done.is_set():
                start = time.monotonic()
                kind = ("GET product", "GET order", "POST order")[i % 3] if created else "POST order"
                try:
                    if kind == "GET product":
                        r = await c.get(f"/v1/products/{sku}")
                    elif kind == "GET order":
                        r = await c.get(f"/v1/orders/{created[n % len(created)]}", headers=auth("ci-admin", admin=True))
                    else:
                        customer = f"ci-load-{n}-{i}"  # one order each: the rate limit stays out of it
                        r = await c.post(
                            "/v1/orders",
                            headers={**auth(customer), "Idempotency-Key": uuid.uuid4().hex},
                            json=order_body(sku, f"{customer}@example.com"),
                        )
                        if r.status_code == 201:
                            created.append(r.json()["id"])
                    results.append((kind, start, time.monotonic(), r.status_code))
                    if len(results) >= 200:
                        warm.set()
                except httpx.HTTPError as exc:
                    results.append((kind, start, time.monotonic(), type(exc).__name__))
                    if stop_sent.is_set() and isinstance(exc, httpx.ConnectError):
                        refused.set()
                    await asyncio.sleep(0.05)
                i += 1

    async def held_post() -> int | str:
        """A POST under way through SIGTERM: its stock update waits on a row lock that this
        checker holds until the server has closed its listening socket, then it must end
        in 201 like any request the server had started."""
        held_sku = f"{sku}-HELD"  # its own product: the other clients never wait on the lock
        lock = await asyncpg.connect(dsn, timeout=10)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                r = await c.put(
                    f"/v1/products/{held_sku}",
                    headers=auth("ci-admin", admin=True),
                    json={"name": "CI held mug", "unit_price": 1299, "currency": "USD", "stock": 10},
                )
                if r.status_code not in (200, 201):
                    return f"PUT {held_sku}: {r.status_code}"
                async with lock.transaction():
                    await lock.execute("SELECT 1 FROM products WHERE sku = $1 FOR UPDATE", held_sku)
                    post = asyncio.create_task(
                        c.post(
                            "/v1/orders",
                            headers={**auth("ci-held"), "Idempotency-Key": uuid.uuid4().hex},
                            json=order_body(held_sku, "ci-held@example.com"),
                        )
                    )
                    waiting_sql = (
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                    )
                    for _ in range(100):
                        if await lock.fetchval(waiting_sql) or post.done():
                            break
                        await asyncio.sleep(0.05)
                    if post.done():
                        return f"answered before the stop: {post.result().status_code}"
                    held.set()
                    await asyncio.wait_for(refused.wait(), timeout=20)
                    released.append(time.monotonic())
                r = await post  # the lock is released: the order goes through
                if r.status_code == 201:
                    created.append(r.json()["id"])
                return r.status_code
        except (TimeoutError, httpx.HTTPError) as exc:
            return type(exc).__name__
        finally:
            held.set()
            await lock.close()

    loops = [asyncio.create_task(client_loop(n)) for n in range(clients)]
    with contextlib.suppress(TimeoutError):  # every client on its keep-alive connection
        await asyncio.wait_for(warm.wait(), timeout=30)
    held_task = asyncio.create_task(held_post())
    await held.wait()
    t_stop = time.monotonic()
    # Set before the stop starts: the listener can close before this task runs again, and a
    # refusal seen then must count (else the held POST waits for one that never comes).
    stop_sent.set()
    proc = await asyncio.create_subprocess_exec(*stop_command, stdout=asyncio.subprocess.DEVNULL)
    stop_rc = await proc.wait()
    stop_s = time.monotonic() - t_stop
    done.set()
    await asyncio.gather(*loops)
    held_status = await held_task

    statuses = Counter(s for *_, s in results)
    during = Counter(s for _, start, end, s in results if end > t_stop)
    in_flight = sum(1 for _, start, end, s in results if start < t_stop < end and isinstance(s, int))
    print(f"stop command {' '.join(stop_command)!r}: exit {stop_rc} after {stop_s:.1f} s")
    print(f"requests: {len(results)} in all: {dict(statuses)}")
    print(f"  finished after the stop began: {dict(during)}; in flight at that moment and answered: {in_flight}")
    held_for = f" (lock released {released[0] - t_stop:.1f} s after the stop began)" if released else ""
    print(f"  POST held inside the server through SIGTERM: {held_status}{held_for}")

    problems = []
    if stop_rc != 0:
        problems.append(f"the stop command exited {stop_rc}")
    bad = {s: n for s, n in statuses.items() if isinstance(s, int) and s >= 500 and s != 503}
    if bad:
        problems.append(f"5xx other than 503: {bad}")
    client_errors = {s: n for s, n in statuses.items() if isinstance(s, int) and 400 <= s < 500}
    if client_errors:
        problems.append(f"4xx answers: {client_errors}")
    if not refused.is_set():
        problems.append("no new connection was refused after the stop: the server never stopped listening")
    if held_status != 201:
        problems.append(f"the POST under way through SIGTERM got {held_status}, not 201")

    # Nothing accepted is lost: every 201 is a committed order.
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM orders WHERE id = ANY($1::uuid[])", created)
    finally:
        await conn.close()
    print(f"orders answered 201 under load: {len(created)}, of which in the database: {stored}")
    if stored != len(created):
        problems.append(f"{len(created) - stored} orders answered 201 are not in the database")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("contents")
    p.add_argument("inventory", type=Path)
    p.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    p = sub.add_parser("logs")
    p.add_argument("logfile", type=Path)
    p = sub.add_parser("ready")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=90)
    p = sub.add_parser("order")
    p.add_argument("url")
    p.add_argument("sku")
    p.add_argument("maildir", type=Path)
    p = sub.add_parser("stop-under-load")
    p.add_argument("url")
    p.add_argument("sku")
    p.add_argument("dsn")
    p.add_argument("stop_command", nargs="+")
    args = parser.parse_args()
    if args.command == "contents":
        contents(args.inventory, args.pyproject)
    elif args.command == "logs":
        logs(args.logfile)
    elif args.command == "ready":
        ready(args.url, args.timeout)
    elif args.command == "order":
        order(args.url, args.sku, args.maildir)
    else:
        asyncio.run(stop_under_load(args.url, args.sku, args.dsn, args.stop_command))


if __name__ == "__main__":
    main()

"""The invariants a load run must leave intact, checked in PostgreSQL after the run.

Run by infra/locust/locustfile.py at the end of a run (in a subprocess: asyncpg runs in
plain asyncio, away from locust's gevent), with the run's ledger as JSON on stdin:

    {"customer_prefix": "load-<run>-", "skus": {"<sku>": <initial stock>, ...},
     "created": {"<order id>": "<customer>", ...},          every order answered 201
     "keys_sent": [["<customer>", "<key>"], ...],            every key sent (any outcome)
     "key_orders": [["<customer>", "<key>", ["<id>", ...]], ...],  ids answered per key
     "cancelled": ["<order id>", ...],                       cancels answered 200
     "payments": true, "started_at": <unix time of the start>,
     "paid": {"<order id>": <number of `paid` answers>, ...},
     "refund_required": ["<order id>", ...], "abandoned": ["<order id>", ...]}

Prints {"violations": [...], "checked": {...}} as JSON; exits 1 when a violation was found.
Needs ORDERS_DATABASE_URL. Before the checks, in a run with payments (a service with the
payment webhook also expires unpaid orders), when the service's ORDERS_PAYMENT_TIMEOUT_S
(default 900) plus a grace of a few seconds fits in LOAD_EXPIRY_WAIT_S (default 120), it
waits until no order of the run is pending any more (bounded by that timeout and grace:
every order was placed before the wait began), so that the checks see the expiry done.

1. No order was created twice for one key: every order of the run's customers has its
   idempotency record, no (customer, key) maps to more than one order (in the database
   and in the answers the clients got), and every key in the database is one a client sent.
2. Stock is conserved: for every SKU the run created, stock + the quantities of its
   non-cancelled orders = the stock it was created with.
3. Every order that got a 201 exists, with its customer; every order whose cancel got a
   200 is cancelled.
4. Each customer's count of pending orders (customer_pending, for the pending cap) is the
   number of their orders that are pending.
5. With payments: unpaid orders expire: no order is pending longer than ORDERS_PAYMENT_TIMEOUT_S plus the
   grace; every abandoned order (never paid nor cancelled by a client) is cancelled, once
   the wait above ran; with 2., the stock of expired orders came back exactly once.
6. No order is both paid and cancelled: the run never cancels an order it paid, so a
   timeline with a change to paid (an event whose data has "to": "paid") and an
   order.cancelled, or a status paid with an order.cancelled, or cancelled with a change
   to paid, is a payment and a cancellation (expiry) that both won. Every order answered
   `paid` is paid and was answered `paid` once (each event takes effect once: redeliveries
   answer `duplicate`); every order answered `refund_required` is cancelled.
7. With ORDERS_NATS_URL set (the service publishes order events): once the outbox has
   published them, every order of the run has in the stream (ORDERS_NATS_STREAM) exactly one
   event per version, 1 to its current one, in that order, the last one showing its current
   status: one `order.created` each, exactly one `order.paid` per paid order and none for an
   order never paid, none lost, none twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import asyncpg
import nats
import nats.js.errors

# An order expires "at most a few seconds after its deadline" (docs/API.md).
EXPIRY_GRACE_S = 5.0


async def wait_for_expiry(conn: asyncpg.Connection, prefix: str, timeout_s: float, bound_s: float) -> str:
    """Waits until no order of the run is pending, at most timeout + grace (all of them were
    placed before this began). Returns what was done, for the summary."""
    if timeout_s + EXPIRY_GRACE_S > bound_s:
        return f"not waited for: ORDERS_PAYMENT_TIMEOUT_S={timeout_s:g} is longer than LOAD_EXPIRY_WAIT_S={bound_s:g}"
    started = time.monotonic()
    deadline = started + timeout_s + EXPIRY_GRACE_S + 1
    while True:
        pending = await conn.fetchval(
            "SELECT count(*) FROM orders WHERE customer_id LIKE $1 AND status = 'pending'", prefix
        )
        if pending == 0 or time.monotonic() >= deadline:
            return f"waited {time.monotonic() - started:.1f} s, {pending} order(s) still pending"
        await asyncio.sleep(0.5)


async def check(dsn: str, ledger: dict[str, Any]) -> dict[str, Any]:
    violations: list[str] = []
    prefix = ledger["customer_prefix"].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    timeout_s = float(os.environ.get("ORDERS_PAYMENT_TIMEOUT_S", "900"))
    bound_s = float(os.environ.get("LOAD_EXPIRY_WAIT_S", "120"))
    payments = bool(ledger.get("payments"))
    expiry_waited = payments and timeout_s + EXPIRY_GRACE_S <= bound_s
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        expiry = "not checked: no payments in this run"
        if payments:
            expiry = await wait_for_expiry(conn, prefix, timeout_s, bound_s)
        async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot for all checks
            rows = await conn.fetch("SELECT id, customer_id, status, version FROM orders WHERE customer_id LIKE $1", prefix)
            orders = {str(r["id"]): (r["customer_id"], r["status"]) for r in rows}
            versions = {str(r["id"]): r["version"] for r in rows}
            keys = await conn.fetch(
                "SELECT customer_id, key, order_id, status_code FROM idempotency_keys WHERE customer_id LIKE $1", prefix
            )
            stock = await conn.fetch(
                """
                SELECT p.sku, p.stock,
                       coalesce((SELECT sum(i.quantity) FROM order_items i JOIN orders o ON o.id = i.order_id
                                  WHERE i.sku = p.sku AND o.status <> 'cancelled'), 0)::bigint AS reserved
                  FROM products p WHERE p.sku = ANY($1::text[])
                """,
                list(ledger["skus"]),
            )
            counted = {
                r["customer_id"]: r["pending"]
                for r in await conn.fetch(
                    "SELECT customer_id, pending FROM customer_pending WHERE customer_id LIKE $1 AND pending > 0",
                    prefix,
                )
            }
            overdue = await conn.fetch(
                """
                SELECT id, extract(epoch FROM now() - created_at)::float8 AS age FROM orders
                 WHERE $3 AND customer_id LIKE $1 AND status = 'pending'
                   AND created_at < now() - make_interval(secs => $2)
                """,
                prefix,
                timeout_s + EXPIRY_GRACE_S,
                payments,
            )
            timelines = {
                str(r["order_id"]): r
                for r in await conn.fetch(
                    """
                    SELECT e.order_id,
                           bool_or(e.data->>'to' = 'paid') AS to_paid,
                           bool_or(e.type = 'order.cancelled') AS cancelled,
                           bool_or(e.type = 'order.cancelled' AND e.data->>'reason' = 'payment_timeout') AS expired
                      FROM order_events e JOIN orders o ON o.id = e.order_id
                     WHERE o.customer_id LIKE $1
                     GROUP BY e.order_id
                    """,
                    prefix,
                )
            }
    finally:
        await conn.close()

    # 1. one order per key
    keyed = {}
    for k in keys:
        if k["order_id"] is not None:
            keyed.setdefault(str(k["order_id"]), []).append((k["customer_id"], k["key"]))
    for oid, (customer, _) in orders.items():
        if oid not in keyed:
            violations.append(f"order {oid} of {customer} has no idempotency record (created outside a key?)")
    for oid, ks in keyed.items():
        if len(ks) > 1:
            violations.append(f"order {oid} is recorded under {len(ks)} keys: {ks[:3]}")
        if oid not in orders:
            violations.append(f"idempotency record {ks[0]} names order {oid}, which does not exist")
    sent = {(c, k) for c, k in ledger["keys_sent"]}
    strays = [(k["customer_id"], k["key"]) for k in keys if (k["customer_id"], k["key"]) not in sent]
    if strays:
        violations.append(f"{len(strays)} idempotency record(s) for keys no client sent, e.g. {strays[:3]}")
    for customer, key, ids in ledger["key_orders"]:
        if len(set(ids)) > 1:
            violations.append(f"key {key} of {customer} answered {len(set(ids))} different orders: {sorted(set(ids))}")
    if len(orders) > len(sent):
        violations.append(f"{len(orders)} orders in the database for only {len(sent)} keys sent")

    # 2. stock conservation
    found = {r["sku"]: r for r in stock}
    for sku, initial in ledger["skus"].items():
        r = found.get(sku)
        if r is None:
            violations.append(f"SKU {sku} created by the run is missing")
        elif r["stock"] + r["reserved"] != initial:
            violations.append(
                f"SKU {sku}: stock {r['stock']} + reserved {r['reserved']} = {r['stock'] + r['reserved']}, "
                f"created with {initial}"
            )

    # 3. acknowledged orders exist (and acknowledged cancels happened)
    for oid, customer in ledger["created"].items():
        got = orders.get(oid)
        if got is None:
            violations.append(f"order {oid} answered 201 to {customer} but is not in the database")
        elif got[0] != customer:
            violations.append(f"order {oid} answered 201 to {customer} but belongs to {got[0]}")
    for oid in ledger["cancelled"]:
        got = orders.get(oid)
        if got is not None and got[1] != "cancelled":
            violations.append(f"order {oid} answered 200 to its cancel but is {got[1]}")

    # 4. the pending count
    pending: dict[str, int] = {}
    for customer, status in orders.values():
        if status == "pending":
            pending[customer] = pending.get(customer, 0) + 1
    if counted != pending:
        wrong = sorted(c for c in counted.keys() | pending.keys() if counted.get(c) != pending.get(c))
        violations.append(
            f"pending count differs from the pending orders for {len(wrong)} customer(s), e.g. "
            + ", ".join(f"{c}: {counted.get(c, 0)} counted, {pending.get(c, 0)} orders" for c in wrong[:3])
        )

    # 5. unpaid orders expire
    for r in overdue[:20]:
        violations.append(
            f"order {r['id']} is still pending {r['age']:.0f} s after it was placed "
            f"(ORDERS_PAYMENT_TIMEOUT_S={timeout_s:g})"
        )
    abandoned = ledger.get("abandoned", [])
    for oid in abandoned:
        got = orders.get(oid)
        if got is None:
            continue  # reported by 3.
        if got[1] not in ("pending", "cancelled"):
            violations.append(f"abandoned order {oid} is {got[1]}: no payment was sent for it")
        elif expiry_waited and got[1] != "cancelled":
            violations.append(f"abandoned order {oid} did not expire (ORDERS_PAYMENT_TIMEOUT_S={timeout_s:g})")

    # 6. never both paid and cancelled; each payment took effect once
    for oid, (_, status) in orders.items():
        t = timelines.get(oid)
        was_paid = status in ("paid", "shipped", "delivered") or bool(t and t["to_paid"])
        was_cancelled = status == "cancelled" or bool(t and t["cancelled"])
        if was_paid and was_cancelled:
            violations.append(f"order {oid} is both paid and cancelled (status {status})")
    for oid, answers in ledger.get("paid", {}).items():
        got = orders.get(oid)
        if answers > 1:
            violations.append(f"order {oid} was answered `paid` {answers} times")
        if got is not None and got[1] != "paid":
            violations.append(f"order {oid} was answered `paid` but is {got[1]}")
    for oid in ledger.get("refund_required", []):
        got = orders.get(oid)
        if got is not None and got[1] != "cancelled":
            violations.append(f"order {oid} was answered `refund_required` but is {got[1]}")

    # 7. order events: one per version, in order; one order.paid per paid order
    paid_in_db = {oid for oid, (_, status) in orders.items() if status == "paid"}
    ever_paid = {oid for oid, t in timelines.items() if t["to_paid"]} | paid_in_db
    nats_url = os.environ.get("ORDERS_NATS_URL")
    events_checked: dict[str, Any] = {"checked": False}
    if nats_url:
        events_checked = await _check_events(dsn, prefix, nats_url, orders, versions, ever_paid, violations)

    return {
        "violations": violations,
        "checked": {
            "orders_in_db": len(orders),
            "orders_acknowledged": len(ledger["created"]),
            "keys_sent": len(sent),
            "idempotency_records": len(keys),
            "skus": len(ledger["skus"]),
            "cancels_acknowledged": len(ledger["cancelled"]),
            "pending_orders": sum(pending.values()),
            "payments": payments,
            "paid_orders": len(paid_in_db),
            "paid_answers": sum(ledger.get("paid", {}).values()),
            "refund_required": len(ledger.get("refund_required", [])),
            "abandoned": len(abandoned),
            "abandoned_cancelled": sum(1 for oid in abandoned if orders.get(oid, ("", ""))[1] == "cancelled"),
            "expired_events": sum(1 for t in timelines.values() if t["expired"]),
            "expiry": expiry,
            "events": events_checked,
            "stock": {r["sku"]: {"stock": r["stock"], "reserved": r["reserved"]} for r in stock},
        },
    }


async def _check_events(
    dsn: str,
    prefix: str,
    nats_url: str,
    orders: dict[str, tuple[str, str]],
    versions: dict[str, int],
    ever_paid: set[str],
    violations: list[str],
) -> dict[str, Any]:
    """Invariant 7; returns what the stream holds of the run's orders."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        sql = """SELECT count(*) FROM outbox x JOIN orders o ON o.id = x.order_id
                  WHERE x.kind = 'event' AND x.status = 'pending' AND o.customer_id LIKE $1"""
        # How long the outbox may take to publish the run's last events.
        drain_s = float(os.environ.get("LOAD_EVENTS_WAIT_S", "30"))
        for _ in range(int(drain_s / 0.5)):  # polled: the service's relay publishes them
            left = await conn.fetchval(sql, prefix)
            if not left:
                break
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
    if left:
        violations.append(f"{left} order event(s) of the run still unpublished after {drain_s:.0f} s")
    stream = os.environ.get("ORDERS_NATS_STREAM", "ORDERS")
    seen: dict[str, list[tuple[int, str, str]]] = {}  # order id: (version, type, status) in stream order
    nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=10)
        try:
            last = (await js.stream_info(stream)).state.last_seq
        except nats.js.errors.NotFoundError:
            last = 0
        if last:
            sub = await js.subscribe("orders.>", stream=stream, ordered_consumer=True)
            while True:
                msg = await sub.next_msg(timeout=10)
                event = json.loads(msg.data)
                if event.get("subject") in orders:
                    data = event["data"]
                    seen.setdefault(event["subject"], []).append((data["version"], event["type"], data["status"]))
                if msg.metadata.sequence.stream >= last:
                    break
            await sub.unsubscribe()
    finally:
        await nc.close()
    for oid, (_, status) in orders.items():
        got = seen.get(oid, [])
        if [v for v, _, _ in got] != list(range(1, versions[oid] + 1)):
            violations.append(f"order {oid} at version {versions[oid]}: events of versions {[v for v, _, _ in got]}")
        elif got[-1][2] != status:
            violations.append(f"order {oid} is {status}, its last event ({got[-1][1]}) says {got[-1][2]}")
        paid_events = sum(1 for _, kind, _ in got if kind == "order.paid")
        if paid_events != (oid in ever_paid):
            violations.append(f"order {oid} has {paid_events} order.paid event(s), paid: {oid in ever_paid}")
    return {
        "checked": True,
        "stream": stream,
        "events": sum(len(v) for v in seen.values()),
        "order_paid_events": sum(1 for v in seen.values() for _, kind, _ in v if kind == "order.paid"),
    }


def main() -> int:
    dsn = os.environ.get("ORDERS_DATABASE_URL")
    if not dsn:
        print(json.dumps({"violations": ["ORDERS_DATABASE_URL is not set: the invariants cannot be checked"]}))
        return 1
    ledger = json.load(sys.stdin)
    result = asyncio.run(check(dsn, ledger))
    print(json.dumps(result))
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())

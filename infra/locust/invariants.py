"""The invariants a load run must leave intact, checked in PostgreSQL after the run.

Run by infra/locust/locustfile.py at the end of a run (in a subprocess: asyncpg runs in
plain asyncio, away from locust's gevent), with the run's ledger as JSON on stdin:

    {"customer_prefix": "load-<run>-", "skus": {"<sku>": <initial stock>, ...},
     "created": {"<order id>": "<customer>", ...},          every order answered 201
     "keys_sent": [["<customer>", "<key>"], ...],            every key sent (any outcome)
     "key_orders": [["<customer>", "<key>", ["<id>", ...]], ...],  ids answered per key
     "cancelled": ["<order id>", ...]}                        cancels answered 200

Prints {"violations": [...], "checked": {...}} as JSON; exits 1 when a violation was found.
Needs ORDERS_DATABASE_URL.

1. No order was created twice for one key: every order of the run's customers has its
   idempotency record, no (customer, key) maps to more than one order (in the database
   and in the answers the clients got), and every key in the database is one a client sent.
2. Stock is conserved: for every SKU the run created, stock + the quantities of its
   non-cancelled orders = the stock it was created with.
3. Every order that got a 201 exists, with its customer; every order whose cancel got a
   200 is cancelled.
4. Each customer's count of pending orders (customer_pending, for the pending cap) is the
   number of their orders that are pending.
5. With ORDERS_NATS_URL set (the service publishes order events): once the outbox has
   published them, every order of the run has in the stream (ORDERS_NATS_STREAM) exactly one
   event per version, 1 to its current one, in that order, the last one showing its current
   status: one `order.created` each, one `order.paid` per paid order, none lost, none twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import asyncpg
import nats
import nats.js.errors

# How long the invariant check waits for the outbox to publish the run's last events.
EVENTS_DRAIN_S = 60.0


async def check(dsn: str, ledger: dict[str, Any]) -> dict[str, Any]:
    violations: list[str] = []
    prefix = ledger["customer_prefix"].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
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

    # 5. order events
    nats_url = os.environ.get("ORDERS_NATS_URL")
    events_checked = None
    if nats_url:
        events_checked = await _check_events(dsn, prefix, nats_url, orders, versions, violations)

    return {
        "violations": violations,
        "checked": {
            "events": events_checked,
            "orders_in_db": len(orders),
            "orders_acknowledged": len(ledger["created"]),
            "keys_sent": len(sent),
            "idempotency_records": len(keys),
            "skus": len(ledger["skus"]),
            "cancels_acknowledged": len(ledger["cancelled"]),
            "pending_orders": sum(pending.values()),
            "stock": {r["sku"]: {"stock": r["stock"], "reserved": r["reserved"]} for r in stock},
        },
    }


async def _check_events(
    dsn: str,
    prefix: str,
    nats_url: str,
    orders: dict[str, tuple[str, str]],
    versions: dict[str, int],
    violations: list[str],
) -> int:
    """Invariant 5; returns how many events of the run's orders the stream holds."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        sql = """SELECT count(*) FROM outbox x JOIN orders o ON o.id = x.order_id
                  WHERE x.kind = 'event' AND x.status = 'pending' AND o.customer_id LIKE $1"""
        for _ in range(int(EVENTS_DRAIN_S / 0.5)):  # polled: the service's relay publishes them
            left = await conn.fetchval(sql, prefix)
            if not left:
                break
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
    if left:
        violations.append(f"{left} order event(s) of the run still unpublished after {EVENTS_DRAIN_S:.0f} s")
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
    return sum(len(v) for v in seen.values())


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

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
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import asyncpg


async def check(dsn: str, ledger: dict[str, Any]) -> dict[str, Any]:
    violations: list[str] = []
    prefix = ledger["customer_prefix"].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot for all checks
            orders = {
                str(r["id"]): (r["customer_id"], r["status"])
                for r in await conn.fetch(
                    "SELECT id, customer_id, status FROM orders WHERE customer_id LIKE $1", prefix
                )
            }
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
            "stock": {r["sku"]: {"stock": r["stock"], "reserved": r["reserved"]} for r in stock},
        },
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

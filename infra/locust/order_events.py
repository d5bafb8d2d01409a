"""Reading the order events the service published on NATS JetStream (docs/API.md, "Order
events"), for the load run's invariants: an ephemeral ordered consumer over one subject,
from a start time, read until the consumer has nothing left, in bounded time."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError


class StreamReadTimeout(Exception):
    pass


async def read_events(
    url: str, stream: str, subject: str, since: datetime, timeout: float
) -> list[dict[str, Any]] | None:
    """The messages on `subject` stored in `stream` at or after `since`, oldest first, as
    {"msg_id": <Nats-Msg-Id header>, "event": <the parsed envelope, or None>}; None when
    the stream does not exist. Raises StreamReadTimeout when not done within `timeout` s."""
    deadline = time.monotonic() + timeout
    nc = await nats.connect(url, connect_timeout=min(5.0, timeout), allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=min(5.0, timeout))
        try:
            sub = await js.subscribe(
                subject,
                stream=stream,
                ordered_consumer=True,
                # A consumer left behind by a crash of this process goes away on its own.
                inactive_threshold=30.0,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since),
            )
        except NotFoundError:
            return None
        out: list[dict[str, Any]] = []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StreamReadTimeout(f"{len(out)} message(s) of {subject} read in {timeout} s, not all")
                try:
                    msg = await sub.next_msg(timeout=min(1.0, left))
                except NatsTimeout:
                    # Nothing buffered: done when the server has nothing more for this consumer
                    # (an empty range never delivers a message whose num_pending says so).
                    info = await sub.consumer_info()
                    if info.num_pending == 0 and (info.delivered is None or info.delivered.consumer_seq <= len(out)):
                        return out
                    continue
                try:
                    event = json.loads(msg.data)
                except ValueError:
                    event = None
                out.append({"msg_id": (msg.headers or {}).get("Nats-Msg-Id"), "event": event})
                if msg.metadata.num_pending == 0:
                    return out
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()


def paid_event_violations(
    messages: Iterable[dict[str, Any]], paid: set[str], run_orders: set[str]
) -> tuple[list[str], Counter[str]]:
    """Each paid order of the run has exactly one `order.paid` event, and no other order of
    the run has one. Events of orders outside the run (other runs on a shared stream) are
    not looked at. Returns the violations and the count of events per order."""
    violations: list[str] = []
    counts: Counter[str] = Counter()
    for m in messages:
        event = m["event"]
        if not isinstance(event, dict):
            violations.append(f"an order.paid message (Nats-Msg-Id {m['msg_id']}) is not a JSON object")
            continue
        oid = str(event.get("subject", ""))
        if oid not in run_orders:
            continue
        counts[oid] += 1
        data = event.get("data")
        if event.get("type") != "order.paid":
            violations.append(f"order {oid}: an event of type {event.get('type')!r} on subject orders.order.paid")
        if not isinstance(data, dict) or str(data.get("id")) != oid or data.get("status") != "paid":
            violations.append(f"order {oid}: its order.paid event carries {str(data)[:200]}, not the paid order")
        if m["msg_id"] != event.get("id"):
            violations.append(f"order {oid}: Nats-Msg-Id {m['msg_id']} is not the event id {event.get('id')}")
    for oid in sorted(paid):
        if counts[oid] != 1:
            violations.append(f"paid order {oid} has {counts[oid]} order.paid events in the stream, not 1")
    for oid in sorted(set(counts) - paid):
        violations.append(f"order {oid} is not paid but has {counts[oid]} order.paid event(s)")
    return violations, counts


async def wait_for_paid_events(
    url: str, stream: str, since: datetime, paid: set[str], run_orders: set[str], timeout: float
) -> tuple[list[str], Counter[str]]:
    """paid_event_violations once every paid order has its event, or once `timeout` s have
    passed (the relay publishes after the commit, so the last ones may still be on their way)."""
    deadline = time.monotonic() + timeout
    while True:
        left = max(1.0, deadline - time.monotonic())
        try:
            messages = await read_events(url, stream, "orders.order.paid", since, left)
        except StreamReadTimeout as e:
            return [f"the order.paid events could not be read: {e}"], Counter()
        if messages is None:
            if not paid:
                return [], Counter()
            violations, counts = [f"stream {stream} does not exist, with {len(paid)} paid order(s)"], Counter()
        else:
            violations, counts = paid_event_violations(messages, paid, run_orders)
        if all(counts[oid] for oid in paid) or time.monotonic() >= deadline:
            return violations, counts
        await asyncio.sleep(0.5)

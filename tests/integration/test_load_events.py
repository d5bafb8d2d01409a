"""The load run's read of order.paid events (infra/locust/order_events.py), against a real
nats-server with JetStream that this module starts on a free port (never the machine's)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import nats
import pytest

from infra.locust.order_events import paid_event_violations, read_events, wait_for_paid_events
from tests.private_nats import HAVE_NATS_SERVER, private_nats

pytestmark = pytest.mark.skipif(not HAVE_NATS_SERVER, reason="no nats-server binary")


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with private_nats(tmp_path_factory.mktemp("jetstream")) as url:
        yield url


def envelope(order_id: str, *, event_type: str = "order.paid", status: str = "paid") -> dict:
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "/orders",
        "type": event_type,
        "subject": order_id,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "data": {"id": order_id, "status": status},
    }


async def publish(url: str, stream: str, events: list[dict]) -> None:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
        for e in events:
            subject = f"{stream.lower()}.{e['type']}"
            await js.publish(subject, json.dumps(e).encode(), headers={"Nats-Msg-Id": e["id"]})
    finally:
        await nc.close()


async def test_each_paid_order_counted_once_from_the_start_time(nats_url):
    stream = f"LOADT{uuid.uuid4().hex[:8].upper()}"
    before = str(uuid.uuid4())
    await publish(nats_url, stream, [envelope(before)])  # an earlier run's event, before `since`
    await asyncio.sleep(0.05)
    since = datetime.now(UTC)
    a, b, unpaid, other_run = (str(uuid.uuid4()) for _ in range(4))
    ev_a = envelope(a)
    events = [
        ev_a,
        ev_a,
        envelope(b),
        envelope(b),
        envelope(unpaid),
        envelope(other_run),
        envelope(a, event_type="order.created", status="pending"),
    ]
    await publish(nats_url, stream, events)  # ev_a twice: one Nats-Msg-Id, JetStream keeps one

    messages = await read_events(nats_url, stream, f"{stream.lower()}.order.paid", since, timeout=20)
    assert messages is not None
    assert sorted(m["event"]["subject"] for m in messages) == sorted([a, b, b, unpaid, other_run])
    assert all(m["msg_id"] == m["event"]["id"] for m in messages)

    violations, counts = paid_event_violations(messages, paid={a, b}, run_orders={a, b, unpaid, before})
    assert counts == {a: 1, b: 2, unpaid: 1}
    assert violations == [
        f"paid order {b} has 2 order.paid events in the stream, not 1",
        f"order {unpaid} is not paid but has 1 order.paid event(s)",
    ]
    assert paid_event_violations(messages, paid={a}, run_orders={a}) == ([], {a: 1})


async def test_an_empty_range_and_a_missing_stream_answer_without_waiting_for_the_timeout(nats_url):
    stream = f"LOADT{uuid.uuid4().hex[:8].upper()}"
    await publish(nats_url, stream, [envelope(str(uuid.uuid4()))])
    later = datetime.now(UTC)
    assert await read_events(nats_url, stream, f"{stream.lower()}.order.paid", later, timeout=20) == []
    assert await read_events(nats_url, "NOSUCHSTREAM", "nosuch.order.paid", later, timeout=20) is None


async def test_a_paid_order_without_its_event_is_reported_after_the_wait(nats_url):
    missing = str(uuid.uuid4())
    violations, _ = await wait_for_paid_events(
        nats_url, "NOSUCHSTREAM", datetime.now(UTC), paid={missing}, run_orders={missing}, timeout=1
    )
    assert violations == ["stream NOSUCHSTREAM does not exist, with 1 paid order(s)"]

"""The use cases (orders/service) through a fake unit of work: the real UnitOfWork (its
after-commit logic included) over in-memory query modules, a connection whose transactions
commit unless their block raises, and a cache that records what is applied to it. The SQL
and the effects on PostgreSQL and Redis are covered by the integration tests
(test_unit_of_work.py and the HTTP tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import orjson
import pytest

from orders.auth import Principal
from orders.cache import Cache
from orders.documents import rfc3339
from orders.domain.status import OrderStatus
from orders.errors import (
    IdempotencyInProgress,
    IdempotencyKeyReuse,
    InsufficientStock,
    InvalidTransition,
    NotFound,
    PreconditionFailed,
    Unavailable,
    UnknownSku,
    ValidationFailed,
)
from orders.ratelimit import RateLimiter
from orders.schemas import OrderCreate
from orders.service import orders as order_cases
from orders.service import products as product_cases
from orders.service.unit_of_work import UnitOfWork
from orders.settings import Settings
from tests.conftest import RecordingRelay

NOW = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
ALICE = Principal("alice", is_admin=False)
STAFF = Principal("staff", is_admin=True)


class FakeCatalog:
    """The products table: sku -> fields."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, sku: str, name: str, unit_price: int, stock: int, currency: str = "EUR") -> None:
        self.rows[sku] = {
            "sku": sku, "name": name, "unit_price": unit_price, "currency": currency, "stock": stock, "version": 1
        }


class FakeIdempotency:
    def __init__(self, catalog: FakeCatalog) -> None:
        self.catalog = catalog
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.held: set[tuple[str, str]] = set()  # keys another request holds the lock of

    async def lookup(self, conn: Any, customer_id: str, key: str) -> dict[str, Any] | None:
        return self.records.get((customer_id, key))


class FakeOrders:
    """orders_place() (migration 0007) and orders_change() (0008) in memory: a reservation re-checks
    the key, stock and terms on the latest rows, and writes only when it places."""

    def __init__(self, catalog: FakeCatalog, idempotency: FakeIdempotency) -> None:
        self.catalog = catalog
        self.idempotency = idempotency
        self.rows: dict[UUID, dict[str, Any]] = {}
        self.next_outbox_id = 1
        self.outbox_rows: list[Any] = []  # (kind, topic, payload), as written
        self.before_reservation: Callable[[], None] | None = None  # staff acting meanwhile
        self.before_change: Callable[[], None] | None = None  # another change committing meanwhile
        self.calls: list[str] = []  # the outcome of each call

    def _outbox_ids(self, rows: list[Any]) -> list[int]:
        self.outbox_rows += rows
        ids = list(range(self.next_outbox_id, self.next_outbox_id + len(rows)))
        self.next_outbox_id += len(rows)
        return ids

    async def place(self, conn: Any, **kw: Any) -> dict[str, Any]:
        row = self._place(**kw)
        self.calls.append(row["outcome"])
        return row

    def _place(
        self, *, customer_id: str, idempotency_key: str, terms: list[Any], currency: str | None,
        order: dict[str, Any] | None, **kw: Any,
    ) -> dict[str, Any]:
        if self.before_reservation is not None:
            self.before_reservation()
            self.before_reservation = None
        record = self.idempotency.records.get((customer_id, idempotency_key))
        if record is not None:
            return {"outcome": "stored", **record}
        if (customer_id, idempotency_key) in self.idempotency.held:
            return {"outcome": "in_progress"}
        products = self.catalog.rows
        known = [products[sku] for sku, *_ in terms if sku in products]
        if any(
            (sku in products) != (name is not None)
            or (sku in products and (products[sku]["name"], products[sku]["unit_price"], products[sku]["currency"]) != (name, price, currency))
            for sku, _, name, price in terms
        ):
            return {
                "outcome": "catalog_changed",
                "skus": [p["sku"] for p in known],
                "names": [p["name"] for p in known],
                "unit_prices": [p["unit_price"] for p in known],
                "currencies": [p["currency"] for p in known],
            }
        short = [sku for sku, qty, *_ in terms if sku in products and products[sku]["stock"] < qty]
        if short:
            return {"outcome": "insufficient_stock", "skus": short}
        unknown = [sku for sku, *_ in terms if sku not in products]
        if unknown:
            return {"outcome": "unknown_sku", "skus": unknown}
        assert order is not None
        for sku, qty, _, _ in terms:
            products[sku]["stock"] -= qty
            products[sku]["version"] += 1
        self.rows[UUID(order["id"])] = {**order, "created_at": NOW, "updated_at": NOW}
        self.idempotency.records[(customer_id, idempotency_key)] = {
            "request_hash": kw["request_hash"], "status_code": 201, "response_body": kw["response_body"]
        }
        return {
            "outcome": "placed",
            "outbox_ids": self._outbox_ids(kw["outbox"]),
            "skus": [sku for sku, *_ in terms],
            "versions": [products[sku]["version"] for sku, *_ in terms],
        }

    async def get(self, conn: Any, order_id: UUID) -> dict[str, Any] | None:
        return self.rows.get(order_id)

    async def get_for_update(self, conn: Any, order_id: UUID) -> dict[str, Any] | None:
        return self.rows.get(order_id)

    async def owner(self, conn: Any, order_id: UUID) -> str | None:
        row = self.rows.get(order_id)
        return None if row is None else row["customer_id"]

    async def change_status(self, conn: Any, order_id: UUID, **kw: Any) -> dict[str, Any]:
        row = self._change(order_id, **kw)
        self.calls.append(row["outcome"])
        return row

    def _change(
        self, order_id: UUID, *, version: int, status: str, release_stock: bool, outbox: list[Any], **kw: Any
    ) -> dict[str, Any]:
        if self.before_change is not None:
            hook, self.before_change = self.before_change, None
            hook()
        row = self.rows.get(order_id)
        if row is None:
            return {"outcome": "not_found"}
        if row["version"] != version:
            return {"outcome": "stale", **row}
        row.update(status=status, version=row["version"] + 1, updated_at=NOW)
        released = []
        if release_stock:
            for item in row["items"]:
                product = self.catalog.rows[item["sku"]]
                product["stock"] += item["quantity"]
                product["version"] += 1
                released.append([item["sku"], product["version"]])
        at = rfc3339(NOW)  # as orders_change() sets the event's time: the order's updated_at
        rows = [
            (kind, topic, {**p, "time": at, "data": {**p["data"], "updated_at": at}} if kind == "event" else p)
            for kind, topic, p in outbox
        ]
        return {"outcome": "changed", "version": row["version"], "updated_at": NOW, "outbox_ids": self._outbox_ids(rows), "released": released}


class FakeProducts:
    def __init__(self, catalog: FakeCatalog) -> None:
        self.catalog = catalog
        self.terms_read: list[list[str]] = []  # the SKUs of each read of terms

    async def terms(self, conn: Any, skus: list[str]) -> list[tuple[str, str, int, str]]:
        self.terms_read.append(list(skus))
        rows = [self.catalog.rows[s] for s in skus if s in self.catalog.rows]
        return [(p["sku"], p["name"], p["unit_price"], p["currency"]) for p in rows]

    async def get(self, conn: Any, sku: str) -> dict[str, Any] | None:
        return self.catalog.rows.get(sku)

    async def upsert(self, conn: Any, sku: str, fields: dict[str, Any]) -> dict[str, Any]:
        old = self.catalog.rows.get(sku)
        row = {"sku": sku, **fields, "version": 1 if old is None else old["version"] + 1}
        self.catalog.rows[sku] = row
        return {**row, "inserted": old is None}


class RecordingCache(Cache):
    """The cache with Redis off (reads miss, loads run) that records what is applied."""

    def __init__(self) -> None:
        super().__init__(None, Settings(_env_file=None, dev=True))  # type: ignore[call-arg]
        self.applied: list[tuple[str, int, dict[str, Any] | None]] = []

    async def apply(self, entries: list[tuple[str, int, dict[str, Any] | None]]) -> None:
        self.applied += entries


class FakeTransaction:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self.uow = uow

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.uow.commits += 1
        else:
            self.uow.rollbacks += 1


class FakeConnection:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self.uow = uow

    def transaction(self) -> FakeTransaction:
        return FakeTransaction(self.uow)


class FakeUnitOfWork(UnitOfWork):
    """The real unit of work (its after-commit logic included) over in-memory query
    modules and a connection whose transactions commit unless their block raises."""

    def __init__(self) -> None:
        self.cache: RecordingCache
        super().__init__(None, RecordingCache(), RecordingRelay(), 1.0)  # type: ignore[arg-type]
        self.catalog = FakeCatalog()
        self.idempotency = FakeIdempotency(self.catalog)  # type: ignore[assignment]
        self.orders = FakeOrders(self.catalog, self.idempotency)  # type: ignore[assignment]
        self.products = FakeProducts(self.catalog)  # type: ignore[assignment]
        self.commits = self.rollbacks = 0

    @property
    def cache_written(self) -> list[tuple[str, int, dict[str, Any] | None]]:
        return self.cache.applied

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[FakeConnection]:  # type: ignore[override]
        yield FakeConnection(self)

    async def read(self, fetch: Callable[[Any], Awaitable[Any]]) -> Any:
        return await fetch(None)


LIMITER = RateLimiter(Cache(None, Settings(_env_file=None, dev=True)), 0)  # type: ignore[call-arg]


def order_request(*lines: tuple[str, int]) -> tuple[dict[str, Any], OrderCreate]:
    raw = {
        "email": "alice@example.com",
        "shipping_address": {"name": "Alice", "line1": "1 Main St", "city": "Paris", "postal_code": "75001", "country": "FR"},
        "items": [{"sku": sku, "quantity": qty} for sku, qty in lines],
    }
    return raw, OrderCreate.model_validate(raw)


async def place(uow: FakeUnitOfWork, key: str, *lines: tuple[str, int], caller: Principal = ALICE) -> order_cases.Placed:
    raw, req = order_request(*lines)
    return await order_cases.place_order(uow, LIMITER, caller, key, raw, req, "req-1", max_pending=0)


@pytest.fixture
def uow() -> FakeUnitOfWork:
    fake = FakeUnitOfWork()
    fake.catalog.add("MUG", "Mug", 1299, 5)
    fake.catalog.add("PEN", "Pen", 250, 100)
    return fake


async def test_a_placed_order_is_cached_and_dispatched_only_after_its_commit(uow):
    placed = await place(uow, "k1", ("PEN", 2), ("MUG", 1))
    doc = orjson.loads(placed.body)
    assert (placed.status, placed.replayed, placed.version) == (201, False, 1)
    assert [(i["sku"], i["line_total"]) for i in doc["items"]] == [("PEN", 500), ("MUG", 1299)]
    assert (doc["total"], doc["currency"], doc["status"]) == (1799, "EUR", "pending")
    assert uow.orders.calls == ["placed"]  # one call, in autocommit: no BEGIN, no COMMIT
    assert (uow.commits, uow.rollbacks) == (0, 0)
    assert uow.cache_written == [
        (f"orders:order:{placed.order_id}", 1, doc),
        ("orders:product:MUG", 2, None),  # tombstones at the reserved versions
        ("orders:product:PEN", 2, None),
    ]
    assert uow.relay.dispatched == []  # the BackgroundTask, after the response
    await uow.dispatch()
    assert uow.relay.dispatched == [1, 2]  # the email and the audit entry


async def test_a_replay_answers_the_stored_body_and_does_nothing_after_the_commit(uow):
    first = await place(uow, "k1", ("MUG", 1))
    uow.cache_written.clear()
    again = await place(uow, "k1", ("MUG", 1))
    assert (again.replayed, again.body, again.order_id) == (True, first.body, first.order_id)
    assert uow.cache_written == []
    assert uow.catalog.rows["MUG"]["stock"] == 4


@pytest.mark.parametrize(
    ("prepare", "lines", "error"),
    [
        (lambda uow: None, [("MUG", 6)], InsufficientStock),
        (lambda uow: None, [("NOPE", 1)], UnknownSku),
        (lambda uow: uow.catalog.add("USD-ONLY", "Cap", 900, 5, "USD"), [("MUG", 1), ("USD-ONLY", 1)], ValidationFailed),
        (lambda uow: uow.idempotency.held.add(("alice", "k1")), [("MUG", 1)], IdempotencyInProgress),
        # Stock taken by another order between the snapshot and the reservation.
        (lambda uow: setattr(uow.orders, "before_reservation", lambda: uow.catalog.rows["MUG"].update(stock=0)), [("MUG", 1)], InsufficientStock),
    ],
)
async def test_a_refused_order_rolls_back_and_leaves_no_effect(uow, prepare, lines, error):
    prepare(uow)
    with pytest.raises(error):
        await place(uow, "k1", *lines)
    await uow.dispatch()
    assert "placed" not in uow.orders.calls
    assert uow.cache_written == [] and uow.relay.dispatched == []
    assert uow.orders.rows == {} and uow.idempotency.records == {}


async def test_the_same_key_with_another_body_is_refused(uow):
    await place(uow, "k1", ("MUG", 1))
    with pytest.raises(IdempotencyKeyReuse):
        await place(uow, "k1", ("MUG", 2))


async def test_a_price_changed_before_the_reservation_is_priced_again(uow):
    uow.orders.before_reservation = lambda: uow.catalog.rows["MUG"].update(unit_price=1500, version=2)
    placed = await place(uow, "k1", ("MUG", 2))
    assert orjson.loads(placed.body)["total"] == 3000  # the new price, not the snapshot's
    assert uow.orders.calls == ["catalog_changed", "placed"]


async def test_orders_are_priced_from_the_price_list_without_a_read(uow):
    await place(uow, "k1", ("MUG", 1), ("PEN", 1))
    await place(uow, "k2", ("PEN", 2))
    assert uow.products.terms_read == [["MUG", "PEN"]]  # the first order's miss only
    assert uow.orders.calls == ["placed", "placed"]


async def test_a_stale_price_list_entry_costs_one_more_call_then_is_fresh(uow):
    await place(uow, "k1", ("MUG", 1))
    uow.catalog.rows["MUG"].update(unit_price=1500, version=9)  # staff, through another replica
    second = await place(uow, "k2", ("MUG", 1))
    third = await place(uow, "k3", ("MUG", 1))
    assert orjson.loads(second.body)["total"] == orjson.loads(third.body)["total"] == 1500
    assert uow.orders.calls == ["placed", "catalog_changed", "placed", "placed"]
    assert uow.products.terms_read == [["MUG"]]


async def test_a_sku_created_after_a_miss_is_placed(uow):
    with pytest.raises(UnknownSku):
        await place(uow, "k1", ("LAMP", 1))
    uow.orders.before_reservation = lambda: uow.catalog.add("LAMP", "Lamp", 4500, 3)
    placed = await place(uow, "k1", ("LAMP", 1))  # the snapshot did not know it: priced again
    assert orjson.loads(placed.body)["total"] == 4500
    assert uow.orders.calls == ["unknown_sku", "catalog_changed", "placed"]


async def test_a_product_this_process_writes_is_read_again(uow):
    await place(uow, "k1", ("MUG", 1))
    await product_cases.put_product(uow, "MUG", {"name": "Mug", "unit_price": 1400, "currency": "EUR", "stock": 5})
    placed = await place(uow, "k2", ("MUG", 1))
    assert orjson.loads(placed.body)["total"] == 1400
    assert uow.orders.calls == ["placed", "placed"]
    assert uow.products.terms_read == [["MUG"], ["MUG"]]


async def test_a_cancel_releases_stock_after_its_commit_and_dispatches_its_rows(uow):
    placed = await place(uow, "k1", ("MUG", 2))
    order_id = UUID(placed.order_id)
    uow.cache_written.clear()
    with pytest.raises(PreconditionFailed):
        await order_cases.change_status(uow, ALICE, order_id, OrderStatus.CANCELLED, frozenset({2}), None)
    assert uow.cache_written == []
    doc = await order_cases.change_status(uow, ALICE, order_id, OrderStatus.CANCELLED, frozenset({1}), None)
    assert (doc["status"], doc["version"]) == ("cancelled", 2)
    assert uow.cache_written == [(f"orders:order:{order_id}", 2, doc), ("orders:product:MUG", 3, None)]
    assert uow.catalog.rows["MUG"]["stock"] == 5
    await uow.dispatch()
    assert uow.relay.dispatched == [1, 2, 3, 4]  # the order's two rows, then the cancel's audit and email


async def test_a_change_judged_on_a_version_that_moved_is_judged_again_on_the_latest_row(uow):
    """Staff cancel between the customer's read and the call: the call writes nothing and
    answers the latest row, on which the customer's cancel is refused (409)."""
    placed = await place(uow, "k1", ("MUG", 2))
    order_id = UUID(placed.order_id)
    row = uow.orders.rows[order_id]
    uow.orders.before_change = lambda: row.update(status="cancelled", version=2)
    uow.cache_written.clear()
    with pytest.raises(InvalidTransition) as refused:
        await order_cases.change_status(uow, ALICE, order_id, OrderStatus.CANCELLED, None, None)
    assert refused.value.extra["current_status"] == "cancelled"
    assert uow.orders.calls[-1:] == ["stale"] and uow.cache_written == []
    assert uow.catalog.rows["MUG"]["stock"] == 3  # not released by the refused cancel


async def test_a_change_whose_version_moved_is_written_again_from_the_latest_row(uow):
    placed = await place(uow, "k1", ("MUG", 1))
    order_id = UUID(placed.order_id)
    row = uow.orders.rows[order_id]
    uow.orders.before_change = lambda: row.update(status="paid", version=2)  # a payment meanwhile
    doc = await order_cases.change_status(uow, STAFF, order_id, OrderStatus.CANCELLED, None, None)
    assert (doc["status"], doc["version"]) == ("cancelled", 3)
    assert uow.orders.calls[-2:] == ["stale", "changed"]
    audit = [payload for kind, _, payload in uow.orders.outbox_rows if kind == "audit"][-1]
    assert audit["before"] == {"status": "paid", "version": 2}


async def test_a_change_that_keeps_losing_is_unavailable_after_bounded_attempts(uow):
    placed = await place(uow, "k1", ("MUG", 1))
    order_id = UUID(placed.order_id)
    row = uow.orders.rows[order_id]

    def another_change() -> None:  # every call finds the order one version further
        row.update(version=row["version"] + 1)
        uow.orders.before_change = another_change

    uow.orders.before_change = another_change
    with pytest.raises(Unavailable):
        await order_cases.change_status(uow, STAFF, order_id, OrderStatus.CANCELLED, None, None)
    assert uow.orders.calls[1:] == ["stale"] * order_cases.CHANGE_ATTEMPTS
    assert row["status"] == "pending"


async def test_other_customers_orders_are_not_found(uow):
    placed = await place(uow, "k1", ("MUG", 1))
    bob = Principal("bob", is_admin=False)
    with pytest.raises(NotFound):
        await order_cases.get_order(uow, bob, UUID(placed.order_id))
    with pytest.raises(NotFound):
        await order_cases.change_status(uow, bob, UUID(placed.order_id), OrderStatus.CANCELLED, None, None)
    assert not await order_cases.visible_order_exists(uow, bob, UUID(placed.order_id))
    assert await order_cases.visible_order_exists(uow, STAFF, UUID(placed.order_id))
    assert (await order_cases.get_order(uow, STAFF, UUID(placed.order_id)))["customer_id"] == "alice"
    with pytest.raises(NotFound):
        await order_cases.get_order(uow, STAFF, uuid4())


async def test_a_product_written_is_cached_after_its_commit(uow):
    fields = {"name": "Lamp", "unit_price": 4500, "currency": "EUR", "stock": 3}
    doc, created = await product_cases.put_product(uow, "LAMP", fields)
    assert created and doc == {"sku": "LAMP", **fields}
    doc, created = await product_cases.put_product(uow, "LAMP", {**fields, "stock": 4})
    assert not created
    assert uow.cache_written == [("orders:product:LAMP", 1, {"sku": "LAMP", **fields}), ("orders:product:LAMP", 2, doc)]
    assert await product_cases.get_product(uow, "LAMP") == doc


async def test_with_events_on_each_change_writes_its_cloudevent_in_the_same_rows(uow):
    uow.events = True
    first = await place(uow, "k1", ("MUG", 1))
    second = await place(uow, "k2", ("MUG", 1))
    await order_cases.change_status(uow, ALICE, UUID(first.order_id), OrderStatus.CANCELLED, None, None)
    paid = await order_cases.change_status(uow, STAFF, UUID(second.order_id), OrderStatus.PAID, None, None)
    await order_cases.change_status(
        uow, STAFF, UUID(second.order_id), OrderStatus.CANCELLED, None, None, reason="payment_timeout"
    )
    events = [payload for kind, _, payload in uow.orders.outbox_rows if kind == "event"]
    assert [(e["subject"], e["type"], e["data"].get("reason")) for e in events] == [
        (first.order_id, "order.created", None),
        (second.order_id, "order.created", None),
        (first.order_id, "order.cancelled", "customer"),
        (second.order_id, "order.paid", None),
        (second.order_id, "order.cancelled", "payment_timeout"),
    ]
    assert events[0]["data"] == orjson.loads(first.body) and events[0]["id"] == f"{first.order_id}.1"
    assert events[3]["data"] == paid and events[3]["time"] == paid["updated_at"]
    assert "reason" not in events[3]["data"]


async def test_with_events_off_no_event_rows_are_written(uow):
    placed = await place(uow, "k1", ("MUG", 1))
    await order_cases.change_status(uow, STAFF, UUID(placed.order_id), OrderStatus.CANCELLED, None, None)
    assert [kind for kind, _, _ in uow.orders.outbox_rows] == ["email", "audit", "audit", "email"]

"""Properties of the pure rules (orders/domain), checked with hypothesis."""

from __future__ import annotations

import base64
import string
import uuid
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from orders.domain.cursor import (
    BadCursor,
    decode_order_cursor,
    decode_sku_cursor,
    encode_order_cursor,
    encode_sku_cursor,
)
from orders.domain.money import MAX_UNIT_PRICE, MixedCurrencies, PricedLine, order_totals
from orders.domain.status import NOTIFYING, TRANSITIONS, OrderStatus, can_transition, event_type
from orders.schemas import SKU_PATTERN, OrderCreate, OrderLineIn, ProductIn

# Local settings (not a profile: loading one would change every hypothesis test of the run).
props = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

statuses = st.sampled_from(list(OrderStatus))
FINAL = {OrderStatus.DELIVERED, OrderStatus.CANCELLED}
# The forward path; cancellation is the only way off it.
RANK = {OrderStatus.PENDING: 0, OrderStatus.PAID: 1, OrderStatus.SHIPPED: 2, OrderStatus.DELIVERED: 3}

# ----------------------------------------------------------------- the status machine


def _reachable(start: OrderStatus) -> set[OrderStatus]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_status_is_reachable_from_pending_and_the_machine_is_total():
    assert set(TRANSITIONS) == set(OrderStatus)
    assert _reachable(OrderStatus.PENDING) == set(OrderStatus)
    assert _reachable(OrderStatus.CANCELLED) == {OrderStatus.CANCELLED}
    assert _reachable(OrderStatus.DELIVERED) == {OrderStatus.DELIVERED}


@props
@given(statuses, statuses)
def test_transitions_are_exactly_those_of_the_api(current, target):
    allowed = {
        (OrderStatus.PENDING, OrderStatus.PAID),
        (OrderStatus.PAID, OrderStatus.SHIPPED),
        (OrderStatus.SHIPPED, OrderStatus.DELIVERED),
        (OrderStatus.PENDING, OrderStatus.CANCELLED),
        (OrderStatus.PAID, OrderStatus.CANCELLED),
    }
    assert can_transition(current, target) == ((current, target) in allowed)


@props
@given(statuses, statuses)
def test_nothing_leaves_a_final_status_and_nothing_stays_put(current, target):
    if current in FINAL:
        assert not can_transition(current, target)
    assert not can_transition(current, current)


@props
@given(statuses)
def test_cancellation_only_from_pending_or_paid(current):
    assert can_transition(current, OrderStatus.CANCELLED) == (current in {OrderStatus.PENDING, OrderStatus.PAID})


@props
@given(st.lists(statuses, max_size=30))
def test_any_sequence_of_requests_walks_forward_only(requests):
    """Apply arbitrary requested changes, refusing the disallowed ones (409): the order
    only ever moves forward along pending -> paid -> shipped -> delivered, or ends
    cancelled, and every accepted change writes the matching timeline event."""
    current = OrderStatus.PENDING
    history = [current]
    for target in requests:
        if not can_transition(current, target):
            continue
        if target is OrderStatus.CANCELLED:
            assert event_type(target) == "order.cancelled"
        else:
            assert RANK[target] == RANK[current] + 1
            assert event_type(target) == "order.status_changed"
        current = target
        history.append(current)
    assert len(history) == len(set(history))  # no status is entered twice
    assert history.count(OrderStatus.CANCELLED) <= 1
    if OrderStatus.CANCELLED in history:
        assert history[-1] is OrderStatus.CANCELLED
        assert OrderStatus.SHIPPED not in history
    assert NOTIFYING <= set(OrderStatus) - {OrderStatus.PENDING}


# ------------------------------------------------------------------------------ money

currencies = st.text(alphabet=string.ascii_uppercase, min_size=3, max_size=3)
quantities = st.integers(min_value=1, max_value=1000)
prices = st.integers(min_value=0, max_value=MAX_UNIT_PRICE)


def _lines(currency: st.SearchStrategy[str], max_size: int = 100) -> st.SearchStrategy[list[PricedLine]]:
    line = st.builds(PricedLine, st.sampled_from(["A", "B-1", "c.2"]), st.just("Thing"), quantities, prices, currency)
    return st.lists(line, min_size=1, max_size=max_size)


@props
@given(currencies.flatmap(lambda c: _lines(st.just(c))))
def test_totals_are_the_sum_of_the_lines(lines):
    totals = order_totals(lines)
    assert totals.subtotal == sum(line.quantity * line.unit_price for line in lines)
    assert totals.total == totals.subtotal  # no shipping, tax or discount yet
    assert totals.currency == lines[0].currency
    assert all(line.line_total == line.quantity * line.unit_price for line in lines)
    assert order_totals(list(reversed(lines))) == totals  # the order of lines does not matter


@props
@given(
    currencies.flatmap(lambda c: _lines(st.just(c), max_size=20)),
    currencies,
    st.data(),
)
def test_mixed_currencies_are_refused_wherever_the_odd_line_is(lines, other, data):
    assume(other != lines[0].currency)
    odd = PricedLine("ODD", "Odd", 1, 1, other)
    position = data.draw(st.integers(min_value=0, max_value=len(lines)))
    with pytest.raises(MixedCurrencies):
        order_totals([*lines[:position], odd, *lines[position:]])


@props
@given(st.lists(st.tuples(quantities, prices), min_size=1, max_size=100))
def test_no_overflow_within_the_bounds_of_the_api(qp):
    """Whatever the API accepts (100 lines, 1000 units, prices up to MAX_UNIT_PRICE)
    fits PostgreSQL's bigint, line by line and in total."""
    lines = [PricedLine(f"S{i}", "x", q, p, "USD") for i, (q, p) in enumerate(qp)]
    totals = order_totals(lines)
    assert 0 <= totals.total < 2**63
    assert all(line.line_total < 2**63 for line in lines)


def test_the_worst_case_fits_a_bigint_and_the_bounds_are_the_schemas():
    worst = [PricedLine(f"S{i}", "x", 1000, MAX_UNIT_PRICE, "USD") for i in range(100)]
    assert order_totals(worst).total == 100 * 1000 * MAX_UNIT_PRICE < 2**63 - 1
    # The schemas enforce exactly those bounds.
    assert OrderCreate.model_json_schema()["properties"]["items"]["maxItems"] == 100
    assert OrderLineIn.model_json_schema()["properties"]["quantity"]["maximum"] == 1000
    assert ProductIn.model_json_schema()["properties"]["unit_price"]["maximum"] == MAX_UNIT_PRICE


@props
@given(st.lists(st.tuples(st.integers(max_value=0), prices), min_size=1, max_size=5))
def test_non_positive_quantities_are_refused(qp):
    with pytest.raises(ValueError):
        order_totals([PricedLine("S", "x", q, p, "USD") for q, p in qp])


def test_an_order_has_a_line_and_prices_are_not_negative():
    with pytest.raises(ValueError):
        order_totals([])
    with pytest.raises(ValueError):
        order_totals([PricedLine("S", "x", 1, -1, "USD")])


# ---------------------------------------------------------------------------- cursors

offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
aware = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.one_of(st.just(UTC), offsets)
)


@props
@given(aware, st.uuids())
def test_order_cursor_round_trips(at, order_id):
    cursor = encode_order_cursor(at, order_id)
    assert cursor.isascii() and "=" not in cursor and "/" not in cursor and "+" not in cursor  # URL-safe
    back_at, back_id = decode_order_cursor(cursor)
    assert back_at == at and back_at.utcoffset() == at.utcoffset()
    assert back_id == order_id


@props
@given(st.from_regex(SKU_PATTERN, fullmatch=True))
def test_sku_cursor_round_trips(sku):
    assert decode_sku_cursor(encode_sku_cursor(sku)) == sku


@props
@given(st.text(max_size=64))
def test_sku_cursor_round_trips_any_text_without_nul(text):
    if "\x00" in text:  # in no key, and PostgreSQL refuses it in a parameter: a bad cursor
        with pytest.raises(BadCursor):
            decode_sku_cursor(encode_sku_cursor(text))
    else:
        assert decode_sku_cursor(encode_sku_cursor(text)) == text


# Every instant Python can write, with any offset under a day (to the second): a decoded
# cursor is one the driver can send (asyncpg converts it to UTC), anything else is
# BadCursor (422), never an OverflowError (a 500).
any_offset = st.integers(min_value=-86399, max_value=86399).map(lambda s: timezone(timedelta(seconds=s)))
any_tz = st.one_of(st.just(UTC), any_offset)
any_aware = st.one_of(
    st.datetimes(timezones=any_tz),
    # The first and last day, where an offset takes the instant out of range in UTC.
    st.datetimes(max_value=datetime(1, 1, 2), timezones=any_tz),
    st.datetimes(min_value=datetime(9999, 12, 30), timezones=any_tz),
)


@props
@given(any_aware, st.uuids())
@example(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))), uuid.UUID(int=1))
@example(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-14))), uuid.UUID(int=1))
def test_an_order_cursor_decodes_to_an_instant_the_driver_can_send_or_is_bad(at, order_id):
    cursor = encode_order_cursor(at, order_id)
    try:
        back_at, back_id = decode_order_cursor(cursor)
    except BadCursor:
        with pytest.raises(OverflowError):  # refused only when it is out of range in UTC
            at.astimezone(UTC)
        return
    assert back_at.astimezone(UTC) == at.astimezone(UTC) and back_id == order_id


def _decodes_or_bad_cursor(cursor: str) -> None:
    for decode in (decode_order_cursor, decode_sku_cursor):
        try:
            decode(cursor)
        except BadCursor:
            pass


@props
@given(st.text(max_size=600))
def test_arbitrary_strings_never_crash_decoding(cursor):
    _decodes_or_bad_cursor(cursor)


@props
@given(st.binary(max_size=400))
def test_arbitrary_bytes_behind_valid_base64_never_crash_decoding(raw):
    _decodes_or_bad_cursor(base64.urlsafe_b64encode(raw).decode().rstrip("="))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
cursor_like = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.datetimes().map(datetime.isoformat),  # naive: refused
        aware.map(datetime.isoformat),
        st.uuids().map(str),
        st.just(str(uuid.UUID(int=0))),
    ),
    max_size=4,
)


@props
@given(st.one_of(json_values, cursor_like))
def test_well_formed_json_of_the_wrong_shape_is_a_bad_cursor(value):
    cursor = base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")
    _decodes_or_bad_cursor(cursor)


@props
@given(aware.map(datetime.isoformat), st.text(max_size=40))
def test_order_cursor_needs_a_uuid(at, not_uuid):
    try:
        uuid.UUID(not_uuid)
        assume(False)
    except ValueError:
        pass
    cursor = base64.urlsafe_b64encode(orjson.dumps([at, not_uuid])).decode()
    with pytest.raises(BadCursor):
        decode_order_cursor(cursor)


@props
@given(st.datetimes(min_value=datetime(1970, 1, 1)), st.uuids())
def test_order_cursor_refuses_naive_times(at, order_id):
    cursor = base64.urlsafe_b64encode(orjson.dumps([at.isoformat(), str(order_id)])).decode()
    with pytest.raises(BadCursor):
        decode_order_cursor(cursor)


def test_cursors_longer_than_512_characters_are_refused():
    with pytest.raises(BadCursor):
        decode_sku_cursor(encode_sku_cursor("x" * 600))

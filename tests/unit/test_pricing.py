"""Pricing is a pure function of a catalog snapshot and the lines (orders/domain/pricing.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from orders.domain.pricing import CatalogEntry, price_order
from orders.errors import UnknownSku

CATALOG = {
    "MUG": CatalogEntry("Mug", 1299),
    "PEN": CatalogEntry("Pen", 250),
}


@dataclass(frozen=True)
class Line:
    sku: str
    quantity: int


def test_lines_are_priced_from_the_snapshot_in_the_clients_order():
    priced = price_order(CATALOG, "EUR", [Line("PEN", 3), Line("MUG", 2)])
    assert [(p.sku, p.name, p.quantity, p.unit_price, p.line_total) for p in priced.lines] == [
        ("PEN", "Pen", 3, 250, 750),
        ("MUG", "Mug", 2, 1299, 2598),
    ]
    assert {p.currency for p in priced.lines} == {"EUR"}
    assert (priced.totals.currency, priced.totals.subtotal, priced.totals.total) == ("EUR", 3348, 3348)


def test_unknown_skus_are_refused_sorted():
    with pytest.raises(UnknownSku) as unknown:
        price_order(CATALOG, "EUR", [Line("ZZZ", 1), Line("MUG", 5), Line("AAA", 1)])
    assert unknown.value.extra == {"skus": ["AAA", "ZZZ"]}


def test_an_order_has_lines():
    with pytest.raises(ValueError):
        price_order(CATALOG, "EUR", [])


def test_the_snapshot_is_not_changed():
    before = dict(CATALOG)
    price_order(CATALOG, "EUR", [Line("MUG", 5)])
    assert CATALOG == before

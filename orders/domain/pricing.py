"""Pricing an order: a pure function of a snapshot of the catalog and the order's lines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from orders.domain.money import PricedLine, Totals, order_totals
from orders.errors import UnknownSku


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """A product's terms as the snapshot saw them (stock is judged on the locked row)."""

    name: str
    unit_price: int


class Line(Protocol):
    """A requested line: so many units of one SKU (an order's SKUs are distinct)."""

    @property
    def sku(self) -> str: ...

    @property
    def quantity(self) -> int: ...


@dataclass(frozen=True, slots=True)
class PricedOrder:
    lines: list[PricedLine]  # in the client's order
    totals: Totals


def price_order(catalog: Mapping[str, CatalogEntry], currency: str, lines: Sequence[Line]) -> PricedOrder:
    """The lines priced at the snapshot's names and prices, in `currency` (the one the
    snapshot's products share); UnknownSku when the snapshot lacks one. Stock, and the
    terms themselves, are judged by the reservation on the locked rows."""
    unknown = sorted(line.sku for line in lines if line.sku not in catalog)
    if unknown:
        raise UnknownSku("some SKUs are not in the catalog", skus=unknown)
    priced = [
        PricedLine(line.sku, catalog[line.sku].name, line.quantity, catalog[line.sku].unit_price, currency)
        for line in lines
    ]
    return PricedOrder(priced, order_totals(priced))

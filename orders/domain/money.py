"""Money as integer minor units with an ISO 4217 currency; totals from catalog prices."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
# 100 lines x 1000 units x this price stays far below 2**63.
MAX_UNIT_PRICE = 10**11


class MixedCurrencies(ValueError):
    """The lines of one order are priced in more than one currency."""


@dataclass(frozen=True, slots=True)
class PricedLine:
    sku: str
    name: str
    quantity: int
    unit_price: int
    currency: str

    @property
    def line_total(self) -> int:
        return self.quantity * self.unit_price


@dataclass(frozen=True, slots=True)
class Totals:
    currency: str
    subtotal: int
    total: int


def order_totals(lines: Iterable[PricedLine]) -> Totals:
    """Subtotal and total of an order's lines; all lines must share one currency."""
    lines = list(lines)
    if not lines:
        raise ValueError("an order has at least one line")
    currencies = {line.currency for line in lines}
    if len(currencies) != 1:
        raise MixedCurrencies(sorted(currencies))
    for line in lines:
        if line.quantity <= 0 or line.unit_price < 0:
            raise ValueError("quantities are positive and prices not negative")
    subtotal = sum(line.line_total for line in lines)
    # No shipping, tax or discounts yet: the total is the subtotal.
    return Totals(currency=currencies.pop(), subtotal=subtotal, total=subtotal)

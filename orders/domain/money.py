"""Money as integer minor units with an ISO 4217 currency; totals from catalog prices."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import iso4217

# The ISO 4217 list (as the `iso4217` package ships it) and each currency's minor unit,
# the exponent of its amounts. Codes without a minor unit (gold, SDR, XTS, XXX ...)
# cannot be priced in minor units, so they are not currencies here.
MINOR_UNITS: dict[str, int] = {c.code: c.exponent for c in iso4217.Currency if c.exponent is not None}

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


def is_currency(code: str) -> bool:
    """An ISO 4217 code with a minor unit (docs/API.md, Money and identifiers)."""
    return code in MINOR_UNITS


def format_money(amount: int, currency: str) -> str:
    """`amount` minor units as the currency's decimal notation: 2598 USD is "25.98 USD",
    1299 JPY "1299 JPY", 1299 KWD "1.299 KWD". A code not in the list (a row older
    than the validation) gets two decimals."""
    digits = MINOR_UNITS.get(currency, 2)
    if digits == 0:
        return f"{amount} {currency}"
    units, minor = divmod(amount, 10**digits)
    return f"{units}.{minor:0{digits}d} {currency}"

"""The terms (name, unit price, currency) of products, as one process last saw them.

A new order is priced from these in Python, with no round trip of its own: the database
call that places it (orders_place(), migration 0007) compares every line with the locked
product row and answers `catalog_changed` with the rows' current terms when one differs,
and the order is priced again from those. So an entry may be stale without an order ever
being placed at a stale price; it costs one more call, once per process and change.
Entries therefore do not expire by time: with a TTL, every SKU of a large catalog would be read
again once per TTL (with 1000 SKUs and a 30 s TTL, a read for about one order in three at
100 orders/s). The table is bounded (MAX_ENTRIES, least recently used out). Unknown SKUs
are not remembered: the next order naming one reads it again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

MAX_ENTRIES = 20_000  # a few MB at most


@dataclass(frozen=True, slots=True)
class Terms:
    name: str
    unit_price: int
    currency: str


# (sku, name, unit_price, currency) rows, as orders.db.products.terms() reads them.
TermsRow = tuple[str, str, int, str]


class PriceList:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, Terms] = {}  # least recently used first

    async def terms(
        self, skus: list[str], read: Callable[[list[str]], Awaitable[Iterable[TermsRow]]]
    ) -> dict[str, Terms]:
        """The terms of `skus` that exist; those not held come from `read` (one query
        for all of them). A SKU missing from the answer is not in the catalog."""
        found: dict[str, Terms] = {}
        missing = []
        for sku in skus:
            terms = self._entries.pop(sku, None)
            if terms is not None:
                self._entries[sku] = terms  # the most recently used now
                found[sku] = terms
            else:
                missing.append(sku)
        if missing:
            rows = await read(missing)
            found.update(self.update(rows, forget=missing))
        return found

    def update(self, rows: Iterable[TermsRow], forget: Iterable[str] = ()) -> dict[str, Terms]:
        """Holds `rows` as the latest terms; the SKUs of `forget` not among them are dropped
        (not in the catalog). Returns what `rows` hold, by SKU."""
        fresh = {sku: Terms(name, unit_price, currency) for sku, name, unit_price, currency in rows}
        for sku in forget:
            if sku not in fresh:
                self._entries.pop(sku, None)
        for sku, terms in fresh.items():
            self._entries.pop(sku, None)  # re-inserted last: the most recently used
            self._entries[sku] = terms
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]
        return fresh

    def forget(self, sku: str) -> None:
        """A product this process wrote: its next order reads its terms again."""
        self._entries.pop(sku, None)

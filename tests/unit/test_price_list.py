"""The price list (orders/service/price_list.py): misses read once, bounded, LRU."""

from __future__ import annotations

from orders.service.price_list import PriceList, Terms


class Catalog:
    def __init__(self) -> None:
        self.rows = {"A": ("A", "Mug", 100, "EUR"), "B": ("B", "Pen", 20, "EUR"), "C": ("C", "Cap", 900, "USD")}
        self.reads: list[list[str]] = []

    async def read(self, skus: list[str]) -> list[tuple[str, str, int, str]]:
        self.reads.append(skus)
        return [self.rows[s] for s in skus if s in self.rows]


async def test_misses_are_read_in_one_query_and_unknown_skus_are_not_remembered():
    catalog, prices = Catalog(), PriceList()
    assert await prices.terms(["A", "B", "X"], catalog.read) == {
        "A": Terms("Mug", 100, "EUR"), "B": Terms("Pen", 20, "EUR")
    }
    assert await prices.terms(["B", "X"], catalog.read) == {"B": Terms("Pen", 20, "EUR")}
    assert catalog.reads == [["A", "B", "X"], ["X"]]


async def test_the_least_recently_used_entry_goes_when_full():
    catalog, prices = Catalog(), PriceList(max_entries=2)
    await prices.terms(["A", "B"], catalog.read)
    await prices.terms(["A"], catalog.read)  # B is now the least recently used
    await prices.terms(["C"], catalog.read)
    await prices.terms(["A", "C"], catalog.read)
    assert catalog.reads == [["A", "B"], ["C"]]
    await prices.terms(["B"], catalog.read)
    assert catalog.reads[-1] == ["B"]


async def test_update_replaces_and_forgets_what_is_gone():
    catalog, prices = Catalog(), PriceList()
    await prices.terms(["A", "B"], catalog.read)
    assert prices.update([("A", "Big mug", 120, "EUR")], forget=["A", "B"]) == {"A": Terms("Big mug", 120, "EUR")}
    assert await prices.terms(["A", "B"], catalog.read) == {"A": Terms("Big mug", 120, "EUR"), "B": Terms("Pen", 20, "EUR")}
    assert catalog.reads[-1] == ["B"]
    prices.forget("A")
    await prices.terms(["A"], catalog.read)
    assert catalog.reads[-1] == ["A"]

"""Use cases of the catalog: read (cached), list, create or replace."""

from __future__ import annotations

from typing import Any

from orders.cache import product_key
from orders.documents import product_doc
from orders.domain.cursor import encode_sku_cursor, page
from orders.errors import NotFound
from orders.service.unit_of_work import UnitOfWork


async def get_product(uow: UnitOfWork, sku: str) -> dict[str, Any]:
    async def load() -> tuple[int, dict[str, Any]] | None:
        row = await uow.read(lambda conn: uow.products.get(conn, sku))
        return None if row is None else (row["version"], product_doc(row))

    doc = await uow.cache.get_or_load(product_key(uow.cache.prefix, sku), load)
    if doc is None:
        raise NotFound("no such product")
    return doc


async def put_product(uow: UnitOfWork, sku: str, fields: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The product as stored, and whether it was created."""
    async with uow.transaction() as conn:
        row = await uow.products.upsert(conn, sku, fields)
        doc = product_doc(row)
        uow.cache_write(product_key(uow.cache.prefix, sku), row["version"], doc)
    uow.price_list.forget(sku)  # new terms: this process prices from them at once
    return doc, bool(row["inserted"])


async def list_products(uow: UnitOfWork, after: str | None, limit: int) -> dict[str, Any]:
    rows = await uow.read(lambda conn: uow.products.page(conn, after, limit + 1))
    return page(rows, limit, product_doc, lambda r: encode_sku_cursor(r["sku"]))

"""Catalog routes."""

from __future__ import annotations

import re

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from orders.api.openapi import json_body, problems
from orders.body import parse_json, validate
from orders.deps import CurrentCustomer, PageCursor, PageLimit, ServingResources, ensure_admin, parse_cursor
from orders.domain.cursor import decode_sku_cursor
from orders.errors import NotFound
from orders.schemas import SKU_PATTERN, Product, ProductIn, ProductPage
from orders.service import products as use_cases

router = APIRouter(prefix="/v1/products", tags=["catalog"])

_SKU = re.compile(SKU_PATTERN)


def _sku(sku: str) -> str:
    if not _SKU.fullmatch(sku):
        raise NotFound("no such product")
    return sku


@router.get("", response_model=ProductPage, summary="The catalog, by SKU", responses=problems(422, 503))
async def list_products(
    res: ServingResources,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
) -> Response:
    after = parse_cursor(decode_sku_cursor, cursor)
    page = await use_cases.list_products(res.unit_of_work(), after, limit)
    return Response(orjson.dumps(page), media_type="application/json")


@router.get("/{sku}", response_model=Product, summary="One product (cached)", responses=problems(404, 503))
async def get_product(sku: str, res: ServingResources) -> Response:
    doc = await use_cases.get_product(res.unit_of_work(), _sku(sku))
    return Response(orjson.dumps(doc), media_type="application/json")


@router.put(
    "/{sku}",
    response_model=Product,
    status_code=200,
    summary="Create (201) or replace (200) a product (staff)",
    responses={**problems(401, 403, 404, 413, 422, 503), 201: {"description": "Created", "model": Product}},
    openapi_extra=json_body(ProductIn),
)
async def put_product(sku: str, request: Request, caller: CurrentCustomer, res: ServingResources) -> Response:
    raw_bytes = await request.body()
    ensure_admin(caller)
    sku = _sku(sku)
    product = validate(ProductIn, parse_json(raw_bytes))
    doc, created = await use_cases.put_product(res.unit_of_work(), sku, product.model_dump())
    return Response(orjson.dumps(doc), status_code=201 if created else 200, media_type="application/json")

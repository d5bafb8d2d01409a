"""OpenAPI pieces shared by the routers: request bodies read by hand, problem answers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from orders.schemas import Problem

PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}

_DESCRIPTIONS = {
    400: "Idempotency-Key missing or malformed",
    401: "No or bad bearer token",
    403: "Staff only",
    404: "No such resource (or not the caller's)",
    409: "Conflict (stock, transition, or a request with this key in progress)",
    412: "If-Match does not match the current ETag",
    413: "Body too large",
    422: "Validation error, unknown SKU or Idempotency-Key reuse",
    429: "Rate limited",
    503: "Unavailable: database down, pool exhausted or draining",
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"description": _DESCRIPTIONS[code], "content": PROBLEM} for code in codes}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that reads its body itself (to keep API.md's precedence)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


def header(name: str, description: str, *, required: bool = False, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if pattern:
        schema["pattern"] = pattern
    return {"name": name, "in": "header", "required": required, "description": description, "schema": schema}


def add_schemas(spec: dict[str, Any], *models: type[BaseModel]) -> dict[str, Any]:
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (*models, Problem):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = schema
    return spec

"""OpenAPI pieces shared by the routers: request bodies read by hand, problem answers;
and `python -m orders.api.openapi [PATH]` (`make openapi`), which writes the app's
description as committed in docs/openapi.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
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


# Headers that always come with some problems (docs/API.md).
RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "required": True, "schema": {"type": "string"}}
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "required": True, "schema": {"type": "string"}}},
    429: RETRY_AFTER,
    503: RETRY_AFTER,
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"description": _DESCRIPTIONS[code], "content": PROBLEM}
        if code in _HEADERS:
            out[code]["headers"] = _HEADERS[code]
    return out


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that reads its body itself (to keep docs/API.md's precedence)."""
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
    _drop_default_422(spec)
    _declare_bearer(spec)
    return spec


BEARER = {"type": "http", "scheme": "bearer", "description": "HS256 JWT: `sub` customer id, `exp`, optional `roles`"}


def _declare_bearer(spec: dict[str, Any]) -> None:
    """The bearer scheme on every operation that can answer 401 (those that take a
    token), declared here once rather than by a FastAPI security dependency that would
    parse the Authorization header on every request only to document it."""
    spec["components"].setdefault("securitySchemes", {})["HTTPBearer"] = BEARER
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            if "401" in operation.get("responses", {}):
                operation["security"] = [{"HTTPBearer": []}]


def _drop_default_422(spec: dict[str, Any]) -> None:
    """FastAPI documents a 422 `application/json` HTTPValidationError on every route with
    a parameter. Ours answer validation errors as problem+json, and the routes that can
    give one list 422 in `problems()`; the others (a path id or SKU, which is a plain
    string) cannot: drop the leftover, and the schemas nothing refers to any more."""
    default_ref = "#/components/schemas/HTTPValidationError"
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            content = responses.get("422", {}).get("content", {})
            if content.get("application/json", {}).get("schema", {}).get("$ref") == default_ref:
                del responses["422"]
    if default_ref not in str(spec.get("paths")):
        components = spec.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        if "#/components/schemas/ValidationError" not in str(components):
            components.pop("ValidationError", None)


def document(spec: dict[str, Any]) -> str:
    """The committed form of the description: sorted keys, two-space indent, a final
    newline, so that the same app always gives the same bytes and a change a small diff."""
    return json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    from orders.app import create_app
    from orders.settings import Settings

    # The description does not depend on the settings: dev ones need no database or secret.
    text = document(create_app(Settings(_env_file=None, dev=True)).openapi())  # type: ignore[call-arg]
    if argv:
        Path(argv[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

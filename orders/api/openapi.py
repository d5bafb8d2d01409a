"""OpenAPI pieces shared by the routers: request bodies read by hand, problem answers;
and `python -m orders.api.openapi [PATH]` (`make openapi`), which writes the app's
description as committed in docs/openapi.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from orders.domain.money import MINOR_UNITS
from orders.domain.status import OrderStatus
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


class FieldError(BaseModel):
    field: str = Field(description="where, as a dotted path: items.0.quantity, shipping_address.country")
    message: str
    code: str


class DocumentedProblem(Problem):
    """application/problem+json (RFC 9457). Branch on `type`; `title` and `detail` are for people.
    The optional members come with the types named in their description."""

    errors: list[FieldError] = Field(default=None, description="validation-error: the fields and why")
    skus: list[str] = Field(default=None, description="insufficient-stock, unknown-sku: the SKUs concerned")
    max_pending_orders: int = Field(default=None, description="too-many-pending-orders: the cap")
    current_status: OrderStatus = Field(default=None, description="invalid-transition: the order's status now")


def _problem_schema() -> dict[str, Any]:
    """The problem body as clients see it: the members some types add are optional (absent,
    never null), so that a generated client types them without casts."""
    schema = DocumentedProblem.model_json_schema(ref_template="#/components/schemas/{model}")
    schema["title"] = "Problem"
    for member in schema["properties"].values():
        member.pop("default", None)
    return schema


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
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = schema
    problem = _problem_schema()
    for name, sub in problem.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components["Problem"] = problem
    components["Currency"] = CURRENCY
    _drop_default_422(spec)
    _declare_bearer(spec)
    _declare_headers(spec)
    return spec


# Amounts are in minor units: a client needs each currency's exponent to show them, and
# Intl (CLDR) disagrees with ISO 4217 on some (HUF, IDR, COP ... have 2 decimals in ISO 4217).
CURRENCY = {
    "type": "string",
    "enum": sorted(MINOR_UNITS),
    "description": "ISO 4217 code; x-minor-units gives each code's exponent (1299 USD is 12.99)",
    "x-minor-units": dict(sorted(MINOR_UNITS.items())),
}
REQUEST_ID = {
    "description": "the caller's X-Request-ID when it sent a sane one (1 to 128 of A-Z a-z 0-9 . _ : -), else a new one",
    "required": True,
    "schema": {"type": "string"},
}
ETAG = {
    "description": 'the order\'s version, quoted ("3"): send it back as If-Match',
    "required": True,
    "schema": {"type": "string"},
}
LOCATION = {"description": "/v1/orders/{id} of the order", "required": True, "schema": {"type": "string"}}
REPLAYED = {
    "description": "present when this answers a retry with an Idempotency-Key already used: nothing new was created",
    "required": False,
    "schema": {"type": "string", "enum": ["true"]},
}
ORDER_REF = "#/components/schemas/Order"


def _declare_headers(spec: dict[str, Any]) -> None:
    """The response headers of docs/API.md, declared from what the code does for every
    route alike: X-Request-ID on every answer (and accepted on every request, as is the
    W3C trace context), ETag on
    every answer that is one order, Location and Idempotent-Replayed on a creation that
    takes an Idempotency-Key, whose 409 idempotency-in-progress carries Retry-After."""
    components = spec["components"]
    components.setdefault("headers", {})["X-Request-ID"] = REQUEST_ID
    components.setdefault("parameters", {})["X-Request-ID"] = {
        "name": "X-Request-ID",
        "in": "header",
        "required": False,
        # Any value is accepted: one that is not 1 to 128 of A-Z a-z 0-9 . _ : - is replaced.
        "description": "1 to 128 of A-Z a-z 0-9 . _ : -: echoed in the answer and in every log line",
        "schema": {"type": "string"},
    }
    # W3C trace context: continued when tracing is on (docs/API.md, Operations), else ignored.
    for name in ("traceparent", "tracestate"):
        components["parameters"][name] = {
            "name": name,
            "in": "header",
            "required": False,
            "description": "W3C trace context of the caller's trace, continued when tracing is on",
            "schema": {"type": "string"},
        }
    trace_refs = [{"$ref": f"#/components/parameters/{name}"} for name in ("traceparent", "tracestate")]
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            operation.setdefault("parameters", []).extend(
                [{"$ref": "#/components/parameters/X-Request-ID"}, *trace_refs]
            )
            idempotent = any(p.get("name") == "Idempotency-Key" for p in operation["parameters"])
            for code, response in operation.get("responses", {}).items():
                headers = response.setdefault("headers", {})
                headers["X-Request-ID"] = {"$ref": "#/components/headers/X-Request-ID"}
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if code.startswith("2") and schema.get("$ref") == ORDER_REF:
                    headers["ETag"] = ETAG
                    if idempotent:
                        headers["Location"] = LOCATION
                        headers["Idempotent-Replayed"] = REPLAYED
                if idempotent and code == "409":
                    headers["Retry-After"] = {**RETRY_AFTER["Retry-After"], "required": False}


BEARER = {"type": "http", "scheme": "bearer", "description": "HS256 JWT: `sub` customer id, `exp`, optional `roles`"}
PAYMENT_SIGNATURE = {
    "type": "apiKey",
    "in": "header",
    "name": "Payment-Signature",
    "description": 't=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>"> with ORDERS_PAYMENT_WEBHOOK_SECRET',
}
# openapi_extra of the payment provider's route: signed, no bearer token.
SIGNED = {"security": [{"PaymentSignature": []}]}
SIGNATURE_401 = {
    401: {
        "description": "invalid-signature: no, malformed or wrong Payment-Signature, or t more than 300 s from now",
        "content": PROBLEM,
        "headers": {
            "WWW-Authenticate": {"description": "Payment-Signature", "required": True, "schema": {"type": "string"}}
        },
    }
}


def _declare_bearer(spec: dict[str, Any]) -> None:
    """The bearer scheme on every operation that can answer 401 (those that take a
    token), declared here once rather than by a FastAPI security dependency that would
    parse the Authorization header on every request only to document it."""
    schemes = spec["components"].setdefault("securitySchemes", {})
    schemes["HTTPBearer"] = BEARER
    schemes["PaymentSignature"] = PAYMENT_SIGNATURE
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            if "401" in operation.get("responses", {}) and "security" not in operation:
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

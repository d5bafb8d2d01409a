"""The OpenAPI description declares what the service really sends, so that a generated client
(examples/checkout) needs no casts: every header of the contract that an answer carries is
declared for that operation and status (and every declared required one is there), and every
member of a problem body is a declared property of Problem."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from orders.app import ALLOWED_HEADERS, EXPOSED_HEADERS
from tests.conftest import ADMIN, auth, make_product, new_key, order_body

# The response headers of docs/API.md that a client reads; WWW-Authenticate, which browsers
# handle themselves, is declared too but not exposed to scripts.
CONTRACT = {h.lower() for h in EXPOSED_HEADERS} | {"www-authenticate"}


@pytest.fixture(scope="module")
async def spec(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def declared(spec: dict[str, Any], path: str, method: str, status: int) -> dict[str, bool]:
    """Header name (lowercase) -> required, for one response of the description."""
    response = spec["paths"][path][method]["responses"][str(status)]
    out = {}
    for name, header in response.get("headers", {}).items():
        if "$ref" in header:
            header = spec["components"]["headers"][header["$ref"].rsplit("/", 1)[1]]
        out[name.lower()] = bool(header.get("required"))
    return out


def check_headers(spec: dict[str, Any], path: str, method: str, r: httpx.Response) -> None:
    documented = declared(spec, path, method, r.status_code)
    carried = {name.lower() for name in r.headers} & CONTRACT
    assert carried <= documented.keys(), f"{method} {path} {r.status_code}: undeclared {carried - documented.keys()}"
    missing = {name for name, required in documented.items() if required} - {n.lower() for n in r.headers}
    assert not missing, f"{method} {path} {r.status_code}: declared required but absent: {missing}"


def check_problem(spec: dict[str, Any], r: httpx.Response) -> dict[str, Any]:
    assert r.headers["content-type"] == "application/problem+json"
    schema = spec["components"]["schemas"]["Problem"]
    body = r.json()
    assert set(body) <= set(schema["properties"]), f"undeclared members {set(body) - set(schema['properties'])}"
    assert set(schema["required"]) <= set(body)
    return body


async def test_order_answers_declare_their_headers(client: httpx.AsyncClient, spec: dict[str, Any]) -> None:
    sku = await make_product(client, stock=5)
    headers = {**auth("doc-headers"), "Idempotency-Key": new_key()}
    created = await client.post("/v1/orders", headers=headers, json=order_body((sku, 1)))
    assert created.status_code == 201
    check_headers(spec, "/v1/orders", "post", created)
    replay = await client.post("/v1/orders", headers=headers, json=order_body((sku, 1)))
    assert replay.headers["idempotent-replayed"] == "true"
    check_headers(spec, "/v1/orders", "post", replay)

    order_id = created.json()["id"]
    one = await client.get(f"/v1/orders/{order_id}", headers=auth("doc-headers"))
    check_headers(spec, "/v1/orders/{order_id}", "get", one)
    stale = await client.post(
        f"/v1/orders/{order_id}/cancel", headers={**auth("doc-headers"), "If-Match": '"7"'}
    )
    assert stale.status_code == 412
    check_headers(spec, "/v1/orders/{order_id}/cancel", "post", stale)
    cancelled = await client.post(
        f"/v1/orders/{order_id}/cancel", headers={**auth("doc-headers"), "If-Match": one.headers["etag"]}
    )
    assert cancelled.status_code == 200
    check_headers(spec, "/v1/orders/{order_id}/cancel", "post", cancelled)
    paid = await client.post(f"/v1/orders/{order_id}/status", headers=ADMIN, json={"status": "paid"})
    assert paid.status_code == 409
    assert check_problem(spec, paid)["current_status"] == "cancelled"
    check_headers(spec, "/v1/orders/{order_id}/status", "post", paid)

    unauthorized = await client.get("/v1/orders")
    check_headers(spec, "/v1/orders", "get", unauthorized)


async def test_problem_members_are_declared(client: httpx.AsyncClient, spec: dict[str, Any]) -> None:
    sku = await make_product(client, stock=1)
    headers = {**auth("doc-problems"), "Idempotency-Key": new_key()}
    short = await client.post("/v1/orders", headers=headers, json=order_body((sku, 2)))
    assert short.status_code == 409
    assert check_problem(spec, short)["skus"] == [sku]
    check_headers(spec, "/v1/orders", "post", short)

    bad = order_body((sku, 1))
    bad["shipping_address"]["country"] = "ZZ"
    invalid = await client.post("/v1/orders", headers={**auth("doc-problems"), "Idempotency-Key": new_key()}, json=bad)
    assert invalid.status_code == 422
    (error,) = check_problem(spec, invalid)["errors"]
    field_error = spec["components"]["schemas"]["FieldError"]
    assert set(error) == set(field_error["properties"]) == set(field_error["required"])
    assert error["field"] == "shipping_address.country"


def test_request_headers_a_browser_may_send_are_declared(spec: dict[str, Any]) -> None:
    """Idempotency-Key and If-Match where they apply, X-Request-ID everywhere: each header
    CORS allows (other than Authorization and Content-Type, which the description gives as
    the bearer scheme and the body) is a declared parameter of some operation."""
    names = set()
    for operations in spec["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if "$ref" in parameter:
                    parameter = spec["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[1]]
                if parameter["in"] == "header":
                    names.add(parameter["name"])
    assert set(ALLOWED_HEADERS) - {"Authorization", "Content-Type"} <= names

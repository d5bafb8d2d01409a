"""Request bodies: a size limit enforced while reading, and strict JSON decoding.

The limit is applied lazily, when a handler reads the body, so that a bad token still
answers 401 before a large body answers 413 (the precedence of docs/API.md).
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.types import Message, Receive, Scope

from orders.errors import PayloadTooLarge, ValidationFailed, validation_errors

M = TypeVar("M", bound=BaseModel)


def limited_receive(scope: Scope, receive: Receive, limit: int) -> Receive:
    """`receive` that raises PayloadTooLarge once the body passes `limit` bytes (or says it
    will, by Content-Length): nothing larger is ever buffered. RequestContext installs it."""
    declared = 0
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = 0
            break
    received = 0

    async def receive_within_limit() -> Message:
        nonlocal received
        if declared > limit:
            raise PayloadTooLarge(f"the body must not exceed {limit} bytes")
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(f"the body must not exceed {limit} bytes")
        return message

    return receive_within_limit


def parse_json(raw: bytes) -> Any:
    if not raw:
        raise ValidationFailed([{"field": "body", "message": "a JSON body is required", "code": "missing"}])
    try:
        return orjson.loads(raw)  # depth-limited by orjson: deeply nested JSON fails here
    except orjson.JSONDecodeError:
        raise ValidationFailed(
            [{"field": "body", "message": "the body is not valid JSON", "code": "json_invalid"}]
        ) from None


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(validation_errors(exc.errors(include_input=False))) from None

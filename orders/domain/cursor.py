"""Opaque pagination cursors: URL-safe base64 of a small JSON array."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

import orjson

Row = TypeVar("Row")


class BadCursor(ValueError):
    pass


def page(
    rows: Sequence[Row], limit: int, doc: Callable[[Row], dict[str, Any]], cursor: Callable[[Row], str]
) -> dict[str, Any]:
    """A page of a listing from `limit` + 1 rows read in its order: `limit` documents, and
    the cursor of the last one when a further row says that more follow."""
    shown = rows[:limit]
    return {
        "items": [doc(r) for r in shown],
        "next_cursor": cursor(shown[-1]) if len(rows) > limit else None,
    }


def _encode(value: list[str]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


def _decode(cursor: str) -> list[object]:
    if len(cursor) > 512:
        raise BadCursor("cursor too long")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise BadCursor("malformed cursor") from None
    if not isinstance(value, list) or not all(isinstance(v, str) and "\x00" not in v for v in value):
        raise BadCursor("malformed cursor")  # (U+0000 is in no key, and PostgreSQL refuses it)
    return value


def encode_order_cursor(created_at: datetime, order_id: UUID) -> str:
    return _encode([created_at.isoformat(), str(order_id)])


def decode_order_cursor(cursor: str) -> tuple[datetime, UUID]:
    value = _decode(cursor)
    if len(value) != 2:
        raise BadCursor("malformed cursor")
    try:
        at = datetime.fromisoformat(str(value[0]))
        order_id = UUID(str(value[1]))
    except ValueError:
        raise BadCursor("malformed cursor") from None
    if at.tzinfo is None:
        raise BadCursor("malformed cursor")
    try:  # what the driver does with it; "0001-01-01T00:00:00+14:00" is before year 1 in UTC
        at.astimezone(UTC)
    except OverflowError:
        raise BadCursor("cursor out of range") from None
    return at, order_id


def encode_sku_cursor(sku: str) -> str:
    return _encode([sku])


def decode_sku_cursor(cursor: str) -> str:
    value = _decode(cursor)
    if len(value) != 1:
        raise BadCursor("malformed cursor")
    return str(value[0])


def encode_id_cursor(row_id: int) -> str:
    return _encode([str(row_id)])


BIGINT_MAX = 2**63 - 1


def parse_row_id(text: str) -> int | None:
    """A row id (a positive bigint) written in ASCII digits, else None."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= BIGINT_MAX:
        return None
    return int(text)


def decode_id_cursor(cursor: str) -> int:
    value = _decode(cursor)
    row_id = parse_row_id(str(value[0])) if len(value) == 1 else None
    if row_id is None:
        raise BadCursor("malformed or out-of-range cursor")
    return row_id

"""The JSON documents of docs/API.md built from database rows (one place for the shapes)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def product_doc(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "sku": row["sku"],
        "name": row["name"],
        "unit_price": row["unit_price"],
        "currency": row["currency"],
        "stock": row["stock"],
    }


def order_doc(row: asyncpg.Record | dict[str, Any], items: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "customer_id": row["customer_id"],
        "status": row["status"],
        "currency": row["currency"],
        "email": row["email"],
        "items": items if items is not None else row["items"],
        "subtotal": row["subtotal"],
        "total": row["total"],
        "shipping_address": row["shipping_address"],
        "version": row["version"],
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
    }


def notification_doc(row: asyncpg.Record) -> dict[str, Any]:
    """An outbox row as staff see it (GET /v1/admin/notifications)."""
    doc = {name: row[name] for name in ("id", "kind", "topic", "status", "attempts", "last_error")}
    doc["order_id"] = str(row["order_id"])
    for name in ("created_at", "next_attempt_at", "sent_at"):
        doc[name] = row[name] and rfc3339(row[name])
    return doc


def payment_event_doc(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "order_id": str(row["order_id"]),
        "type": row["type"],
        "amount": row["amount"],
        "currency": row["currency"],
        "outcome": row["outcome"],
        "received_at": rfc3339(row["received_at"]),
    }

"""Staff operations on the notification outbox: list the rows, re-queue a failed one.
The queries are orders/db/outbox.py's, shared with `orders outbox` (orders/cli.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

import asyncpg
import orjson
import structlog
from fastapi import APIRouter, BackgroundTasks, Depends, Query
from fastapi.responses import Response

from orders.api.openapi import problems
from orders.auth import Principal
from orders.db import outbox
from orders.db.pool import connection, read
from orders.deps import CurrentCustomer, Res, ensure_admin, parse_cursor
from orders.documents import rfc3339
from orders.domain.cursor import decode_id_cursor, encode_id_cursor
from orders.errors import InvalidTransition, NotFound
from orders.schemas import Notification, NotificationPage

router = APIRouter(prefix="/v1/admin/notifications", tags=["operations"])
log = structlog.get_logger("orders.admin")

BIGINT_MAX = 2**63 - 1


async def staff(who: CurrentCustomer) -> Principal:
    """A dependency, so that 403 comes before any 422 of the parameters (docs/API.md)."""
    ensure_admin(who)
    return who


Staff = Annotated[Principal, Depends(staff)]


def notification_doc(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "order_id": str(row["order_id"]),
        "kind": row["kind"],
        "topic": row["topic"],
        "status": row["status"],
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "created_at": rfc3339(row["created_at"]),
        "next_attempt_at": rfc3339(row["next_attempt_at"]),
        "sent_at": rfc3339(row["sent_at"]) if row["sent_at"] else None,
    }


def _row_id(notification_id: str) -> int:
    """A path id that is not a positive bigint names no row: 404, like an unknown one."""
    if not (notification_id.isascii() and notification_id.isdigit()) or not 0 < int(notification_id) <= BIGINT_MAX:
        raise NotFound("no such notification")
    return int(notification_id)


@router.get(
    "",
    response_model=NotificationPage,
    summary="Outbox rows (emails, audit entries), newest first (staff)",
    responses=problems(401, 403, 422, 503),
)
async def list_notifications(
    who: Staff,
    res: Res,
    status: Literal["pending", "sent", "failed"] | None = None,
    order_id: UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    before = parse_cursor(decode_id_cursor, cursor)
    rows = await read(
        res.pool,
        res.settings.db_acquire_timeout_s,
        lambda conn: outbox.page(conn, status=status, order_id=order_id, before_id=before, limit=limit + 1),
    )
    more = len(rows) > limit
    rows = rows[:limit]
    body = {
        "items": [notification_doc(r) for r in rows],
        "next_cursor": encode_id_cursor(rows[-1]["id"]) if more else None,
    }
    return Response(orjson.dumps(body), media_type="application/json")


@router.post(
    "/{notification_id}/retry",
    response_model=Notification,
    summary="Re-queue a failed outbox row for delivery, due now (staff)",
    responses=problems(401, 403, 404, 409, 503),
)
async def retry_notification(notification_id: str, who: Staff, res: Res, background: BackgroundTasks) -> Response:
    row_id = _row_id(notification_id)
    async with connection(res.pool, res.settings.db_acquire_timeout_s) as conn:
        retried = await outbox.retry(conn, [row_id])
        row = retried[0] if retried else await outbox.get(conn, row_id)
    if row is None:
        raise NotFound("no such notification")
    if not retried:  # pending or sent: nothing to re-queue, and nothing is sent again
        raise InvalidTransition(
            f"only a failed notification can be retried; this one is {row['status']}",
            current_status=row["status"],
        )
    log.info("notification_retried", notification_id=row_id, order_id=str(row["order_id"]), actor=who.customer_id)
    # Like an order's own rows: delivered right after the response, else by any relay.
    background.add_task(res.relay.dispatch, [row_id])
    return Response(orjson.dumps(notification_doc(row)), media_type="application/json")

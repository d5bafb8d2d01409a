"""Staff operations on the notification outbox: list the rows, re-queue a failed one
(orders/service/notifications.py)."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

import orjson
import structlog
from fastapi import APIRouter, BackgroundTasks
from fastapi.responses import Response

from orders.api.openapi import problems
from orders.deps import PageCursor, PageLimit, ServingResources, Staff, parse_cursor
from orders.domain.cursor import decode_id_cursor, parse_row_id
from orders.errors import NotFound
from orders.schemas import Notification, NotificationPage
from orders.service import notifications as use_cases

router = APIRouter(prefix="/v1/admin/notifications", tags=["operations"])
log = structlog.get_logger("orders.admin")


def _row_id(notification_id: str) -> int:
    """A path id that is not a positive bigint names no row: 404, like an unknown one."""
    row_id = parse_row_id(notification_id)
    if row_id is None:
        raise NotFound("no such notification")
    return row_id


@router.get(
    "",
    response_model=NotificationPage,
    summary="Outbox rows (emails, audit entries), newest first (staff)",
    responses=problems(401, 403, 422, 503),
)
async def list_notifications(
    caller: Staff,
    res: ServingResources,
    status: Literal["pending", "sent", "failed"] | None = None,
    order_id: UUID | None = None,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
) -> Response:
    before = parse_cursor(decode_id_cursor, cursor)
    body = await use_cases.list_notifications(
        res.unit_of_work(), status=status, order_id=order_id, before_id=before, limit=limit
    )
    return Response(orjson.dumps(body), media_type="application/json")


@router.post(
    "/{notification_id}/retry",
    response_model=Notification,
    summary="Re-queue a failed outbox row for delivery, due now (staff)",
    responses=problems(401, 403, 404, 409, 503),
)
async def retry_notification(
    notification_id: str, caller: Staff, res: ServingResources, background: BackgroundTasks
) -> Response:
    row_id = _row_id(notification_id)
    uow = res.unit_of_work()
    doc = await use_cases.retry_notification(uow, row_id)
    log.info("notification_retried", notification_id=row_id, order_id=doc["order_id"], actor=caller.customer_id)
    # Like an order's own rows: delivered right after the response, else by any relay.
    background.add_task(uow.dispatch)
    return Response(orjson.dumps(doc), media_type="application/json")

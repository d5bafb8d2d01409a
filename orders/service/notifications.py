"""Use cases of the notification outbox for staff: list its rows, re-queue a failed one.
The queries are orders/db/outbox.py's, shared with `orders outbox` (orders/cli.py)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from orders.documents import notification_doc
from orders.domain.cursor import encode_id_cursor, page
from orders.errors import InvalidTransition, NotFound
from orders.service.unit_of_work import UnitOfWork


async def list_notifications(
    uow: UnitOfWork, *, status: str | None, order_id: UUID | None, before_id: int | None, limit: int
) -> dict[str, Any]:
    rows = await uow.read(
        lambda conn: uow.outbox.page(conn, status=status, order_id=order_id, before_id=before_id, limit=limit + 1)
    )
    return page(rows, limit, notification_doc, lambda r: encode_id_cursor(r["id"]))


async def retry_notification(uow: UnitOfWork, row_id: int) -> dict[str, Any]:
    """A failed row becomes pending and due now, handed to the relay after the commit;
    any other row is left alone (nothing is sent twice)."""
    async with uow.transaction() as conn:
        retried = await uow.outbox.retry(conn, [row_id])
        row = retried[0] if retried else await uow.outbox.get(conn, row_id)
        if row is None:
            raise NotFound("no such notification")
        if not retried:
            raise InvalidTransition(
                f"only a failed notification can be retried; this one is {row['status']}",
                current_status=row["status"],
            )
        uow.dispatch_later([row_id])
    return notification_doc(row)

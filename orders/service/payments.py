"""Use cases of payments: an event of the payment provider, the staff listing of events,
and the expiry of orders left unpaid.

Every change of an order goes through orders.service.orders.apply_change, the path of the
staff's changes: the same timeline event, audit entry, email, cache update and stock
release. A webhook and the expiry both lock the order row first, so of the two racing on
one order the second sees what the first did: a payment after the expiry answers
`refund_required`, an expiry after the payment finds the order no longer pending.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog

from orders.documents import payment_event_doc
from orders.domain.cursor import encode_id_cursor, page
from orders.domain.status import OrderStatus
from orders.observability import EXPIRED_ORDERS, PAYMENT_EVENTS
from orders.schemas import PaymentEventIn
from orders.service.orders import apply_change
from orders.service.unit_of_work import UnitOfWork

log = structlog.get_logger("orders.payments")

PROVIDER_ACTOR = "payment-provider"
SYSTEM_ACTOR = "system"
SUCCEEDED = "payment.succeeded"
FAILED = "payment.failed"
TIMEOUT_REASON = "payment_timeout"


async def handle_event(uow: UnitOfWork, event: PaymentEventIn, request_id: str | None) -> str:
    """The outcome of an authentic, well-formed provider event (docs/API.md). The event id
    is recorded in the transaction that acts on it, so it takes effect at most once."""
    async with uow.transaction() as conn:
        claimed = await uow.payments.claim(
            conn,
            event_id=event.id,
            order_id=event.order_id,
            type=event.type,
            amount=event.amount,
            currency=event.currency,
        )
        if claimed:
            outcome = await _act(uow, conn, event, request_id)
            if outcome != "ignored":  # (what claim recorded)
                await uow.payments.set_outcome(conn, event.id, outcome)
        else:
            outcome = "duplicate"
    PAYMENT_EVENTS.labels(outcome).inc()
    log.info("payment_event", event_id=event.id, type=event.type, order_id=str(event.order_id), outcome=outcome)
    return outcome


async def _act(uow: UnitOfWork, conn: asyncpg.Connection, event: PaymentEventIn, request_id: str | None) -> str:
    if event.type not in (SUCCEEDED, FAILED):
        return "ignored"
    row = await uow.orders.get_for_update(conn, event.order_id)
    if row is None:
        return "ignored"
    status = OrderStatus(row["status"])
    payment = {"payment_event_id": event.id, "amount": event.amount, "currency": event.currency}
    if event.type == FAILED:
        # Nothing changes: the customer may pay again while the order is pending.
        await uow.orders.add_event(conn, row["id"], "payment.failed", PROVIDER_ACTOR, payment)
        return "recorded"
    if status is not OrderStatus.PENDING:
        # Cancelled (by the customer, staff or expiry), or paid already by another payment:
        # the money was taken for nothing and must go back.
        await uow.orders.add_event(
            conn, row["id"], "payment.refund_required", PROVIDER_ACTOR, {**payment, "status": status.value}
        )
        return "refund_required"
    if event.amount != row["total"] or event.currency != row["currency"]:
        expected = {"expected_amount": row["total"], "expected_currency": row["currency"]}
        await uow.orders.add_event(conn, row["id"], "payment.amount_mismatch", PROVIDER_ACTOR, {**payment, **expected})
        return "amount_mismatch"
    await apply_change(
        uow,
        conn,
        row,
        OrderStatus.PAID,
        actor=PROVIDER_ACTOR,
        request_id=request_id,
        data={"payment_event_id": event.id},
    )
    return "paid"


async def list_events(uow: UnitOfWork, *, outcome: str | None, before_seq: int | None, limit: int) -> dict[str, Any]:
    rows = await uow.read(lambda conn: uow.payments.page(conn, outcome=outcome, before_seq=before_seq, limit=limit + 1))
    return page(rows, limit, payment_event_doc, lambda r: encode_id_cursor(r["seq"]))


async def expire_overdue(uow: UnitOfWork, *, timeout_s: float, batch: int) -> tuple[int, int]:
    """Cancel (reason payment_timeout) up to `batch` pending orders older than `timeout_s`.
    Returns (candidates seen, orders this call expired).

    Each order in its own transaction: locking a whole batch of orders first and then each
    one's customer and product rows would take locks out of the order every other writer
    uses (customer, then products: orders_change(), migration 0008) and could deadlock with
    new orders. SKIP LOCKED leaves an order that another replica, a payment or a cancel
    holds; whoever holds it decides, and the re-checked status makes each expiry happen once.
    """
    ids = await uow.read(lambda conn: uow.payments.overdue(conn, timeout_s=timeout_s, limit=batch))
    expired = 0
    try:
        for order_id in ids:
            # The task's log context gets the order for this one only (apply_change binds it).
            with structlog.contextvars.bound_contextvars(order_id=str(order_id)):
                async with uow.transaction() as conn:
                    row = await uow.payments.lock_overdue(conn, order_id, timeout_s=timeout_s)
                    if row is not None:
                        await apply_change(
                            uow,
                            conn,
                            row,
                            OrderStatus.CANCELLED,
                            actor=SYSTEM_ACTOR,
                            request_id=None,
                            reason=TIMEOUT_REASON,
                        )
                        expired += 1
    finally:
        # The emails of the committed expiries, to the relay's fast path.
        await uow.dispatch()
        if expired:
            EXPIRED_ORDERS.inc(expired)
            log.info("orders_expired", count=expired)
    return len(ids), expired

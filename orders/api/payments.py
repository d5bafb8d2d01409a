"""The payment provider's webhook (signed, no bearer token) and the staff listing of its
events (orders/service/payments.py)."""

from __future__ import annotations

import time

import orjson
import structlog
from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.responses import Response

from orders.api.openapi import SIGNATURE_401, SIGNED, json_body, problems
from orders.body import parse_json, validate
from orders.deps import PageCursor, PageLimit, ServingResources, Staff, parse_cursor, request_id
from orders.domain import signature
from orders.domain.cursor import decode_id_cursor
from orders.errors import InvalidSignature
from orders.schemas import PaymentEventIn, PaymentEventPage, PaymentResult, RecordedOutcome
from orders.service import payments as use_cases

router = APIRouter(prefix="/v1/payments/events", tags=["payments"])
log = structlog.get_logger("orders.payments")


@router.post(
    "",
    response_model=PaymentResult,
    summary="An event of the payment provider (signed with Payment-Signature)",
    responses={**SIGNATURE_401, **problems(413, 422, 503)},
    openapi_extra={**json_body(PaymentEventIn), **SIGNED},
)
async def payment_event(request: Request, background: BackgroundTasks, res: ServingResources) -> Response:
    raw = await request.body()  # the app's body limit applies (413)
    # On the raw bytes, before any parsing: nothing of an unsigned body is looked at.
    if not signature.verify(
        request.headers.get("payment-signature"), raw, res.settings.payment_webhook_secrets, time.time()
    ):
        log.warning("payment_signature_invalid")
        raise InvalidSignature()
    event = validate(PaymentEventIn, parse_json(raw))
    uow = res.unit_of_work()
    outcome = await use_cases.handle_event(uow, event, request_id())
    background.add_task(uow.dispatch)
    return Response(orjson.dumps({"outcome": outcome}), media_type="application/json")


@router.get(
    "",
    response_model=PaymentEventPage,
    summary="Recorded payment events, newest first (staff)",
    responses=problems(401, 403, 422, 503),
)
async def list_payment_events(
    caller: Staff,
    res: ServingResources,
    outcome: RecordedOutcome | None = None,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
) -> Response:
    before = parse_cursor(decode_id_cursor, cursor)
    body = await use_cases.list_events(res.unit_of_work(), outcome=outcome, before_seq=before, limit=limit)
    return Response(orjson.dumps(body), media_type="application/json")

"""The expiry task's pass (orders/service/expiry.py): batch after batch, and no more."""

from __future__ import annotations

from typing import Any

import pytest

from orders.service import expiry
from orders.service.expiry import EXPIRY_BATCH, Expiry


@pytest.mark.parametrize(
    ("batches", "calls", "total"),
    [
        ([(EXPIRY_BATCH, 3), (EXPIRY_BATCH, 5), (7, 7)], 3, 15),  # full batches, then a short one
        ([(EXPIRY_BATCH, 0), (EXPIRY_BATCH, 9)], 1, 0),  # a full batch all held by others: the next pass
    ],
)
async def test_a_pass_reads_batches_until_one_is_short_or_expires_nothing(
    monkeypatch: pytest.MonkeyPatch, batches: list[tuple[int, int]], calls: int, total: int
) -> None:
    answers = iter(batches)
    made = 0

    async def expire_overdue(uow: Any, *, timeout_s: float, batch: int) -> tuple[int, int]:
        nonlocal made
        made += 1
        return next(answers)

    monkeypatch.setattr(expiry, "expire_overdue", expire_overdue)
    assert await Expiry(lambda: None, 900).run_once() == total  # type: ignore[arg-type]
    assert made == calls

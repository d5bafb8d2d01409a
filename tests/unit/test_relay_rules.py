"""Pure rules of the relay: the backoff and which failures are transient."""

from __future__ import annotations

import aiosmtplib
import email_validator
import pytest

from orders.notify.email import ascii_address
from orders.notify.relay import backoff, transient


def test_backoff_grows_to_its_cap_and_stays_there_however_many_attempts():
    assert 0.8 <= backoff(1, 300) <= 1.0
    assert 6.4 <= backoff(4, 300) <= 8.0
    # A row retried through a days-long outage: no OverflowError, still the cap.
    assert 240 <= backoff(10_000, 300) <= 300


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(450, "busy", "a@example.com")]), True),
        (aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(550, "no such user", "a@example.com")]), False),
        (aiosmtplib.SMTPDataError(451, "local error"), True),
        (aiosmtplib.SMTPDataError(554, "rejected"), False),
        (aiosmtplib.SMTPSenderRefused(421, "closing", "orders@example.com"), True),
        (UnicodeEncodeError("ascii", "ü", 0, 1, "ordinal not in range"), False),
    ],
)
def test_only_4xx_replies_to_a_message_are_transient(exc, expected):
    assert transient(exc) is expected


def test_addresses_go_on_the_wire_in_ascii():
    assert ascii_address("buyer@example.com") == "buyer@example.com"
    assert ascii_address("buyer@bücher.de") == "buyer@xn--bcher-kva.de"
    with pytest.raises(email_validator.EmailNotValidError):
        ascii_address("ü@example.com")

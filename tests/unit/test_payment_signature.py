"""The webhook signature (orders/domain/signature.py): parsing, verification, and the
worked example of docs/API.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from orders.domain.signature import TOLERANCE_S, header, parse, sign, verify

DOC = (Path(__file__).resolve().parents[2] / "docs" / "API.md").read_text(encoding="utf-8")
SECRET = "whsec-docs-example-0123456789-abcdefghij"
OTHER = "another-rotated-secret-9876543210-ZYXWVU"
BODY = b'{"id":"evt_1","type":"payment.succeeded","order_id":"0b6f4b8e-0000-4000-8000-000000000001","amount":2598,"currency":"USD"}'
T = 1795000000
DIGEST = "a2b5902780c9bacc824f97e25c2c9eaec321678a56905eaa57e8156b4e4ad5e2"


def test_the_worked_example_of_the_contract():
    assert sign(SECRET, T, BODY) == DIGEST
    for text in (SECRET, BODY.decode(), f"t={T},v1={DIGEST}"):
        assert text in DOC, text
    assert verify(f"t={T},v1={DIGEST}", BODY, [SECRET], now=T + 10)


@pytest.mark.parametrize(
    "value",
    [
        None, "", "garbage", "t=123", "v1=abcd", f"t=,v1={DIGEST}", f"t=12a,v1={DIGEST}", f"t=-5,v1={DIGEST}",
        f"t=1,t=2,v1={DIGEST}", "t=1,v1=", f"t=1,v1={DIGEST},junk", f"t=1,v1={'a' * 129}",
        f"t=1234567890123,v1={DIGEST}", f"t=1,v1={DIGEST}," + "x=y," * 400,
    ],
)
def test_malformed_headers_parse_to_nothing(value):
    assert parse(value) is None
    assert not verify(value, BODY, [SECRET], now=T)


def test_parse_takes_every_v1_and_ignores_other_schemes():
    parsed = parse(f" t={T} , v0=old, v1=AB12 ,v1={DIGEST}")
    assert parsed is not None and parsed.timestamp == T and parsed.signatures == ("ab12", DIGEST)


def test_any_v1_matching_any_secret_passes():
    wrong = sign(OTHER, T, BODY)
    assert verify(f"t={T},v1={wrong},v1={DIGEST}", BODY, [SECRET], now=T)
    assert verify(f"t={T},v1={DIGEST}", BODY, [OTHER, SECRET], now=T)  # rotation: our second secret
    assert verify(f"t={T},v1={DIGEST.upper()}", BODY, [SECRET], now=T)  # hex in either case
    assert not verify(f"t={T},v1={wrong}", BODY, [SECRET], now=T)
    assert not verify(f"t={T},v1={DIGEST}", BODY, [], now=T)


def test_the_signature_covers_the_timestamp_and_every_byte_of_the_body():
    assert not verify(f"t={T + 1},v1={DIGEST}", BODY, [SECRET], now=T)
    assert not verify(f"t={T},v1={DIGEST}", BODY.replace(b"2598", b"2599"), [SECRET], now=T)
    assert not verify(f"t={T},v1={DIGEST}", BODY + b" ", [SECRET], now=T)


@pytest.mark.parametrize(("skew", "ok"), [(0, True), (TOLERANCE_S, True), (-TOLERANCE_S, True), (TOLERANCE_S + 1, False), (-TOLERANCE_S - 1, False)])
def test_t_must_be_within_300_seconds_of_now(skew, ok):
    assert verify(header(SECRET, T, BODY), BODY, [SECRET], now=T + skew) is ok

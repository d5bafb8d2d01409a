"""The load run's payment provider (infra/locust/webhook.py): the signature the service checks."""

from __future__ import annotations

from infra.locust.webhook import event_body, signature, signing_secret

BODY = (
    b'{"id":"evt_1","type":"payment.succeeded","order_id":"0f8fad5b-d9cb-469f-a165-70867728950e",'
    b'"amount":2598,"currency":"USD"}'
)


def test_the_signature_is_the_hmac_of_t_dot_body():
    # Computed apart from Python: printf '%s' '1700000000.<BODY>' | openssl dgst -sha256 -hmac SECRET -hex
    expected = "7823df143ebec03049c8e57f522691473a25ef2b710b4fd6cf0fcbd9802f3a9b"
    assert signature("whsec-load-0123456789abcdefghijklmnop", BODY, 1700000000) == f"t=1700000000,v1={expected}"


def test_the_body_is_signed_as_sent():
    body = event_body("evt_1", "payment.succeeded", "0f8fad5b-d9cb-469f-a165-70867728950e", 2598, "USD")
    assert body == BODY


def test_the_first_secret_of_the_list_signs():
    assert signing_secret(" new-secret , old-secret") == "new-secret"
    assert signing_secret(",,only") == "only"
    assert signing_secret("") is None
    assert signing_secret(None) is None

"""Pure rules: settings guards, If-Match, email rendering, currencies and money formatting."""

from __future__ import annotations

import email
import email.policy

import pytest
from pydantic import ValidationError

from orders.api.preconditions import parse_if_match
from orders.domain.cursor import page
from orders.domain.money import MINOR_UNITS, format_money, is_currency
from orders.notify.email import render
from orders.notify.outbox import email_row, message_id
from orders.service.orders import request_fingerprint
from orders.settings import Settings, check_secret

STRONG = "unit-test-only-secret-0123456789-abcdef"

WEAK_SECRETS = [
    None, "", "secret", "short-secret", "change-me", "Ab1-" * 7,  # missing or under 32 bytes
    "a" * 32, "password" * 4, "ab" * 40, "abcdefghijk" * 3, "changemechangemechangemechangeme",  # under 12 distinct
]


@pytest.mark.parametrize("secret", WEAK_SECRETS)
def test_settings_refuse_missing_or_weak_jwt_secret(secret):
    with pytest.raises(ValidationError, match="ORDERS_JWT_SECRET"):
        Settings(_env_file=None, database_url="postgresql://u@h/db", payment_webhook_secret=STRONG, jwt_secret=secret)
    Settings(_env_file=None, jwt_secret=secret, dev=True)  # dev takes anything


@pytest.mark.parametrize("secret", WEAK_SECRETS)
def test_the_secret_rule_is_reusable_and_names_the_setting(secret):
    with pytest.raises(ValueError, match=r"ORDERS_OTHER_SECRET .*32 bytes.*12 distinct"):
        check_secret("ORDERS_OTHER_SECRET", secret)


@pytest.mark.parametrize("secret", ["abcdefghijkl" * 3, "é" * 6 + "abcdefghijk" + "0" * 10, STRONG])
def test_secrets_of_32_bytes_and_12_distinct_characters_pass(secret):
    check_secret("ORDERS_OTHER_SECRET", secret)
    assert Settings(_env_file=None, database_url="postgresql://u@h/db", payment_webhook_secret=STRONG, jwt_secret=secret).jwt_secret == secret


@pytest.mark.parametrize("secret", [*WEAK_SECRETS, f"{STRONG},short", f"short,{STRONG}", " , "])
def test_settings_refuse_a_missing_or_weak_payment_webhook_secret(secret):
    """Every secret of a rotation must be strong: one weak one would let forgeries in."""
    with pytest.raises(ValidationError, match="ORDERS_PAYMENT_WEBHOOK_SECRET"):
        Settings(_env_file=None, database_url="postgresql://u@h/db", jwt_secret=STRONG, payment_webhook_secret=secret)
    Settings(_env_file=None, payment_webhook_secret=secret, dev=True)  # dev takes anything


def test_payment_webhook_secrets_are_a_comma_separated_list():
    other = STRONG[::-1]
    s = Settings(_env_file=None, database_url="postgresql://u@h/db", jwt_secret=STRONG, payment_webhook_secret=f" {STRONG} ,{other}")
    assert s.payment_webhook_secrets == [STRONG, other]


def test_settings_require_a_database_outside_dev():
    with pytest.raises(ValidationError, match="ORDERS_DATABASE_URL"):
        Settings(_env_file=None, jwt_secret=STRONG)
    assert Settings(_env_file=None, dev=True).database_url is None


def test_settings_defaults_follow_the_contract():
    s = Settings(_env_file=None, database_url="postgresql://u@h/db", payment_webhook_secret=STRONG, jwt_secret=STRONG)
    assert (s.db_pool_min, s.db_pool_max, s.db_acquire_timeout_s) == (5, 50, 2)
    assert (s.cache_ttl_s, s.smtp_host, s.smtp_port, s.smtp_starttls) == (300, "localhost", 1025, False)
    assert (s.mail_from, s.max_body_bytes, s.shutdown_grace_s) == ("orders@example.com", 65536, 25)
    assert (s.log_format, s.log_level, s.rate_limit_per_minute, s.migrate_on_start) == ("json", "info", 60, True)
    assert s.max_pending_orders_per_customer == 10
    assert s.payment_timeout_s == 900
    with pytest.raises(ValidationError):
        Settings(_env_file=None, database_url="postgresql://u@h/db", payment_webhook_secret=STRONG, jwt_secret=STRONG, db_pool_min=9, db_pool_max=3)


def test_cors_origins_are_a_comma_separated_list():
    s = Settings(_env_file=None, dev=True, cors_origins=" https://shop.example , https://m.shop.example,")
    assert s.cors_origin_list == ["https://shop.example", "https://m.shop.example"]


@pytest.mark.parametrize(
    ("header", "version", "ok"),
    [
        (None, 3, True), ('"3"', 3, True), ('W/"3"', 3, True), ("*", 3, True),
        ('"2", "3"', 3, True), ('"2"', 3, False), ("3", 3, False), ('W/"4"', 3, False), ("", 3, False),
        ('"03"', 3, False), ('"x"', 3, False), ('"2", *', 3, True), ('""', 3, False),
    ],
)
def test_if_match(header, version, ok):
    accepted = parse_if_match(header)
    assert (accepted is None or version in accepted) is ok


def test_request_fingerprint_ignores_key_order_not_values():
    assert request_fingerprint({"a": 1, "b": [1, 2]}) == request_fingerprint({"b": [1, 2], "a": 1})
    assert request_fingerprint({"a": 1}) != request_fingerprint({"a": 2})
    assert request_fingerprint({"b": [1, 2]}) != request_fingerprint({"b": [2, 1]})


def test_money_formatting():
    assert format_money(2598, "USD") == "25.98 USD" and format_money(5, "EUR") == "0.05 EUR"
    # The minor unit is the currency's (ISO 4217): yen have none, dinars three decimals.
    assert format_money(0, "JPY") == "0 JPY" and format_money(1299, "JPY") == "1299 JPY"
    assert format_money(1299, "KWD") == "1.299 KWD" and format_money(5, "BHD") == "0.005 BHD"
    assert format_money(12345, "CLF") == "1.2345 CLF"


def test_currencies_are_the_iso_4217_list():
    for code in ("USD", "EUR", "GBP", "JPY", "CHF", "KWD", "CLF", "UYW", "XOF"):
        assert is_currency(code), code
    # Three capital letters are not a currency; nor are codes without a minor unit
    # (no currency, testing, gold, SDR), nor lower case.
    for code in ("XYZ", "ABC", "XXX", "XTS", "XAU", "XDR", "usd", "US", "USDD", ""):
        assert not is_currency(code), code
    assert len(MINOR_UNITS) > 150 and set(MINOR_UNITS.values()) == {0, 2, 3, 4}


def _order(*, status: str = "pending", currency: str = "USD", item: str = "Mug", name: str = "Ada") -> dict:
    """An order document as email_row() takes it: two of one item, 25.98 in all."""
    return {
        "id": "0b6f4b8e-0000-4000-8000-000000000001", "email": "a@example.com", "status": status,
        "currency": currency, "subtotal": 2598, "total": 2598,
        "items": [{"sku": "MUG-1", "name": item, "quantity": 2, "unit_price": 1299, "line_total": 2598}],
        "shipping_address": {"name": name},
    }


def _received(payload: dict) -> email.message.EmailMessage:
    """The rendered email as the receiver parses it."""
    return email.message_from_bytes(render(payload, "orders@example.com").data, policy=email.policy.default)


def test_email_rendering_escapes_html_and_carries_the_message_id():
    order = _order(item="<b>Mug</b>")
    kind, topic, payload = email_row(order, "created", "req-1")
    assert (kind, topic) == ("email", "order.created")
    out = render(payload, "orders@example.com")
    assert (out.sender, out.to) == ("orders@example.com", "a@example.com")
    msg = email.message_from_bytes(out.data, policy=email.policy.default)  # as the receiver reads it
    assert msg["Message-ID"] == message_id(order["id"], "created") == f"<order-{order['id']}.created@orders>"
    assert msg["To"] == "a@example.com"
    text = msg.get_body(("plain",)).get_content()
    assert order["id"] in text and "25.98 USD" in text and "Hello Ada" in text
    html = msg.get_body(("html",)).get_content()
    assert "&lt;b&gt;Mug&lt;/b&gt;" in html and "<b>Mug</b>" not in html


def test_the_environment_cannot_lift_the_refusals(monkeypatch):
    """ORDERS_DEV in the environment (or .env) is ignored: only code may set dev."""
    monkeypatch.setenv("ORDERS_DEV", "true")
    monkeypatch.delenv("ORDERS_DATABASE_URL", raising=False)
    monkeypatch.delenv("ORDERS_JWT_SECRET", raising=False)
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]
    assert Settings(_env_file=None, dev=True).dev


def test_a_page_shows_limit_rows_and_a_cursor_only_when_more_follow():
    rows = [{"id": i} for i in (5, 4, 3)]
    doc = dict  # each row as its document

    def cursor(row: dict[str, int]) -> str:
        return f"before-{row['id']}"

    assert page(rows, 2, doc, cursor) == {"items": [{"id": 5}, {"id": 4}], "next_cursor": "before-4"}
    assert page(rows, 3, doc, cursor) == {"items": rows, "next_cursor": None}
    assert page([], 3, doc, cursor) == {"items": [], "next_cursor": None}


def test_the_hand_built_email_is_what_the_email_package_writes_and_refuses_header_breaks():
    """render() writes the bytes itself (a tenth of the CPU of email.mime): the receiver
    must parse it as the compat32 classes' output, without defects, and no value may add
    a header line of its own."""
    _, _, payload = email_row(_order(currency="EUR", item="Tasse \u00e9t\u00e9 \u2615", name="Zo\u00eb"), "created", None)
    msg = _received(payload)
    assert msg.get_content_type() == "multipart/alternative" and msg["MIME-Version"] == "1.0"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert all(not p.defects for p in msg.walk()) and not msg.defects
    assert all(p["Content-Transfer-Encoding"] == "base64" and p.get_content_charset() == "utf-8" for p in parts)
    assert "Hello Zo\u00eb" in parts[0].get_content() and "Tasse \u00e9t\u00e9 \u2615" in parts[0].get_content()
    assert "Tasse \u00e9t\u00e9 \u2615" in parts[1].get_content()
    assert msg["Date"] and msg["Subject"] == "Your order 0b6f4b8e is confirmed"
    with pytest.raises(ValueError):
        render(payload, "orders@example.com\nBcc: someone@example.net")
    with pytest.raises(ValueError):
        render({**payload, "message_id": "<x@orders>\r\nBcc: someone@example.net"}, "orders@example.com")


def test_the_payment_email_says_payment_received_and_the_total():
    order = _order(status="paid")
    kind, topic, payload = email_row(order, "paid", None)
    assert (kind, topic) == ("email", "order.paid")
    msg = _received(payload)
    assert msg["Message-ID"] == f"<order-{order['id']}.paid@orders>"
    assert msg["Subject"] == "Payment received for your order 0b6f4b8e"
    text = msg.get_body(("plain",)).get_content()
    assert "received your payment of 25.98 USD" in text and order["id"] in text


@pytest.mark.parametrize("value", ["Bücher <orders@example.com>", "orders@example.com\nBcc: x@example.com", "orders"])
def test_a_from_address_the_emails_cannot_carry_is_refused_at_start(value):
    with pytest.raises(ValidationError, match="ORDERS_MAIL_FROM"):
        Settings(dev=True, mail_from=value)
    assert Settings(dev=True, mail_from="Shop <orders@example.com>").mail_from == "Shop <orders@example.com>"

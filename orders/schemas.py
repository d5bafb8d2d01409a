"""Request and response bodies of docs/API.md (pydantic). Requests are strict: unknown fields,
floats for integers, untrimmed-empty strings and oversized values are 422."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
    field_validator,
)

from orders.domain.money import MAX_UNIT_PRICE, MINOR_UNITS, is_currency
from orders.domain.status import OrderStatus

SKU_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"

# ISO 3166-1 alpha-2, officially assigned codes.
ISO_COUNTRIES = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ
    BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO
    DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU
    GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW
    KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU
    MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW
    PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF
    TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA
    ZM ZW""".split()
)


def _country(value: str) -> str:
    code = value.upper()
    if code not in ISO_COUNTRIES:
        raise ValueError("must be an ISO 3166-1 alpha-2 country code")
    return code


# No control characters (U+0000-U+001F, U+007F) in names, address lines and the like:
# never meant on a label or in an email, and PostgreSQL cannot store U+0000 at all.
NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
Text200 = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=NO_CONTROL)]
OptionalText200 = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200, pattern=NO_CONTROL)]
PostalCode = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20, pattern=NO_CONTROL)]
Country = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=2, max_length=2, pattern=NO_CONTROL),
    AfterValidator(_country),
]


def _ascii_local_part(address: str) -> str:
    """Internationalised domains are fine (the email goes to their IDNA form); a non-ASCII
    local part is not: it needs SMTPUTF8 on every mail server on the way, which the
    service does not count on, so such an order could never be confirmed."""
    if not address.rpartition("@")[0].isascii():
        raise ValueError("the part before the @ must be ASCII (internationalised local parts cannot be delivered)")
    return address


Email = Annotated[EmailStr, Field(max_length=254), AfterValidator(_ascii_local_part)]
Sku = Annotated[str, StringConstraints(pattern=SKU_PATTERN)]


def _currency(value: str) -> str:
    if not is_currency(value):
        raise ValueError("must be an ISO 4217 currency code (with a minor unit)")
    return value


# The OpenAPI description lists the codes, so that clients (and the fuzzer) know them.
Currency = Annotated[
    str,
    AfterValidator(_currency),
    WithJsonSchema({"type": "string", "enum": sorted(MINOR_UNITS), "description": "ISO 4217 code"}),
]

_STRICT = ConfigDict(extra="forbid", str_strip_whitespace=False)


class ShippingAddress(BaseModel):
    model_config = _STRICT
    name: Text200
    line1: Text200
    line2: OptionalText200 | None = None
    city: Text200
    postal_code: PostalCode
    country: Country = Field(description="ISO 3166-1 alpha-2, stored uppercase")

    @field_validator("line2")
    @classmethod
    def _empty_line2_is_none(cls, v: str | None) -> str | None:
        return v or None


class OrderLineIn(BaseModel):
    model_config = _STRICT
    sku: Sku
    quantity: Annotated[StrictInt, Field(ge=1, le=1000)]


class OrderCreate(BaseModel):
    model_config = _STRICT
    email: Email
    items: Annotated[list[OrderLineIn], Field(min_length=1, max_length=100)]
    shipping_address: ShippingAddress

    @field_validator("items")
    @classmethod
    def _unique_skus(cls, items: list[OrderLineIn]) -> list[OrderLineIn]:
        seen: set[str] = set()
        for item in items:
            if item.sku in seen:
                raise ValueError(f"SKU {item.sku} appears more than once")
            seen.add(item.sku)
        return items


class StatusChange(BaseModel):
    model_config = _STRICT
    status: OrderStatus


class ProductIn(BaseModel):
    model_config = _STRICT
    name: Text200
    unit_price: Annotated[StrictInt, Field(ge=0, le=MAX_UNIT_PRICE)]
    currency: Currency
    stock: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]


class Product(BaseModel):
    sku: str
    name: str
    unit_price: int
    currency: str
    stock: int


class ProductPage(BaseModel):
    items: list[Product]
    next_cursor: str | None


class OrderItem(BaseModel):
    sku: str
    name: str
    quantity: int
    unit_price: int
    line_total: int


class Order(BaseModel):
    id: UUID
    customer_id: str
    status: OrderStatus
    currency: str
    email: str
    items: list[OrderItem]
    subtotal: int
    total: int
    shipping_address: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime


class OrderPage(BaseModel):
    items: list[Order]
    next_cursor: str | None


class OrderEvent(BaseModel):
    type: str
    at: datetime
    actor: str
    data: dict[str, Any]


class EventList(BaseModel):
    items: list[OrderEvent]


class Problem(BaseModel):
    """application/problem+json (RFC 9457)."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str


class Notification(BaseModel):
    """An outbox row as operators see it (GET /v1/admin/notifications); no payload."""

    id: int
    order_id: UUID
    kind: Literal["email", "audit", "event"]
    topic: str
    status: Literal["pending", "sent", "failed"]
    attempts: int
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime
    sent_at: datetime | None


class NotificationPage(BaseModel):
    items: list[Notification]
    next_cursor: str | None


PAYMENT_EVENT_ID_PATTERN = r"^[\x20-\x7e]{1,255}$"  # printable ASCII, space included
PaymentOutcome = Literal["paid", "duplicate", "amount_mismatch", "refund_required", "recorded", "ignored"]
# The outcomes a recorded event can have (a duplicate is not recorded again).
RecordedOutcome = Literal["paid", "amount_mismatch", "refund_required", "recorded", "ignored"]


class PaymentEventIn(BaseModel):
    """An event of the payment provider (POST /v1/payments/events). Fields the provider
    adds beyond these are ignored: a strict refusal would be retried by it forever."""

    model_config = ConfigDict(extra="ignore")
    id: Annotated[str, StringConstraints(pattern=PAYMENT_EVENT_ID_PATTERN)]
    type: Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=NO_CONTROL)]
    order_id: UUID
    amount: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
    currency: Currency


class PaymentResult(BaseModel):
    outcome: PaymentOutcome


class PaymentEvent(BaseModel):
    """A recorded provider event (GET /v1/payments/events)."""

    id: str
    order_id: UUID
    type: str
    amount: int
    currency: str
    outcome: RecordedOutcome
    received_at: datetime


class PaymentEventPage(BaseModel):
    items: list[PaymentEvent]
    next_cursor: str | None

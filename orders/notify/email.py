"""Order emails: rendered from templates (plain text and HTML), sent with aiosmtplib.

Every SMTP operation is bounded: aiosmtplib's per-command timeout and an overall
deadline around the whole exchange, so a server that accepts and never answers
costs at most ORDERS_SMTP_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import base64
import html
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import formatdate
from importlib import resources
from string import Template
from typing import Any

import aiosmtplib
import email_validator

from orders.domain.money import format_money
from orders.settings import Settings

SUBJECTS = {
    "created": "Your order {short} is confirmed",
    "paid": "Payment received for your order {short}",
    "shipped": "Your order {short} has shipped",
    "cancelled": "Your order {short} is cancelled",
}
INTROS = {
    "created": "Thank you for your order.",
    "paid": "We have received your payment. Thank you!",
    "shipped": "Your order has shipped.",
    "cancelled": "Your order has been cancelled. Nothing will be charged for it.",
}


def _template(name: str) -> Template:
    return Template(resources.files("orders.notify").joinpath("templates", name).read_text())


_TEXT = {event: _template(f"order.{event}.txt") for event in SUBJECTS}
_HTML = _template("layout.html")


def ascii_address(address: str) -> str:
    """The address as it goes on the wire: an internationalised domain in its IDNA (xn--)
    form. A non-ASCII local part would need SMTPUTF8, which the service does not use:
    such an address (accepted before placement refused it) raises EmailNotValidError,
    a permanent failure of its row alone."""
    if address.isascii():
        return address
    parts = email_validator.validate_email(address, check_deliverability=False, allow_smtputf8=False)
    assert parts.ascii_email is not None  # None only with a non-ASCII local part, refused above
    return parts.ascii_email


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A rendered email: envelope and the message as bytes on the wire."""

    sender: str
    to: str
    data: bytes


def _part(content_type: str, text: str) -> bytes:
    """One body part: UTF-8, base64 in lines of 76 characters (RFC 2045), as compat32's
    MIMEText(text, subtype, "utf-8") writes it."""
    return (
        b"Content-Type: " + content_type.encode() + b'; charset="utf-8"\n'
        b"MIME-Version: 1.0\nContent-Transfer-Encoding: base64\n\n" + base64.encodebytes(text.encode())
    )


def _header(name: str, value: str) -> bytes:
    # Values are ASCII and short (no folding needed); a line break would let a value
    # add headers of its own: a permanent failure of the row, never a message.
    if "\r" in value or "\n" in value or not value.isascii():
        raise ValueError(f"the {name} header cannot carry {value!r}")
    return f"{name}: {value}\n".encode()


def render(payload: dict[str, Any], mail_from: str) -> Outgoing:
    """multipart/alternative, plain text and HTML, written byte for byte as the `email`
    package's compat32 generator writes it, without building its object tree: a tenth
    of the CPU (docs/PERFORMANCE.md). aiosmtplib turns the line ends into CRLF."""
    order, event = payload["order"], payload["event"]
    currency = order["currency"]
    lines = "\n".join(
        f"  {i['quantity']} x {i['name']} ({i['sku']}) @ {format_money(i['unit_price'], currency)}"
        f" = {format_money(i['line_total'], currency)}"
        for i in order["items"]
    )
    total = format_money(order["total"], currency)
    values = {
        "name": order["shipping_address"].get("name", ""),
        "order_id": order["id"],
        "lines": lines,
        "total": total,
    }
    rows = "\n".join(
        f"<tr><td>{i['quantity']} &times; {html.escape(i['name'])}</td>"
        f"<td>{html.escape(i['sku'])}</td><td>{format_money(i['line_total'], currency)}</td></tr>"
        for i in order["items"]
    )
    to = ascii_address(payload["to"])
    # Base64 lines never contain "-", so no body line can be taken for the boundary.
    boundary = b"=_" + secrets.token_hex(16).encode()
    data = b"".join(
        (
            b'Content-Type: multipart/alternative;\n boundary="' + boundary + b'"\nMIME-Version: 1.0\n',
            _header("From", mail_from),
            _header("To", to),
            _header("Subject", SUBJECTS[event].format(short=order["id"][:8])),
            _header("Message-ID", payload["message_id"]),
            _header("Date", formatdate(usegmt=True)),
            b"\n--" + boundary + b"\n",
            _part("text/plain", _TEXT[event].substitute(values)),
            b"\n--" + boundary + b"\n",
            _part(
                "text/html",
                _HTML.substitute(intro=INTROS[event], rows=rows, total=html.escape(total), order_id=order["id"]),
            ),
            b"\n--" + boundary + b"--\n",
        )
    )
    return Outgoing(sender=mail_from, to=to, data=data)


class Mailer:
    """SMTP sessions: one per delivery batch, every step bounded by ORDERS_SMTP_TIMEOUT_S."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # aiosmtplib otherwise resolves socket.getfqdn() in a thread for every connection.
        self.local_hostname = socket.gethostname() or "localhost"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[aiosmtplib.SMTP]:
        settings = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=settings.smtp_password,
            start_tls=settings.smtp_starttls,
            use_tls=False,
            local_hostname=self.local_hostname,
            timeout=settings.smtp_timeout_s,
        )
        async with asyncio.timeout(settings.smtp_timeout_s):
            await smtp.connect()
        try:
            yield smtp
        finally:
            try:
                async with asyncio.timeout(settings.smtp_timeout_s):
                    await smtp.quit()
            except Exception:
                smtp.close()

    async def send(self, smtp: aiosmtplib.SMTP, mail: Outgoing) -> None:
        async with asyncio.timeout(self.settings.smtp_timeout_s):
            await smtp.sendmail(mail.sender, [mail.to], mail.data)

    async def reset(self, smtp: aiosmtplib.SMTP) -> None:
        """RSET after a failed message: a failure after MAIL FROM (an encoding error, say)
        leaves the envelope open, and every later MAIL of the session would be refused."""
        async with asyncio.timeout(self.settings.smtp_timeout_s):
            await smtp.rset()

    async def close(self) -> None:
        """Nothing is held between batches; kept for the lifespan's symmetry."""

"""Order emails: rendered from templates (plain text and HTML), sent with aiosmtplib.

Every SMTP operation is bounded: aiosmtplib's per-command timeout and an overall
deadline around the whole exchange, so a server that accepts and never answers
costs at most ORDERS_SMTP_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import html
from email.message import EmailMessage
from email.utils import formatdate
from importlib import resources
from string import Template
from typing import Any

import aiosmtplib

from orders.settings import Settings

SUBJECTS = {
    "created": "Your order {short} is confirmed",
    "shipped": "Your order {short} has shipped",
    "cancelled": "Your order {short} is cancelled",
}
INTROS = {
    "created": "Thank you for your order.",
    "shipped": "Your order has shipped.",
    "cancelled": "Your order has been cancelled. Nothing will be charged for it.",
}


def _template(name: str) -> Template:
    return Template(resources.files("orders.notify").joinpath("templates", name).read_text())


_TEXT = {event: _template(f"order.{event}.txt") for event in SUBJECTS}
_HTML = _template("layout.html")


def money(amount: int, currency: str) -> str:
    return f"{amount // 100}.{amount % 100:02d} {currency}"


def render(payload: dict[str, Any], mail_from: str) -> EmailMessage:
    order, event = payload["order"], payload["event"]
    currency = order["currency"]
    lines = "\n".join(
        f"  {i['quantity']} x {i['name']} ({i['sku']}) @ {money(i['unit_price'], currency)}"
        f" = {money(i['line_total'], currency)}"
        for i in order["items"]
    )
    total = money(order["total"], currency)
    values = {
        "name": order["shipping_address"].get("name", ""),
        "order_id": order["id"],
        "lines": lines,
        "total": total,
    }
    msg = EmailMessage()
    msg["From"] = mail_from
    msg["To"] = payload["to"]
    msg["Subject"] = SUBJECTS[event].format(short=order["id"][:8])
    msg["Message-ID"] = payload["message_id"]
    msg["Date"] = formatdate(usegmt=True)
    msg.set_content(_TEXT[event].substitute(values))
    rows = "\n".join(
        f"<tr><td>{i['quantity']} &times; {html.escape(i['name'])}</td>"
        f"<td>{html.escape(i['sku'])}</td><td>{money(i['line_total'], currency)}</td></tr>"
        for i in order["items"]
    )
    msg.add_alternative(
        _HTML.substitute(intro=INTROS[event], rows=rows, total=html.escape(total), order_id=order["id"]),
        subtype="html",
    )
    return msg


class Mailer:
    """Sends one message per SMTP session (no connection outlives a send)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def send(self, msg: EmailMessage) -> None:
        s = self.settings
        async with asyncio.timeout(s.smtp_timeout_s):
            await aiosmtplib.send(
                msg,
                hostname=s.smtp_host,
                port=s.smtp_port,
                username=s.smtp_username,
                password=s.smtp_password,
                start_tls=s.smtp_starttls,
                use_tls=False,
                timeout=s.smtp_timeout_s,
            )

    async def close(self) -> None:
        """Nothing is held between sends; kept for the lifespan's symmetry."""

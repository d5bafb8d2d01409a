"""A test payment provider for the checkout example: a stand-in for a hosted payment page.

The browser must never hold the webhook secret, so the page does not sign anything: it asks
this provider to "charge a test card", and the provider, which holds the secret, sends the
signed event to the service the way a real provider's webhook does (docs/API.md, Payments):

    POST /pay  {"payment_id": "<the page's attempt key>", "order_id": "<uuid>",
                "amount": <minor units>, "currency": "USD", "outcome": "succeed" | "fail"}

sends `payment.succeeded` (or `payment.failed`: a declined card) with event id
`evt_<payment_id>` to `POST <api>/v1/payments/events` under `Payment-Signature`, and answers
200 `{"event_id", "type", "outcome"}` with the service's outcome (`paid`, `recorded`,
`duplicate`, `refund_required`, ...). The same payment_id sent again is the same event, which
the service takes once: a page that lost the answer can ask again without paying twice.
When the service cannot be reached or refuses the event, 502 problem+json says why.

Secret: $ORDERS_PAYMENT_WEBHOOK_SECRET (several comma-separated: every one signs, as a
provider does during a rotation). CORS for the page's origins (--origin). Every call to the
service is bounded (5 s, 3 tries), and at most 8 payments are handled at once (503 beyond).
Run by `make demo` and `make e2e`; by hand:

    ORDERS_PAYMENT_WEBHOOK_SECRET=... python examples/checkout/provider.py \\
        --api http://127.0.0.1:8000 --port 8001 --origin http://127.0.0.1:5173
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from orders.domain import signature

MAX_BODY_BYTES = 4096
MAX_IN_FLIGHT = 8
ATTEMPTS = 3
ATTEMPT_TIMEOUT_S = 5.0
PAYMENT_ID = re.compile(r"[A-Za-z0-9_-]{8,100}")
CURRENCY = re.compile(r"[A-Z]{3}")
EVENT_TYPES = {"succeed": "payment.succeeded", "fail": "payment.failed"}
PROBLEM_BASE = "https://orders.example/test-provider/problems/"


class Refused(Exception):
    """The service would not take the event (or could not be reached): a 502 for the page."""


class Provider:
    def __init__(self, api: str, secrets: list[str]) -> None:
        self.events_url = api.rstrip("/") + "/v1/payments/events"
        self.secrets = secrets

    def signed_headers(self, body: bytes) -> dict[str, str]:
        # One v1 per secret: during a rotation the service accepts any one that matches.
        t = int(time.time())
        v1 = ",".join(f"v1={signature.sign(secret, t, body)}" for secret in self.secrets)
        return {"Payment-Signature": f"t={t},{v1}", "Content-Type": "application/json"}

    def deliver(self, event: dict[str, Any]) -> str:
        """The service's outcome for `event`. Network errors and 5xx are tried again (same
        event id: the service takes it once); a 4xx is final: the event or secret is wrong."""
        body = json.dumps(event, separators=(",", ":")).encode()
        reason = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            # Signed at each try: the service refuses a `t` more than 300 s old.
            request = urllib.request.Request(self.events_url, body, self.signed_headers(body), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=ATTEMPT_TIMEOUT_S) as response:
                    return str(json.load(response)["outcome"])
            except urllib.error.HTTPError as exc:
                detail = exc.read(2048).decode(errors="replace")
                exc.close()
                reason = f"the shop answered {exc.code}: {detail}"
                if exc.code < 500:
                    raise Refused(reason) from None
            except (OSError, ValueError, KeyError) as exc:  # URLError and timeouts are OSErrors
                reason = f"the shop could not be reached: {exc}"
        raise Refused(reason)


def parse_payment(raw: bytes) -> dict[str, Any]:
    """The page's request as an event body, or ValueError saying what is wrong."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise ValueError("the body is not a JSON object")
    payment_id, order_id = body.get("payment_id"), body.get("order_id")
    amount, currency, outcome = body.get("amount"), body.get("currency"), body.get("outcome")
    if not isinstance(payment_id, str) or not PAYMENT_ID.fullmatch(payment_id):
        raise ValueError("payment_id: 8 to 100 letters, digits, '-' or '_'")
    try:
        order_uuid = uuid.UUID(str(order_id))
    except ValueError:
        raise ValueError("order_id: a UUID") from None
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
        raise ValueError("amount: an integer >= 0 (minor units)")
    if not isinstance(currency, str) or not CURRENCY.fullmatch(currency):
        raise ValueError("currency: three capital letters (ISO 4217)")
    if outcome not in EVENT_TYPES:
        raise ValueError('outcome: "succeed" or "fail"')
    return {
        "id": f"evt_{payment_id}",
        "type": EVENT_TYPES[outcome],
        "order_id": str(order_uuid),
        "amount": amount,
        "currency": currency,
    }


def make_handler(provider: Provider, origins: set[str]) -> type[BaseHTTPRequestHandler]:
    in_flight = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    class Handler(BaseHTTPRequestHandler):
        server_version = "orders-test-provider"
        timeout = 10  # a client that sends its request this slowly is dropped

        def cors(self) -> dict[str, str]:
            origin = self.headers.get("Origin")
            if origin is None or origin not in origins:
                return {}
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

        def answer(self, status: int, body: dict[str, Any] | None, extra: dict[str, str] | None = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            headers = {**self.cors(), **(extra or {})}
            if body is not None:
                problem = "type" in body and "title" in body
                headers["Content-Type"] = "application/problem+json" if problem else "application/json"
            headers["Content-Length"] = str(len(data))
            headers["Cache-Control"] = "no-store"
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def problem(self, status: int, slug: str, title: str, detail: str) -> None:
            body = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail}
            self.answer(status, body)

        def do_OPTIONS(self) -> None:
            if self.path != "/pay" or not self.cors():
                self.problem(403, "forbidden", "Forbidden", "not an allowed origin or path")
                return
            allow = {
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": "Content-Type",
                "Access-Control-Max-Age": "600",
            }
            self.answer(204, None, allow)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self.answer(200, {"status": "ok"})
            else:
                self.problem(404, "not-found", "Not found", "only POST /pay and GET /healthz")

        def do_POST(self) -> None:
            if self.path != "/pay":
                self.problem(404, "not-found", "Not found", "only POST /pay and GET /healthz")
                return
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                self.problem(411, "length-required", "Length required", "send Content-Length")
                return
            if int(length) > MAX_BODY_BYTES:
                self.close_connection = True  # the body is not read
                self.problem(413, "payload-too-large", "Payload too large", f"at most {MAX_BODY_BYTES} bytes")
                return
            try:
                event = parse_payment(self.rfile.read(int(length)))
            except ValueError as exc:
                self.problem(422, "validation-error", "Invalid payment", str(exc))
                return
            if not in_flight.acquire(blocking=False):
                self.problem(503, "busy", "Busy", f"{MAX_IN_FLIGHT} payments under way; try again")
                return
            try:
                outcome = provider.deliver(event)
            except Refused as exc:
                self.log_message("event %s for order %s: %s", event["id"], event["order_id"], exc)
                self.problem(502, "not-delivered", "Payment not delivered", str(exc))
                return
            finally:
                in_flight.release()
            self.log_message("event %s (%s) for order %s: %s", event["id"], event["type"], event["order_id"], outcome)
            self.answer(200, {"event_id": event["id"], "type": event["type"], "outcome": outcome})

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", required=True, help="the orders service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--origin", action="append", default=[], help="a page origin allowed by CORS (repeatable)")
    args = parser.parse_args(argv)
    secrets = [s.strip() for s in os.environ.get("ORDERS_PAYMENT_WEBHOOK_SECRET", "").split(",") if s.strip()]
    if not secrets:
        sys.exit("provider.py: set ORDERS_PAYMENT_WEBHOOK_SECRET to the service's webhook secret")
    provider = Provider(args.api, secrets)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(provider, set(args.origin)))
    server.daemon_threads = True
    # SIGTERM (how make e2e stops it) unwinds like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"test payment provider on http://{args.host}:{server.server_port} -> {provider.events_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

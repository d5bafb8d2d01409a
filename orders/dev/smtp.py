"""An SMTP sink for `orders dev` and the tests: a real SMTP server (aiosmtpd) that accepts
every message and keeps it, in memory and, with a root directory, as `root/mail/<n>.eml`."""

from __future__ import annotations

import email
import email.policy
import logging
import threading
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from orders.dev.process import HOST, Startable

log = logging.getLogger(__name__)


class _PortZeroController(Controller):
    """aiosmtpd's Controller, accepting port 0 (a free port picked by the OS)."""

    # aiosmtpd 1.4 connects to (hostname, port) after binding, to check that the server
    # answers; with port 0 that is the wrong port. Read the port the OS picked from the
    # bound socket first (self.server is set by then).
    def _trigger_server(self) -> None:
        server: Any = self.server
        if self.port == 0 and server is not None:
            self.port = int(server.sockets[0].getsockname()[1])
        super()._trigger_server()  # type: ignore[no-untyped-call]


class SmtpSink(Startable):
    """An SMTP server that accepts every message and keeps it.

    `messages` holds every message received, parsed (`email.policy.default`, so
    `EmailMessage`s). With a root directory, each message is also written to
    root/mail/<n>.eml and logged as one line "mail to=... subject=...".
    """

    def __init__(self, root: Path | None = None, host: str = HOST, port: int = 0) -> None:
        self.root = Path(root).absolute() if root is not None else None
        self.mail_dir = self.root / "mail" if self.root is not None else None
        self.host = host
        self.port = port  # the actual port once started
        self.messages: list[EmailMessage] = []
        self._cond = threading.Condition()
        self._counter = 0
        self._controller: _PortZeroController | None = None

    def start(self) -> tuple[str, int]:
        if self._controller is not None:
            return self.host, self.port
        if self.mail_dir is not None:
            self.mail_dir.mkdir(parents=True, exist_ok=True)
            # Go on numbering after the messages of a previous run.
            numbers = [int(p.stem) for p in self.mail_dir.glob("*.eml") if p.stem.isdigit()]
            self._counter = max(numbers, default=0)
        controller = _PortZeroController(self, hostname=self.host, port=self.port)
        controller.start()
        self._controller = controller
        self.port = int(controller.port)
        log.info("smtp sink listening on %s:%s", self.host, self.port)
        return self.host, self.port

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def wait_for_messages(self, count: int = 1, timeout: float = 5.0) -> list[EmailMessage]:
        """Wait (bounded) until at least `count` messages arrived; returns a copy of `messages`."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(f"{len(self.messages)} message(s) received, expected {count}")
            return list(self.messages)

    # aiosmtpd handler hook, called in the controller's thread.
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content or envelope.content
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._cond:
            self._counter += 1
            n = self._counter
            self.messages.append(message)
            self._cond.notify_all()
        if self.mail_dir is not None:
            (self.mail_dir / f"{n}.eml").write_bytes(raw)
            log.info("mail to=%s subject=%s", ",".join(envelope.rcpt_tos), message.get("Subject", ""))
        return "250 Message accepted for delivery"

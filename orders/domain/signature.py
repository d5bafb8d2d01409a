"""The payment provider's webhook signature (pure: no I/O).

`Payment-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`; a header may
carry several `v1` entries (the provider signs with each of its secrets during a rotation)
and the service may hold several secrets (ours): any entry matching any secret passes.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

TOLERANCE_S = 300
# A header longer than this is no signature of ours (a few entries of 64 hex digits).
MAX_HEADER_CHARS = 2048


@dataclass(frozen=True, slots=True)
class ParsedSignature:
    timestamp: int
    signatures: tuple[str, ...]


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The hex `v1` of `body` signed at `timestamp` with `secret`."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def header(secret: str, timestamp: int, body: bytes) -> str:
    """A whole `Payment-Signature` value (what a provider, or a test, sends)."""
    return f"t={timestamp},v1={sign(secret, timestamp, body)}"


def parse(value: str | None) -> ParsedSignature | None:
    """`t=<digits>` exactly once and at least one `v1=<hex>`; other keys (a provider's
    other schemes) are ignored. None when the header is missing or malformed."""
    if not value or len(value) > MAX_HEADER_CHARS:
        return None
    timestamp: int | None = None
    signatures = []
    for part in value.split(","):
        key, sep, item = part.strip().partition("=")
        if not sep:
            return None
        if key == "t":
            if timestamp is not None or not (item.isascii() and item.isdigit()) or len(item) > 12:
                return None
            timestamp = int(item)
        elif key == "v1":
            if not item or len(item) > 128:
                return None
            signatures.append(item.lower())
    if timestamp is None or not signatures:
        return None
    return ParsedSignature(timestamp, tuple(signatures))


def verify(value: str | None, body: bytes, secrets: list[str], now: float, tolerance_s: int = TOLERANCE_S) -> bool:
    """True when the header is well formed, `t` is within `tolerance_s` of `now` and some
    `v1` is the signature of `body` under some secret. Every comparison is constant-time
    and every pair is compared (no early exit that would tell which secret matched)."""
    parsed = parse(value)
    if parsed is None or abs(now - parsed.timestamp) > tolerance_s:
        return False
    matched = False
    for secret in secrets:
        expected = sign(secret, parsed.timestamp, body).encode()
        for candidate in parsed.signatures:
            matched |= hmac.compare_digest(expected, candidate.encode("ascii", "replace"))
    return matched

"""Bearer JWT (HS256) authentication: who is calling, and are they staff."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from orders.errors import Unauthorized
from orders.settings import Settings


@dataclass(frozen=True, slots=True)
class Principal:
    customer_id: str
    is_admin: bool

    def can_see(self, owner: str) -> bool:
        return self.is_admin or owner == self.customer_id


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        if not settings.jwt_secret:
            raise RuntimeError("ORDERS_JWT_SECRET is not set")
        self._key = settings.jwt_secret
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        required = ["exp", "sub"] + (["aud"] if self._audience else []) + (["iss"] if self._issuer else [])
        self._options: dict[str, Any] = {"require": required}
        # Tokens verified before: signature, audience, issuer and subject do not change with
        # time, so a hit only re-checks exp / nbf / iat against the clock, as PyJWT would
        # (see _still_valid). Only valid tokens are kept; bounded, oldest out first.
        self._verified: dict[str, tuple[Principal, int, int | None, int | None]] = {}

    def known(self, authorization: str | None) -> Principal | None:
        """The caller when `authorization` is a bearer token verified before and still
        valid; None otherwise (no token, a bad one, or one never seen): verify() decides."""
        token = _bearer(authorization)
        hit = None if token is None else self._verified.get(token)
        if hit is not None and _still_valid(hit[1], hit[2], hit[3]):
            return hit[0]
        return None

    def verify(self, authorization: str | None) -> Principal:
        token = _bearer(authorization)
        if token is None:
            raise Unauthorized()
        hit = self._verified.get(token)
        if hit is not None and _still_valid(hit[1], hit[2], hit[3]):
            return hit[0]
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                audience=self._audience,
                issuer=self._issuer,
                options=self._options,
            )
        except jwt.PyJWTError:
            raise Unauthorized("the bearer token is invalid or expired") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not 1 <= len(sub) <= 64 or "\x00" in sub:  # PostgreSQL text holds no NUL
            raise Unauthorized("the token's subject is invalid")
        roles = claims.get("roles") or []
        is_admin = isinstance(roles, list) and "admin" in roles
        principal = Principal(customer_id=sub, is_admin=is_admin)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        # jwt.decode checked that these are integers (int() of the claim, as PyJWT compares them).
        nbf, iat = claims.get("nbf"), claims.get("iat")
        self._verified[token] = (
            principal,
            int(claims["exp"]),
            None if nbf is None else int(nbf),
            None if iat is None else int(iat),
        )
        return principal


VERIFIED_CACHE_SIZE = 8192


def _bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for anything else."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _still_valid(exp: int, nbf: int | None, iat: int | None) -> bool:
    """PyJWT's time checks with no leeway: valid while exp > now, nbf <= now, iat <= now."""
    now = time.time()
    return exp > now and (nbf is None or nbf <= now) and (iat is None or iat <= now)


def mint(settings: Settings, sub: str, *, roles: list[str] | None = None, ttl_s: int = 3600, **extra: Any) -> str:
    """A token for `sub` (for `orders dev`, tests and load tests)."""
    assert settings.jwt_secret
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + ttl_s, **extra}
    if roles:
        claims["roles"] = roles
    if settings.jwt_audience:
        claims.setdefault("aud", settings.jwt_audience)
    if settings.jwt_issuer:
        claims.setdefault("iss", settings.jwt_issuer)
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")

"""TokenVerifier's cache of verified tokens answers exactly as a fresh verification would."""

from __future__ import annotations

import time

import jwt
import pytest

from orders import auth
from orders.auth import TokenVerifier, mint
from orders.errors import Unauthorized
from orders.settings import Settings

SECRET = "unit-secret-" + "s" * 40


def _verifier() -> tuple[TokenVerifier, Settings]:
    settings = Settings(_env_file=None, jwt_secret=SECRET, dev=True)  # type: ignore[call-arg]
    return TokenVerifier(settings), settings


def test_a_cached_token_still_expires():
    verifier, _ = _verifier()
    exp = int(time.time()) + 1
    token = jwt.encode({"sub": "c1", "exp": exp}, SECRET, algorithm="HS256")
    assert verifier.verify(f"Bearer {token}").customer_id == "c1"
    assert verifier.verify(f"Bearer {token}").customer_id == "c1"  # from the cache
    while time.time() < exp + 0.05:
        time.sleep(0.05)
    with pytest.raises(Unauthorized):
        verifier.verify(f"Bearer {token}")


def test_a_cached_token_is_rejected_once_the_clock_passes_exp(monkeypatch):
    verifier, settings = _verifier()
    token = mint(settings, "c2", ttl_s=60)
    verifier.verify(f"Bearer {token}")
    later = time.time() + 61
    monkeypatch.setattr(auth.time, "time", lambda: later)
    assert not auth._still_valid(*verifier._verified[token][1:])


def test_failures_are_never_cached():
    verifier, _ = _verifier()
    forged = jwt.encode({"sub": "c3", "exp": int(time.time()) + 60}, "another-secret-" + "x" * 40, algorithm="HS256")
    for _ in range(2):
        with pytest.raises(Unauthorized):
            verifier.verify(f"Bearer {forged}")
    assert forged not in verifier._verified
    immature = jwt.encode({"sub": "c3", "exp": int(time.time()) + 60, "nbf": int(time.time()) + 30}, SECRET)
    with pytest.raises(Unauthorized):
        verifier.verify(f"Bearer {immature}")
    assert immature not in verifier._verified


def test_roles_and_subject_come_back_from_the_cache():
    verifier, settings = _verifier()
    token = mint(settings, "staff", roles=["admin"])
    first = verifier.verify(f"Bearer {token}")
    again = verifier.verify(f"bearer  {token}")
    assert first == again and again.is_admin and again.customer_id == "staff"


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(auth, "VERIFIED_CACHE_SIZE", 3)
    verifier, settings = _verifier()
    tokens = [mint(settings, f"c{i}") for i in range(5)]
    for t in tokens:
        verifier.verify(f"Bearer {t}")
    assert list(verifier._verified) == tokens[-3:]


def test_audience_and_issuer_are_checked_when_set():
    settings = Settings(_env_file=None, jwt_secret=SECRET, jwt_audience="checkout", jwt_issuer="https://id.example", dev=True)  # type: ignore[call-arg]
    verifier = TokenVerifier(settings)
    assert verifier.verify(f"Bearer {mint(settings, 'c1')}").customer_id == "c1"  # mint adds aud and iss
    exp = int(time.time()) + 600
    for claims in (
        {"sub": "c1", "exp": exp},  # neither
        {"sub": "c1", "exp": exp, "aud": "checkout"},  # no issuer
        {"sub": "c1", "exp": exp, "aud": "other", "iss": "https://id.example"},
        {"sub": "c1", "exp": exp, "aud": "checkout", "iss": "https://evil.example"},
    ):
        with pytest.raises(Unauthorized):
            verifier.verify("Bearer " + jwt.encode(claims, SECRET, algorithm="HS256"))

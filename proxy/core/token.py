"""The access token value and the pure facts about it.

Owns: the `Token` value (immutable, a generation number, a repr that shows
only a fingerprint), when a token is sent and when it is replaced
(`make_token`, `lifetime_floor`), and when a token answer says it expires
(`expiry_of`, `lifetime_warning`). Knows nothing of grants, stores, requests
or the event loop; time is always passed in.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Protocol

import jwt

from .errors import GrantError

# The least lifetime a token is scheduled by, whatever `min_refresh_interval` says (it may be 0):
# a token endpoint handing out tokens dead on arrival costs at most one call per floor.
MIN_LIFETIME_FLOOR = 1.0

# What an access token may consist of to be sent as `Bearer <token>`: visible ASCII (RFC 6750 §2.1 is stricter).
_SENDABLE = re.compile(r"[\x21-\x7e]+")


def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible name for a token: 8 hex digits of SHA-256 (logs show only this)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Token:
    """An access token and what is known of it. Immutable; a refresh makes a new one."""

    value: str
    expires_at: float  # wall-clock seconds
    obtained_at: float
    generation: int  # grows by one with every successful refresh
    usable_until: float  # expires_at less a small leeway: never sent after this
    refresh_at: float  # from here on a background refresh starts
    header: str  # "Bearer <value>", built once per generation
    fingerprint: str

    def usable_at(self, now: float) -> bool:
        """True while the token may still be sent upstream."""
        return now < self.usable_until

    def __repr__(self) -> str:
        return f"Token(generation={self.generation}, fingerprint={self.fingerprint})"


def make_token(
    value: str,
    expires_at: float,
    obtained_at: float,
    generation: int,
    refresh_before: float,
    floor: float = 0.0,
) -> Token:
    """Build a Token, choosing the send deadline and the refresh-ahead point.

    The leeway (at most 1 s or a tenth of the lifetime) keeps a token from
    arriving expired at an API that checks `exp` with no clock skew; the
    refresh-ahead point is never earlier than half the lifetime, so a short
    lifetime cannot cause back-to-back refreshes.

    A token whose lifetime is shorter than `floor` (already expired by this
    clock, a skewed clock, a nonsense `expires_in`) is sent, and not replaced
    by the clock, until `floor` seconds after it was obtained: a broken or
    skewed server costs one token call per `floor`, not one per request.
    `expires_at` stays what the answer said.
    """
    if expires_at - obtained_at < floor:
        usable_until = refresh_at = obtained_at + floor
    else:
        lifetime = max(0.0, expires_at - obtained_at)
        usable_until = expires_at - min(1.0, lifetime * 0.1)
        refresh_at = expires_at - min(refresh_before, lifetime * 0.5)
    return Token(
        value=value,
        expires_at=expires_at,
        obtained_at=obtained_at,
        generation=generation,
        usable_until=usable_until,
        refresh_at=refresh_at,
        header=f"Bearer {value}",
        fingerprint=fingerprint(value),
    )


def lifetime_floor(min_refresh_interval: float) -> float:
    """The least lifetime a new token is scheduled by: `min_refresh_interval`, and never under 1 s."""
    return max(min_refresh_interval, MIN_LIFETIME_FLOOR)


def sendable(value: str) -> bool:
    """True when `value` can travel as `Bearer <value>`: no control character or space to break the head."""
    return _SENDABLE.fullmatch(value) is not None


class TokenAnswer(Protocol):
    """What `expiry_of` reads of a token endpoint's answer (the auth layer's `TokenResponse`)."""

    @property
    def access_token(self) -> str:
        """The access token as the endpoint gave it."""

    @property
    def expires_in(self) -> float | None:
        """Its stated lifetime in seconds, if the answer stated one."""


def expiry_of(response: TokenAnswer, obtained_at: float, default_lifetime: float) -> float:
    """When the token expires: `expires_in`, else the JWT's `exp`, else the default lifetime.

    A zero, negative or missing `expires_in` says nothing (the JWT's `exp` or the
    default decides). An `exp` that is not a number is ignored; one that is a
    number but not a finite one (NaN, Infinity, 400 digits) makes the answer
    malformed: GrantError. An `exp` in the past is returned as it is (the
    caller warns and applies the floor).
    """
    if response.expires_in is not None and response.expires_in > 0:
        return obtained_at + response.expires_in
    try:
        claims = jwt.decode(response.access_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = None
    if isinstance(claims, dict):
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            try:
                seconds = float(exp)
            except OverflowError:
                seconds = math.inf
            if not math.isfinite(seconds):
                raise GrantError("the access token's exp claim is not a finite number")
            return seconds
    return obtained_at + default_lifetime


def lifetime_warning(expires_at: float, obtained_at: float, floor: float) -> str | None:
    """Why a new token's stated expiry is not the one it is scheduled by, or None when it is."""
    lifetime = expires_at - obtained_at
    if lifetime >= floor:
        return None
    if lifetime <= 0:
        return (
            f"the new token was already expired when it arrived ({abs(lifetime):.0f}s ago by this machine's clock): "
            f"the token server's clock or this one is wrong (clock skew); using it for {floor:g}s"
        )
    return (
        f"the new token lives {lifetime:.3g}s, less than {floor:g}s (min_refresh_interval, at least 1s); "
        f"if the token server's clock differs from this one (clock skew), fix it; using it for {floor:g}s"
    )

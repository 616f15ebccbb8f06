"""`grant = "static"`: a fixed token, for trying tokenproxy out or for tokens that never change."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ...core.token import fingerprint
from ..protocol import GrantContext, GrantType, Problem, RequestShape, TokenResponse
from ..settings import secret


@dataclass(frozen=True)
class StaticSettings:
    """The token to send."""

    access_token: str = field(default="", metadata=secret())


@dataclass(frozen=True)
class StaticGrant:
    """Gives the configured token, with the configured default lifetime."""

    access_token: str = field(repr=False)
    lifetime: float
    name: str = "static"
    uses_refresh_token: bool = False

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """The configured token, every time."""
        return TokenResponse(self.access_token, expires_in=self.lifetime)


def check(settings: StaticSettings) -> Sequence[Problem]:
    """A missing token."""
    return [] if settings.access_token else [("access_token", "is required for grant 'static'")]


def build(settings: StaticSettings, context: GrantContext) -> StaticGrant:
    """The grant these settings describe."""
    return StaticGrant(settings.access_token, context.default_lifetime)


def identity(settings: StaticSettings) -> tuple[str, str, str]:
    """No endpoint, client or user: every static token is the same credential (the token is no identity)."""
    return "", "", ""


def request(settings: StaticSettings) -> RequestShape:
    """The token itself (by its fingerprint): there is no request, and another token is another answer."""
    return (("access_token", fingerprint(settings.access_token)),)


GRANT = GrantType("static", StaticSettings, check, build, identity, uses_refresh_token=False, request=request)

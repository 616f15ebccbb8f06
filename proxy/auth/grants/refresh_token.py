"""`grant = "refresh_token"`: exchange a (rotating) refresh token for an access token (RFC 6749 §6)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...core.errors import FailureKind, GrantError
from ..endpoint import TokenEndpoint
from ..protocol import GrantContext, GrantType, Problem, TokenResponse
from .oauth import OAuthSettings, client_identity, oauth_problems, request_fields, token_endpoint


@dataclass(frozen=True)
class RefreshTokenSettings(OAuthSettings):
    """An OAuth client's keys; the refresh token itself is the credential's, kept by the token manager."""


@dataclass(frozen=True)
class RefreshTokenGrant:
    """Presents the current refresh token; the answer may rotate it."""

    endpoint: TokenEndpoint
    fields: dict[str, str]  # scope and audience, when configured
    name: str = "refresh_token"
    uses_refresh_token: bool = True

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """POST the refresh token to the token endpoint and read the token from its answer."""
        if not refresh_token:
            raise GrantError("no refresh token is known", kind=FailureKind.LOGIN_REQUIRED, oauth_error="invalid_grant")
        form = {"grant_type": self.name, "refresh_token": refresh_token, **self.fields}
        return await self.endpoint.request(form, spends_refresh_token=True)


def check(settings: RefreshTokenSettings) -> Sequence[Problem]:
    """The client's problems; whether a refresh token is known is the token section's check."""
    return oauth_problems(settings)


def build(settings: RefreshTokenSettings, context: GrantContext) -> RefreshTokenGrant:
    """The grant these settings describe."""
    return RefreshTokenGrant(token_endpoint(settings, context), request_fields(settings))


GRANT = GrantType(
    "refresh_token", RefreshTokenSettings, check, build, client_identity, uses_refresh_token=True
)

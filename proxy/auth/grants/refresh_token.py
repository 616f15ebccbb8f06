"""`grant = "refresh_token"`: exchange a (rotating) refresh token for an access token (RFC 6749 §6)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...core.errors import FailureKind, GrantError
from ..protocol import GrantContext, GrantType, Problem, TokenResponse
from .oauth import (
    OAuthGrant,
    OAuthSettings,
    client_identity,
    oauth_problems,
    oauth_request,
    request_fields,
    token_endpoint,
)


@dataclass(frozen=True)
class RefreshTokenGrant(OAuthGrant):
    """Presents the current refresh token; the answer may rotate it."""

    name: str = "refresh_token"
    uses_refresh_token: bool = True

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """POST the refresh token to the token endpoint and read the token from its answer."""
        if not refresh_token:
            raise GrantError("no refresh token is known", kind=FailureKind.LOGIN_REQUIRED, oauth_error="invalid_grant")
        form = {"grant_type": self.name, "refresh_token": refresh_token, **self.fields}
        return await self.endpoint.request(form, spends_refresh_token=True)


def check(settings: OAuthSettings) -> Sequence[Problem]:
    """The client's problems; whether a refresh token is known is the token section's check.

    The settings are an OAuth client's keys alone: the refresh token is the credential's, kept by the token manager.
    """
    return oauth_problems(settings)


def build(settings: OAuthSettings, context: GrantContext) -> RefreshTokenGrant:
    """The grant these settings describe."""
    return RefreshTokenGrant(token_endpoint(settings, context), request_fields(settings))


GRANT = GrantType(
    "refresh_token", OAuthSettings, check, build, client_identity, uses_refresh_token=True, request=oauth_request
)

"""`grant = "client_credentials"`: a machine-to-machine token for the client itself (RFC 6749 §4.4)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
class ClientCredentialsGrant(OAuthGrant):
    """Asks for a token with the client's own credentials; no refresh token is involved."""

    name: str = "client_credentials"
    uses_refresh_token: bool = False

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """POST the client's grant to the token endpoint and read the token from its answer."""
        return await self.endpoint.request({"grant_type": self.name, **self.fields}, spends_refresh_token=False)


def check(settings: OAuthSettings) -> Sequence[Problem]:
    """The client's problems, and a missing client id."""
    problems = oauth_problems(settings)
    if not settings.client_id:
        problems.append(("client_id", "is required for grant 'client_credentials'"))
    return problems


def build(settings: OAuthSettings, context: GrantContext) -> ClientCredentialsGrant:
    """The grant these settings describe."""
    return ClientCredentialsGrant(token_endpoint(settings, context), request_fields(settings))


GRANT = GrantType(
    "client_credentials",
    OAuthSettings,
    check,
    build,
    client_identity,
    uses_refresh_token=False,
    request=oauth_request,
)

"""`grant = "password"`: a token for a user's name and password (RFC 6749 §4.3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..protocol import GrantContext, GrantType, Problem, RequestShape, TokenResponse
from ..settings import secret
from .oauth import OAuthGrant, OAuthSettings, oauth_problems, oauth_request, request_fields, token_endpoint


@dataclass(frozen=True)
class PasswordSettings(OAuthSettings):
    """An OAuth client's keys, and the user's name and password."""

    username: str = ""
    password: str = field(default="", metadata=secret())


@dataclass(frozen=True)
class PasswordGrant(OAuthGrant):
    """Sends the user's name and password with each token request."""

    username: str
    password: str = field(repr=False)
    name: str = "password"
    uses_refresh_token: bool = False

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """POST the user's credentials to the token endpoint and read the token from its answer."""
        form = {"grant_type": self.name, "username": self.username, "password": self.password, **self.fields}
        return await self.endpoint.request(form, spends_refresh_token=False)


def check(settings: PasswordSettings) -> Sequence[Problem]:
    """The client's problems, and a missing user name or password."""
    problems = oauth_problems(settings, ("username", "password"))
    for name in ("username", "password"):
        if not getattr(settings, name):
            problems.append((name, "is required for grant 'password'"))
    return problems


def build(settings: PasswordSettings, context: GrantContext) -> PasswordGrant:
    """The grant these settings describe."""
    endpoint = token_endpoint(settings, context)
    return PasswordGrant(endpoint, request_fields(settings), settings.username, settings.password)


def identity(settings: PasswordSettings) -> tuple[str, str, str]:
    """The endpoint, the client and the user: each user's token is a credential of its own."""
    return settings.token_url, settings.client_id, settings.username


def request(settings: PasswordSettings) -> RequestShape:
    """What shapes the request, the secrets aside: the client's keys and the user's name."""
    return (*oauth_request(settings), ("username", settings.username))


GRANT = GrantType("password", PasswordSettings, check, build, identity, uses_refresh_token=False, request=request)

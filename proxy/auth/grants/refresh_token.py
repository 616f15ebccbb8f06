"""`grant = "refresh_token"`: exchange a (rotating) refresh token for an access token (RFC 6749 §6).

With `login = "password"` or `"client_credentials"`, a missing or rejected
refresh token is not the end: the grant logs in again with that grant (its
keys in the same `[token]` table), and the login's refresh token continues
the chain.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...core.errors import FailureKind, GrantError
from ..protocol import Grant, GrantContext, GrantType, Problem, RequestShape, TokenResponse
from ..settings import secret
from .client_credentials import ClientCredentialsGrant
from .oauth import (
    OAuthGrant,
    OAuthSettings,
    oauth_problems,
    oauth_request,
    request_fields,
    token_endpoint,
)
from .password import PasswordGrant

logger = logging.getLogger("tokenproxy.auth")

# `token.login`: the grants a refresh_token credential may log in again with ("" for none).
LOGIN_GRANTS = ("password", "client_credentials")


@dataclass(frozen=True)
class RefreshSettings(OAuthSettings):
    """An OAuth client's keys, and the grant to log in with when there is no usable refresh token."""

    login: str = ""
    username: str = ""
    password: str = field(default="", metadata=secret())


@dataclass(frozen=True)
class RefreshTokenGrant(OAuthGrant):
    """Presents the current refresh token; the answer may rotate it."""

    name: str = "refresh_token"
    uses_refresh_token: bool = True

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """POST the refresh token to the token endpoint and read the token from its answer."""
        if not refresh_token:
            raise GrantError("no refresh token is known", kind=FailureKind.LOGIN_REQUIRED)
        form = {"grant_type": self.name, "refresh_token": refresh_token, **self.fields}
        return await self.endpoint.request(form, spends_refresh_token=True)


@dataclass(frozen=True)
class LoginFallback:
    """The refresh token grant, falling back to a login grant when the refresh token is missing or refused.

    The login's answer (and its refresh token, which the token manager saves
    as it saves a rotated one) takes the refresh's place; one WARNING names
    the fallback. A login that fails is that login's failure. Called by the
    token manager under its one refresh, like any grant.
    """

    refresh: RefreshTokenGrant
    login: Grant
    name: str = "refresh_token"
    uses_refresh_token: bool = True

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """Refresh; on a missing or rejected refresh token, log in with the configured grant instead."""
        try:
            return await self.refresh.fetch(refresh_token)
        except GrantError as exc:
            if exc.kind is not FailureKind.LOGIN_REQUIRED:
                raise
            reason = exc.oauth_error if refresh_token else "none is known"
        logger.warning(
            "refresh token unusable (%s); logging in again with grant %s (token.login)", reason, self.login.name
        )
        return await self.login.fetch(None)


def check(settings: OAuthSettings) -> Sequence[Problem]:
    """The client's problems, and the login grant's; whether a refresh token is known is the token section's check.

    The settings are an OAuth client's keys alone: the refresh token is the credential's, kept by the token manager.
    """
    problems = oauth_problems(settings, ("refresh_token", *_login_fields(settings)))
    if not isinstance(settings, RefreshSettings):
        return problems
    if settings.login and settings.login not in LOGIN_GRANTS:
        problems.append(("login", f"must be one of {', '.join(LOGIN_GRANTS)} or empty, got {settings.login!r}"))
    if settings.login == "password":
        for name in ("username", "password"):
            if not getattr(settings, name):
                problems.append((name, "is required for login 'password'"))
    if settings.login == "client_credentials" and not settings.client_id:
        problems.append(("client_id", "is required for login 'client_credentials'"))
    return problems


def _login_of(settings: OAuthSettings) -> str:
    """The login grant, from settings that may be an OAuth client's keys alone (no login then)."""
    return settings.login if isinstance(settings, RefreshSettings) else ""


def _login_fields(settings: OAuthSettings) -> tuple[str, ...]:
    return ("username", "password") if _login_of(settings) == "password" else ()


def build(settings: OAuthSettings, context: GrantContext) -> Grant:
    """The grant these settings describe: the refresh alone, or with its login fallback."""
    endpoint = token_endpoint(settings, context)
    fields = request_fields(settings)
    refresh = RefreshTokenGrant(endpoint, fields)
    if not isinstance(settings, RefreshSettings):
        return refresh
    if settings.login == "password":
        return LoginFallback(refresh, PasswordGrant(endpoint, fields, settings.username, settings.password))
    if settings.login == "client_credentials":
        return LoginFallback(refresh, ClientCredentialsGrant(endpoint, fields))
    return refresh


def identity(settings: OAuthSettings) -> tuple[str, str, str]:
    """The endpoint and client id, and the user a password login is for."""
    user = settings.username if isinstance(settings, RefreshSettings) and settings.login == "password" else ""
    return settings.token_url, settings.client_id, user


def request(settings: OAuthSettings) -> RequestShape:
    """An OAuth client's request shape, and the login grant (and its user) when one is configured."""
    if not isinstance(settings, RefreshSettings) or not settings.login:
        return oauth_request(settings)
    user = (("username", settings.username),) if settings.login == "password" else ()
    return (*oauth_request(settings), ("login", settings.login), *user)


GRANT = GrantType("refresh_token", RefreshSettings, check, build, identity, uses_refresh_token=True, request=request)

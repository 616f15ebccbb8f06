"""What every RFC 6749 grant shares: the client's settings, their checks, and the endpoint they make.

Owns: the keys of an OAuth client (token endpoint, client id and secret,
client authentication method, scope, audience), their checks and how they
become a TokenEndpoint. Each OAuth grant's module adds its own keys and
form fields on top. Knows nothing of the grants that are not OAuth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..client_auth import CLIENT_AUTH
from ..endpoint import TokenEndpoint
from ..protocol import GrantContext, Problem, RequestShape
from ..settings import secret, url_problems


@dataclass(frozen=True)
class OAuthSettings:
    """The keys of an OAuth client talking to a token endpoint."""

    token_url: str = ""
    client_id: str = ""
    client_secret: str = field(default="", metadata=secret())
    client_auth: str = "basic"
    scope: str = ""
    audience: str = ""


@dataclass(frozen=True)
class OAuthGrant:
    """What every OAuth grant holds: its token endpoint, and the optional fields each request carries."""

    endpoint: TokenEndpoint
    fields: dict[str, str]  # scope and audience, when configured


def oauth_problems(settings: OAuthSettings) -> list[Problem]:
    """The problems every OAuth grant checks: the client authentication method and the token endpoint."""
    problems: list[Problem] = []
    if settings.client_auth not in CLIENT_AUTH:
        problems.append(("client_auth", f"must be one of {', '.join(CLIENT_AUTH)}, got {settings.client_auth!r}"))
    problems += url_problems("token_url", settings.token_url)
    return problems


def token_endpoint(settings: OAuthSettings, context: GrantContext) -> TokenEndpoint:
    """The token endpoint these settings describe, reached through the context's session."""
    client = CLIENT_AUTH[settings.client_auth](settings.client_id, settings.client_secret)
    return TokenEndpoint(context.session, settings.token_url, client, context.timeout)


def request_fields(settings: OAuthSettings) -> dict[str, str]:
    """The optional form fields every OAuth token request carries when configured: scope and audience."""
    fields = {}
    if settings.scope:
        fields["scope"] = settings.scope
    if settings.audience:
        fields["audience"] = settings.audience
    return fields


def oauth_request(settings: OAuthSettings) -> RequestShape:
    """What shapes an OAuth client's token request, the client secret aside: the endpoint, the client,
    how it authenticates, and the scope and audience asked for."""
    return (
        ("token_url", settings.token_url),
        ("client_id", settings.client_id),
        ("client_auth", settings.client_auth),
        ("scope", settings.scope),
        ("audience", settings.audience),
    )


def client_identity(settings: OAuthSettings) -> tuple[str, str, str]:
    """What identifies an OAuth client's credential: its endpoint and client id (no user)."""
    return settings.token_url, settings.client_id, ""

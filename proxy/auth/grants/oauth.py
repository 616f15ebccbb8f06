"""What every RFC 6749 grant shares: the client's settings, their checks, and the endpoint they make.

Owns: the keys of an OAuth client (token endpoint, client id and secret,
client authentication method and its key or certificate, scope, audience,
extra form parameters), their checks and how they become a TokenEndpoint.
Each OAuth grant's module adds its own keys and form fields on top. Knows
nothing of the grants that are not OAuth.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..client_auth import (
    ASSERTION_ALGS,
    CLIENT_AUTH,
    CLIENT_AUTH_METHODS,
    PRIVATE_KEY_JWT,
    TLS_CLIENT_AUTH,
    ClientAuth,
    KeyFileError,
    PrivateKeyJwt,
    TlsClientAuth,
    load_signing_key,
)
from ..endpoint import TokenEndpoint
from ..protocol import GrantContext, Problem, RequestShape
from ..settings import secret, url_problems

# Form fields the client authentication methods set: `[token.params]` may not name them.
CLIENT_FIELDS = ("client_id", "client_secret", "client_assertion_type", "client_assertion")


@dataclass(frozen=True)
class OAuthSettings:
    """The keys of an OAuth client talking to a token endpoint."""

    token_url: str = ""
    client_id: str = ""
    client_secret: str = field(default="", metadata=secret())
    client_auth: str = "basic"
    scope: str = ""
    audience: str = ""
    client_key_file: str = ""  # private_key_jwt: the PEM key signing assertions; tls_client_auth: the cert's key
    client_key_id: str = ""  # private_key_jwt: the `kid` header, when the server keeps several keys
    client_assertion_alg: str = ""  # private_key_jwt: RS256, PS256 or ES256; empty: the key's own (RS256, ES256)
    client_assertion_audience: str = ""  # private_key_jwt: `aud`; empty: the token endpoint
    # tls_client_auth: the PEM certificate (chain) shown to the token endpoint; the token session is made once,
    # so a change takes a restart (the same "restart" marker as the schema's restart-only keys).
    client_cert_file: str = field(default="", metadata={"restart": True})
    params: Mapping[str, str] = field(default_factory=dict)  # extra form fields on every token request


@dataclass(frozen=True)
class OAuthGrant:
    """What every OAuth grant holds: its token endpoint, and the optional fields each request carries."""

    endpoint: TokenEndpoint
    fields: dict[str, str]  # scope and audience when configured, and `[token.params]`


def _file_problems(key: str, path: str, method: str) -> list[Problem]:
    if not path:
        return [(key, f"is required for client_auth {method!r}")]
    if not Path(path).expanduser().is_file():
        return [(key, f"no such file, got {path!r}")]
    return []


def client_auth_problems(settings: OAuthSettings) -> list[Problem]:
    """The problems of the client authentication method and what it needs (its key file is read and checked)."""
    method = settings.client_auth
    if method not in CLIENT_AUTH_METHODS:
        return [("client_auth", f"must be one of {', '.join(CLIENT_AUTH_METHODS)}, got {method!r}")]
    problems: list[Problem] = []
    if method in (PRIVATE_KEY_JWT, TLS_CLIENT_AUTH) and not settings.client_id:
        problems.append(("client_id", f"is required for client_auth {method!r}"))
    if method == PRIVATE_KEY_JWT:
        alg = settings.client_assertion_alg
        if alg and alg not in ASSERTION_ALGS:
            problems.append(("client_assertion_alg", f"must be one of {', '.join(ASSERTION_ALGS)}, got {alg!r}"))
            alg = ""
        problems += url_problems("client_assertion_audience", settings.client_assertion_audience, required=False)
        found = _file_problems("client_key_file", settings.client_key_file, method)
        if not found:
            try:
                load_signing_key(settings.client_key_file, alg)
            except KeyFileError as exc:
                found.append(("client_key_file", str(exc)))
        problems += found
    if method == TLS_CLIENT_AUTH:
        found = _file_problems("client_cert_file", settings.client_cert_file, method)
        found += _file_problems("client_key_file", settings.client_key_file, method)
        if not found:
            try:
                ssl.create_default_context().load_cert_chain(
                    Path(settings.client_cert_file).expanduser(), Path(settings.client_key_file).expanduser()
                )
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or type(exc).__name__
                found.append(
                    ("client_cert_file", f"cannot be used with token.client_key_file ({reason}), "
                     f"got {settings.client_cert_file!r}")
                )
        problems += found
    return problems


def params_problems(settings: OAuthSettings, grant_fields: Iterable[str]) -> list[Problem]:
    """`[token.params]` keys that the grant or the client authentication already set (they would be overridden)."""
    taken = {"grant_type", *CLIENT_FIELDS, *grant_fields, *_configured_fields(settings)}
    return [
        (f"params.{name}", "is set by the grant or client_auth itself; it cannot be given in [token.params]")
        for name in settings.params
        if name in taken
    ]


def oauth_problems(settings: OAuthSettings, grant_fields: Iterable[str] = ()) -> list[Problem]:
    """The problems every OAuth grant checks: the client authentication, the token endpoint, the extra params.

    `grant_fields` are the form fields the grant itself sets, which `[token.params]` may not name.
    """
    problems = client_auth_problems(settings)
    problems += url_problems("token_url", settings.token_url)
    problems += params_problems(settings, grant_fields)
    return problems


def client_auth(settings: OAuthSettings) -> ClientAuth:
    """The client authentication method these settings name; a private_key_jwt key file is read here, once."""
    if settings.client_auth == PRIVATE_KEY_JWT:
        key, alg = load_signing_key(settings.client_key_file, settings.client_assertion_alg)
        audience = settings.client_assertion_audience or settings.token_url
        return PrivateKeyJwt(settings.client_id, key, alg, audience, settings.client_key_id)
    if settings.client_auth == TLS_CLIENT_AUTH:
        return TlsClientAuth(settings.client_id)
    return CLIENT_AUTH[settings.client_auth](settings.client_id, settings.client_secret)


def token_endpoint(settings: OAuthSettings, context: GrantContext) -> TokenEndpoint:
    """The token endpoint these settings describe, reached through the context's session."""
    return TokenEndpoint(context.session, settings.token_url, client_auth(settings), context.timeout)


def _configured_fields(settings: OAuthSettings) -> dict[str, str]:
    fields = {}
    if settings.scope:
        fields["scope"] = settings.scope
    if settings.audience:
        fields["audience"] = settings.audience
    return fields


def request_fields(settings: OAuthSettings) -> dict[str, str]:
    """The optional form fields every OAuth token request carries: scope and audience when configured,
    then `[token.params]`."""
    return {**_configured_fields(settings), **settings.params}


def oauth_request(settings: OAuthSettings) -> RequestShape:
    """What shapes an OAuth client's token request, the client secret aside: the endpoint, the client,
    how it authenticates (and with which key or certificate), the scope and audience asked for, the extra params."""
    shape: RequestShape = (
        ("token_url", settings.token_url),
        ("client_id", settings.client_id),
        ("client_auth", settings.client_auth),
        ("scope", settings.scope),
        ("audience", settings.audience),
    )
    extra = (
        ("client_key_file", settings.client_key_file),
        ("client_key_id", settings.client_key_id),
        ("client_assertion_alg", settings.client_assertion_alg),
        ("client_assertion_audience", settings.client_assertion_audience),
        ("client_cert_file", settings.client_cert_file),
        ("params", json.dumps(sorted(settings.params.items())) if settings.params else ""),
    )
    # Keys left at their defaults are not part of the shape, so a config without them keeps the shape it had.
    return shape + tuple((key, value) for key, value in extra if value)


def client_identity(settings: OAuthSettings) -> tuple[str, str, str]:
    """What identifies an OAuth client's credential: its endpoint and client id (no user)."""
    return settings.token_url, settings.client_id, ""

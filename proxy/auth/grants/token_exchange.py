"""`grant = "token_exchange"`: exchange a token the proxy is given for one the API accepts (RFC 8693).

Owns: the subject token's keys (a file re-read at every exchange, such as a
Kubernetes projected service account token, or a value from `${ENV}`), the
token types, `resource`, and the exchange's form. The client authenticates
as in every OAuth grant (or not at all, with `client_auth = "none"` and no
client id). Not a rotating grant: each exchange presents the subject token anew.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...core.errors import GrantError
from ..protocol import GrantContext, GrantType, Problem, RequestShape, TokenResponse
from ..settings import secret, url_problems
from .oauth import (
    OAuthGrant,
    OAuthSettings,
    client_identity,
    oauth_problems,
    oauth_request,
    request_fields,
    token_endpoint,
)

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
# The most a subject token file may hold: a JWT is a few KiB.
MAX_SUBJECT_TOKEN_BYTES = 64 * 1024
# The form fields this grant sets itself, which `[token.params]` may not name.
EXCHANGE_FIELDS = ("subject_token", "subject_token_type", "requested_token_type", "resource")


@dataclass(frozen=True)
class TokenExchangeSettings(OAuthSettings):
    """An OAuth client's keys, the subject token (a file or a value) and what is asked for."""

    subject_token_file: str = ""
    subject_token: str = field(default="", metadata=secret())
    subject_token_type: str = JWT_TOKEN_TYPE
    requested_token_type: str = ""
    resource: str = ""


def read_subject_token(path: str) -> str:
    """The subject token in `path`, read now (it may have been rotated); GrantError naming the file if unusable."""
    try:
        with Path(path).expanduser().open("rb") as handle:
            data = handle.read(MAX_SUBJECT_TOKEN_BYTES + 1)
    except OSError as exc:
        raise GrantError(f"subject token file {path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_SUBJECT_TOKEN_BYTES:
        raise GrantError(f"subject token file {path}: larger than {MAX_SUBJECT_TOKEN_BYTES // 1024} KiB")
    token = data.decode("utf-8", "replace").strip()
    if not token:
        raise GrantError(f"subject token file {path}: is empty")
    return token


@dataclass(frozen=True)
class TokenExchangeGrant(OAuthGrant):
    """Presents the subject token (re-read from its file each time) and reads the issued token."""

    subject_token_file: str = ""
    subject_token: str = field(default="", repr=False)
    exchange_fields: dict[str, str] = field(default_factory=dict)  # the token types and resource
    name: str = "token_exchange"
    uses_refresh_token: bool = False

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """POST the exchange to the token endpoint and read the issued token from its answer."""
        subject = read_subject_token(self.subject_token_file) if self.subject_token_file else self.subject_token
        form = {"grant_type": GRANT_TYPE, "subject_token": subject, **self.exchange_fields, **self.fields}
        return await self.endpoint.request(form, spends_refresh_token=False)


def check(settings: TokenExchangeSettings) -> Sequence[Problem]:
    """The client's problems; exactly one subject token source, its file present; the token types."""
    problems = oauth_problems(settings, EXCHANGE_FIELDS)
    if settings.subject_token_file and settings.subject_token:
        problems.append(("subject_token", "give token.subject_token_file or token.subject_token, not both"))
    elif not settings.subject_token_file and not settings.subject_token:
        problems.append(("subject_token_file", "is required for grant 'token_exchange' (or token.subject_token)"))
    elif settings.subject_token_file and not Path(settings.subject_token_file).expanduser().is_file():
        problems.append(("subject_token_file", f"no such file, got {settings.subject_token_file!r}"))
    if not settings.subject_token_type:
        problems.append(("subject_token_type", "must not be empty"))
    if settings.resource:
        problems += url_problems("resource", settings.resource)
    return problems


def _exchange_fields(settings: TokenExchangeSettings) -> dict[str, str]:
    fields = {"subject_token_type": settings.subject_token_type}
    if settings.requested_token_type:
        fields["requested_token_type"] = settings.requested_token_type
    if settings.resource:
        fields["resource"] = settings.resource
    return fields


def build(settings: TokenExchangeSettings, context: GrantContext) -> TokenExchangeGrant:
    """The grant these settings describe."""
    return TokenExchangeGrant(
        token_endpoint(settings, context),
        request_fields(settings),
        subject_token_file=settings.subject_token_file,
        subject_token=settings.subject_token,
        exchange_fields=_exchange_fields(settings),
    )


def request(settings: TokenExchangeSettings) -> RequestShape:
    """An OAuth client's request shape, the subject token's source (a file by its path) and what is asked for."""
    return (
        *oauth_request(settings),
        ("subject_token_file", settings.subject_token_file),
        *sorted(_exchange_fields(settings).items()),
    )


GRANT = GrantType(
    "token_exchange",
    TokenExchangeSettings,
    check,
    build,
    client_identity,
    uses_refresh_token=False,
    request=request,
)

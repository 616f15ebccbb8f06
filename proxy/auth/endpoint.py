"""The one call to a token endpoint, and reading what it answers.

Owns: sending one token request (bounded by a timeout, no redirects),
transport failures described without secrets, reading an answer of at most
MAX_ANSWER_BYTES, RFC 6749 §5.1 success fields and §5.2 error codes turned
into a FailureKind. Every OAuth grant calls `TokenEndpoint.request`; the
`json` grant shares `exchange` and the answer reading. Knows nothing of
which grant is asking, of caching or of concurrency. Messages never
contain a token or secret.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from ..core.causes import cause_in_words, safe_url
from ..core.errors import FailureKind, GrantError
from .client_auth import ClientAuth
from .protocol import BadAnswer, TokenResponse

# The most a token endpoint's answer may be: a token answer is a few KiB; more is
# a broken or hostile endpoint, refused after reading at most one byte beyond it.
MAX_ANSWER_BYTES = 1 << 20

# OAuth error codes (§5.2) that retrying with the same configuration cannot fix.
FINAL_OAUTH_ERRORS = frozenset(
    {"invalid_grant", "invalid_client", "unauthorized_client", "unsupported_grant_type", "invalid_scope"}
)


def failure_kind(oauth_error: str, *, spends_refresh_token: bool) -> FailureKind:
    """What an endpoint's error code means for the next attempt.

    `invalid_grant` for a refresh token is a refused login; the other final
    codes are a configuration to fix; any other code may pass.
    """
    if oauth_error not in FINAL_OAUTH_ERRORS:
        return FailureKind.TRANSIENT
    if oauth_error == "invalid_grant" and spends_refresh_token:
        return FailureKind.LOGIN_REQUIRED
    return FailureKind.MISCONFIGURED


def describe_transport_error(exc: BaseException, url: str, timeout: float, what: str = "token endpoint") -> str:
    """A transport failure in words: the endpoint as scheme://host:port/path, and what went wrong.

    Never the query string, userinfo or a secret; never an exception's class name alone.
    """
    where = f"{what} {safe_url(url)}"
    if isinstance(exc, asyncio.TimeoutError):
        return f"{where}: timed out after {timeout:g} s (token.timeout)"
    cause = cause_in_words(exc, host=urlsplit(url).hostname)
    if cause is None:
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            cause = "closed the connection without answering"
        elif isinstance(exc, aiohttp.ClientPayloadError):
            cause = "its answer broke off"
        elif isinstance(exc, aiohttp.ClientResponseError):
            cause = "its answer was not valid HTTP"
        else:
            cause = f"the connection failed ({type(exc).__name__})"
    return f"{where}: {cause}"


async def read_answer(resp: aiohttp.ClientResponse) -> bytes:
    """The answer's body, at most MAX_ANSWER_BYTES: more is a GrantError and the connection is dropped.

    Reads no more than one byte beyond the cap, never the whole of a larger answer.
    """
    declared = resp.content_length
    chunks: list[bytes] = []
    size = 0
    if declared is None or declared <= MAX_ANSWER_BYTES:
        while size <= MAX_ANSWER_BYTES:
            chunk = await resp.content.read(MAX_ANSWER_BYTES + 1 - size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
    resp.close()  # drop the connection: the rest of the answer is never read
    raise GrantError(f"token endpoint's answer is larger than {MAX_ANSWER_BYTES // 1024} KiB")


@dataclass(frozen=True)
class Answer:
    """A token endpoint's answer, read whole: status, content type, headers and body."""

    status: int
    content_type: str
    headers: CIMultiDictProxy[str]
    body: bytes


async def exchange(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    data: Any,
    headers: Mapping[str, str],
    timeout: float,
    refuse: Callable[[int], GrantError | None],
    what: str = "token endpoint",
) -> Answer:
    """Send one request to a token endpoint and read its answer (at most MAX_ANSWER_BYTES).

    `what` names the endpoint in messages. `refuse(status)` gives the error for a status whose body is of no use:
    the connection is dropped unread and the error raised. A transport
    failure or timeout is a transient GrantError naming the endpoint (no
    query string) and the cause in words.
    """
    try:
        async with session.request(
            method,
            url,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            error = refuse(resp.status)
            if error is not None:
                resp.close()
                raise error
            return Answer(resp.status, resp.content_type, resp.headers, await read_answer(resp))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise GrantError(describe_transport_error(exc, url, timeout, what)) from None


def _json_number(text: str) -> int | float:
    """An integer from the answer; one too long for int() (4300 digits) becomes a float (inf)."""
    return int(text) if len(text) <= 1000 else float(text)


def parse_json(body: bytes, content_type: str, rotated: str | None = None, *, url: str = "") -> Any:
    """The answer's JSON; BadAnswer (keeping `rotated`) when it is not JSON, naming `url` when given."""
    try:
        return json.loads(body, parse_int=_json_number)
    except (ValueError, RecursionError):
        kind = content_type or "no content type"
        where = f"token endpoint {safe_url(url)}:" if url else "token endpoint"
        raise BadAnswer(f"{where} answered with something that is not JSON ({kind})", refresh_token=rotated) from None


def lifetime(value: Any, what: str, rotated: str | None) -> float | None:
    """The stated lifetime in seconds; None when absent, not a number, zero or negative (unknown).

    A value that reads as a number but is not a finite one (NaN, Infinity, a
    number too large for a float) is no lifetime at all: the answer is
    malformed (BadAnswer, keeping the rotated refresh token).
    """
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    except (TypeError, ValueError):
        return None
    if not math.isfinite(seconds):
        raise BadAnswer(f"{what} is not a finite number of seconds", refresh_token=rotated)
    return seconds if seconds > 0 else None


def text_or_none(value: Any) -> str | None:
    """A non-empty string from the answer, else None."""
    return value if isinstance(value, str) and value else None


def token_response(
    access: Any,
    expires_in: Any,
    rotated: str | None,
    access_name: str,
    expires_name: str,
    *,
    token_type: str | None = None,
    scope: str | None = None,
) -> TokenResponse:
    """The TokenResponse in a 2xx answer's fields, or BadAnswer carrying the rotated refresh token."""
    if not isinstance(access, str) or not access:
        raise BadAnswer(f"token endpoint's answer has no {access_name}", refresh_token=rotated)
    seconds = lifetime(expires_in, f"the answer's {expires_name}", rotated)
    return TokenResponse(access, seconds, rotated, token_type, scope)


def _server_trouble(url: str, status: int) -> GrantError | None:
    """A 5xx or 429 is the endpoint's trouble, not an answer about the request: its body is not read."""
    if status >= 500 or status == 429:
        return GrantError(f"token endpoint {safe_url(url)}: answered {status}")
    return None


def _what_came(answer: Answer) -> str:
    """What a non-OAuth answer's body was, by its content type; the body itself is never shown."""
    if not answer.body:
        return "an empty body"
    kind = answer.content_type
    if kind == "text/html":
        return "an HTML page (text/html)"
    if kind == "application/octet-stream" and "Content-Type" not in answer.headers:
        return "a body without a content type"
    return f"a {kind} body"


def oauth_error(answer: Answer, *, spends_refresh_token: bool, url: str = "") -> GrantError:
    """The failure a non-200 answer stands for: the §5.2 error code as data, with its FailureKind.

    An answer without an OAuth error names the endpoint (`url`, shown without
    its query), the status and the kind of body that came instead.
    """
    code = None
    try:
        data = json.loads(answer.body, parse_int=_json_number)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            code = data["error"]
    except (ValueError, RecursionError):
        pass
    if code is None:
        where = f"token endpoint {safe_url(url)}" if url else "token endpoint"
        return GrantError(f"{where}: answered {answer.status} with {_what_came(answer)}, not an OAuth error")
    kind = failure_kind(code, spends_refresh_token=spends_refresh_token)
    return GrantError(f"token endpoint refused: {code}", oauth_error=code, kind=kind)


def oauth_token(answer: Answer, url: str = "") -> TokenResponse:
    """The §5.1 fields of a 200 answer; the rotated refresh token is read first, to survive what else is wrong."""
    data = parse_json(answer.body, answer.content_type, url=url)
    if not isinstance(data, dict):
        raise BadAnswer("token endpoint's answer has no access_token")
    rotated = text_or_none(data.get("refresh_token"))
    return token_response(
        data.get("access_token"),
        data.get("expires_in"),
        rotated,
        "access_token",
        "expires_in",
        token_type=text_or_none(data.get("token_type")),
        scope=text_or_none(data.get("scope")),
    )


@dataclass(frozen=True)
class TokenEndpoint:
    """An OAuth 2.0 token endpoint as one client reaches it: its URL, the client's authentication, a timeout."""

    session: aiohttp.ClientSession = field(repr=False, compare=False)
    url: str
    client: ClientAuth
    timeout: float

    async def request(self, form: dict[str, str], *, spends_refresh_token: bool) -> TokenResponse:
        """POST one token request (form-encoded, client authentication added) and read the token.

        `spends_refresh_token` says the form presents a refresh token, so that
        `invalid_grant` means the login is gone rather than a misconfiguration.
        """
        headers = {"Accept": "application/json"}
        self.client.apply(form, headers)
        answer = await exchange(
            self.session,
            "POST",
            self.url,
            data=form,
            headers=headers,
            timeout=self.timeout,
            refuse=functools.partial(_server_trouble, self.url),
        )
        if answer.status != 200:
            raise oauth_error(answer, spends_refresh_token=spends_refresh_token, url=self.url)
        return oauth_token(answer, self.url)

"""How a token is obtained: one small class per grant.

Owns: the wire format of each token endpoint (OAuth2 RFC 6749 grants, the
`json` grant for home-made refresh endpoints, a static token) and turning
its answers into a TokenResponse or a GrantError. Knows nothing of client
requests, caching or concurrency: each `fetch` is one call to the endpoint.
Messages never contain a token or secret.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from ..core.errors import FailureKind, GrantError

# The most a token endpoint's answer may be: a token answer is a few KiB; more is
# a broken or hostile endpoint, refused after reading at most one byte beyond it.
MAX_ANSWER_BYTES = 1 << 20

# OAuth error codes that retrying with the same configuration cannot fix.
FINAL_OAUTH_ERRORS = frozenset(
    {"invalid_grant", "invalid_client", "unauthorized_client", "unsupported_grant_type", "invalid_scope"}
)


class BadAnswer(GrantError):
    """A 2xx answer with no usable token in it.

    `refresh_token` is a rotated refresh token the answer did carry: the
    endpoint has spent the one presented, so this one must be kept and
    presented next, whatever else is wrong with the answer.
    """

    def __init__(self, reason: str, *, refresh_token: str | None = None) -> None:
        super().__init__(reason)
        self.refresh_token = refresh_token


@dataclass(frozen=True)
class TokenResponse:
    """What a token endpoint gave: the access token, its lifetime if stated, a rotated refresh token."""

    access_token: str
    expires_in: float | None = None
    refresh_token: str | None = None


class Grant(Protocol):
    """A way of obtaining an access token."""

    @property
    def name(self) -> str:
        """The grant's name, for logs and metrics."""

    @property
    def uses_refresh_token(self) -> bool:
        """True when each call spends (and may rotate) a refresh token."""

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """Ask the endpoint once; raise GrantError when no token comes back.

        A grant that calls an endpoint holds its own HTTP session (given when it
        is built); the caller does not know how a token is obtained.
        """


def _describe_transport_error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "token endpoint did not answer in time"
    return f"token endpoint unreachable ({type(exc).__name__})"


def _lifetime(value: Any, what: str, rotated: str | None) -> float | None:
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


def _rotated(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _answer(access: Any, expires_in: Any, rotated: str | None, access_name: str, expires_name: str) -> TokenResponse:
    """The TokenResponse in a 2xx answer's fields, or BadAnswer carrying the rotated refresh token."""
    if not isinstance(access, str) or not access:
        raise BadAnswer(f"token endpoint's answer has no {access_name}", refresh_token=rotated)
    return TokenResponse(access, _lifetime(expires_in, f"the answer's {expires_name}", rotated), rotated)


def _json_number(text: str) -> int | float:
    """An integer from the answer; one too long for int() (4300 digits) becomes a float (inf)."""
    return int(text) if len(text) <= 1000 else float(text)


def _parse_json(body: bytes, content_type: str, rotated: str | None = None) -> Any:
    try:
        return json.loads(body, parse_int=_json_number)
    except (ValueError, RecursionError):
        kind = content_type or "no content type"
        raise BadAnswer(
            f"token endpoint answered with something that is not JSON ({kind})", refresh_token=rotated
        ) from None


async def _read_answer(resp: aiohttp.ClientResponse) -> bytes:
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
class StaticGrant:
    """A fixed token, for trying tokenproxy out or for tokens that never change."""

    access_token: str
    lifetime: float
    name: str = "static"
    uses_refresh_token: bool = False

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """The configured token, every time."""
        return TokenResponse(self.access_token, expires_in=self.lifetime)


@dataclass(frozen=True)
class OAuthGrant:
    """An RFC 6749 token request: refresh_token, client_credentials or password."""

    session: aiohttp.ClientSession = field(repr=False, compare=False)
    name: str
    token_url: str
    client_id: str
    client_secret: str
    client_auth: str
    params: Mapping[str, str]  # grant-specific form fields besides grant_type
    scope: str = ""
    audience: str = ""
    timeout: float = 10.0

    @property
    def uses_refresh_token(self) -> bool:
        """True when each call spends (and may rotate) a refresh token."""
        return self.name == "refresh_token"

    def _request(self, refresh_token: str | None) -> tuple[dict[str, str], dict[str, str]]:
        form = {"grant_type": self.name, **self.params}
        if self.uses_refresh_token:
            if not refresh_token:
                raise GrantError(
                    "no refresh token is known", kind=FailureKind.LOGIN_REQUIRED, oauth_error="invalid_grant"
                )
            form["refresh_token"] = refresh_token
        if self.scope:
            form["scope"] = self.scope
        if self.audience:
            form["audience"] = self.audience
        headers = {"Accept": "application/json"}
        if self.client_auth == "basic" and self.client_id:
            # RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
            pair = f"{quote(self.client_id, safe='')}:{quote(self.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        elif self.client_id:
            form["client_id"] = self.client_id
            if self.client_auth == "post" and self.client_secret:
                form["client_secret"] = self.client_secret
        return form, headers

    def _failure_kind(self, oauth_error: str) -> FailureKind:
        if oauth_error not in FINAL_OAUTH_ERRORS:
            return FailureKind.TRANSIENT
        if oauth_error == "invalid_grant" and self.uses_refresh_token:
            return FailureKind.LOGIN_REQUIRED
        return FailureKind.MISCONFIGURED

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """POST the grant to the token endpoint and read the token from its answer."""
        form, headers = self._request(refresh_token)
        try:
            async with self.session.post(
                self.token_url,
                data=form,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                status, content_type = resp.status, resp.content_type
                if status >= 500 or status == 429:
                    resp.close()  # its body is of no use: not read
                    raise GrantError(f"token endpoint answered {status}")
                body = await _read_answer(resp)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise GrantError(_describe_transport_error(exc)) from None
        if status != 200:
            error = None
            try:
                data = json.loads(body, parse_int=_json_number)
                if isinstance(data, dict) and isinstance(data.get("error"), str):
                    error = data["error"]
            except (ValueError, RecursionError):
                pass
            if error is None:
                raise GrantError(f"token endpoint answered {status} without an OAuth error")
            raise GrantError(
                f"token endpoint refused: {error}",
                oauth_error=error,
                kind=self._failure_kind(error),
            )
        data = _parse_json(body, content_type)
        if not isinstance(data, dict):
            raise BadAnswer("token endpoint's answer has no access_token")
        # The rotated refresh token first: it must survive whatever else is wrong.
        rotated = _rotated(data.get("refresh_token"))
        return _answer(data.get("access_token"), data.get("expires_in"), rotated, "access_token", "expires_in")


def dotted_get(data: Any, path: str) -> Any:
    """The value at `a.b.0.c` inside nested JSON, or None."""
    if not path:
        return None
    for part in path.split("."):
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


def fill_template(template: Any, refresh_token: str) -> Any:
    """The JSON body template with `{refresh_token}` replaced in every string."""
    if isinstance(template, str):
        return template.replace("{refresh_token}", refresh_token)
    if isinstance(template, list):
        return [fill_template(item, refresh_token) for item in template]
    if isinstance(template, dict):
        return {key: fill_template(value, refresh_token) for key, value in template.items()}
    return template


@dataclass(frozen=True)
class JsonGrant:
    """A home-made refresh endpoint: JSON (or a cookie) in, JSON out."""

    session: aiohttp.ClientSession = field(repr=False, compare=False)
    url: str
    method: str
    headers: Mapping[str, str]
    body_template: Any  # parsed JSON, or None in cookie mode
    access_token_path: str
    refresh_token_path: str
    expires_in_path: str
    refresh_cookie: str
    timeout: float = 10.0
    name: str = "json"
    uses_refresh_token: bool = True

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """Send the refresh token as configured and read the answer's fields by their paths."""
        if not refresh_token:
            raise GrantError("no refresh token is known", kind=FailureKind.LOGIN_REQUIRED)
        headers = {"Accept": "application/json", **self.headers}
        body: bytes | None = None
        if self.refresh_cookie:
            # Sent as is: SimpleCookie would quote values with `/`, `+` or `=`,
            # and a server that does not unquote would see a different token.
            headers["Cookie"] = f"{self.refresh_cookie}={refresh_token}"
        else:
            body = json.dumps(fill_template(self.body_template, refresh_token)).encode()
            headers.setdefault("Content-Type", "application/json")
        try:
            async with self.session.request(
                self.method,
                self.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                status, content_type = resp.status, resp.content_type
                set_cookies = resp.headers.getall("Set-Cookie", [])
                if status in (400, 401, 403):
                    resp.close()
                    raise GrantError(
                        f"refresh endpoint rejected the refresh token ({status})", kind=FailureKind.LOGIN_REQUIRED
                    )
                if not 200 <= status < 300:
                    resp.close()
                    raise GrantError(f"refresh endpoint answered {status}")
                payload = await _read_answer(resp)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise GrantError(_describe_transport_error(exc)) from None
        # The rotated refresh token first (a cookie one even when the body is no JSON):
        # it must survive whatever else is wrong with the answer.
        rotated = self._cookie(set_cookies) if self.refresh_cookie else None
        data = _parse_json(payload, content_type, rotated)
        rotated = rotated or _rotated(dotted_get(data, self.refresh_token_path))
        return _answer(
            dotted_get(data, self.access_token_path),
            dotted_get(data, self.expires_in_path),
            rotated,
            self.access_token_path,
            self.expires_in_path,
        )

    def _cookie(self, set_cookies: list[str]) -> str | None:
        """The refresh cookie's value among the answer's Set-Cookie headers (the last one wins)."""
        rotated = None
        for header in set_cookies:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(header)
            except CookieError:  # a malformed Set-Cookie is skipped, not fatal
                continue
            if self.refresh_cookie in jar and jar[self.refresh_cookie].value:
                rotated = jar[self.refresh_cookie].value
        return rotated

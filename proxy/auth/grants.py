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
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from ..core.errors import GrantError

# OAuth error codes that retrying with the same configuration cannot fix.
FINAL_OAUTH_ERRORS = frozenset(
    {"invalid_grant", "invalid_client", "unauthorized_client", "unsupported_grant_type", "invalid_scope"}
)


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

    async def fetch(self, session: aiohttp.ClientSession, refresh_token: str | None) -> TokenResponse:
        """Ask the endpoint once; raise GrantError when no token comes back."""


def _describe_transport_error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "token endpoint did not answer in time"
    return f"token endpoint unreachable ({type(exc).__name__})"


def _lifetime(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


def _parse_json(body: bytes, content_type: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        kind = content_type or "no content type"
        raise GrantError(f"token endpoint answered with something that is not JSON ({kind})") from None


@dataclass(frozen=True)
class StaticGrant:
    """A fixed token, for trying tokenproxy out or for tokens that never change."""

    access_token: str
    lifetime: float
    name: str = "static"
    uses_refresh_token: bool = False

    async def fetch(self, session: aiohttp.ClientSession, refresh_token: str | None) -> TokenResponse:
        """The configured token, every time."""
        return TokenResponse(self.access_token, expires_in=self.lifetime)


@dataclass(frozen=True)
class OAuthGrant:
    """An RFC 6749 token request: refresh_token, client_credentials or password."""

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
                raise GrantError("no refresh token is known", oauth_error="invalid_grant", final=True, rejected=True)
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

    async def fetch(self, session: aiohttp.ClientSession, refresh_token: str | None) -> TokenResponse:
        """POST the grant to the token endpoint and read the token from its answer."""
        form, headers = self._request(refresh_token)
        try:
            async with session.post(
                self.token_url,
                data=form,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                status, content_type = resp.status, resp.content_type
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise GrantError(_describe_transport_error(exc)) from None
        if status >= 500 or status == 429:
            raise GrantError(f"token endpoint answered {status}")
        if status != 200:
            error = None
            try:
                data = json.loads(body)
                if isinstance(data, dict) and isinstance(data.get("error"), str):
                    error = data["error"]
            except ValueError:
                pass
            if error is None:
                raise GrantError(f"token endpoint answered {status} without an OAuth error")
            raise GrantError(
                f"token endpoint refused: {error}",
                oauth_error=error,
                final=error in FINAL_OAUTH_ERRORS,
                rejected=error == "invalid_grant" and self.uses_refresh_token,
            )
        data = _parse_json(body, content_type)
        if not isinstance(data, dict) or not isinstance(data.get("access_token"), str) or not data["access_token"]:
            raise GrantError("token endpoint's answer has no access_token")
        rotated = data.get("refresh_token")
        return TokenResponse(
            access_token=data["access_token"],
            expires_in=_lifetime(data.get("expires_in")),
            refresh_token=rotated if isinstance(rotated, str) and rotated else None,
        )


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

    async def fetch(self, session: aiohttp.ClientSession, refresh_token: str | None) -> TokenResponse:
        """Send the refresh token as configured and read the answer's fields by their paths."""
        if not refresh_token:
            raise GrantError("no refresh token is known", final=True, rejected=True)
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
            async with session.request(
                self.method,
                self.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                payload = await resp.read()
                status, content_type = resp.status, resp.content_type
                set_cookies = resp.headers.getall("Set-Cookie", [])
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise GrantError(_describe_transport_error(exc)) from None
        if status in (400, 401, 403):
            raise GrantError(f"refresh endpoint rejected the refresh token ({status})", final=True, rejected=True)
        if status != 200 and not 200 <= status < 300:
            raise GrantError(f"refresh endpoint answered {status}")
        data = _parse_json(payload, content_type)
        access = dotted_get(data, self.access_token_path)
        if not isinstance(access, str) or not access:
            raise GrantError(f"refresh endpoint's answer has no {self.access_token_path}")
        rotated = dotted_get(data, self.refresh_token_path)
        if self.refresh_cookie:
            for header in set_cookies:
                jar: SimpleCookie = SimpleCookie()
                try:
                    jar.load(header)
                except CookieError:  # a malformed Set-Cookie is skipped, not fatal
                    continue
                if self.refresh_cookie in jar and jar[self.refresh_cookie].value:
                    rotated = jar[self.refresh_cookie].value
        return TokenResponse(
            access_token=access,
            expires_in=_lifetime(dotted_get(data, self.expires_in_path)),
            refresh_token=rotated if isinstance(rotated, str) and rotated else None,
        )

"""`grant = "json"`: a home-made refresh endpoint, JSON (or a cookie) in and JSON out.

Owns: the `[token.json]` keys, sending the refresh token in a body template
or a cookie, and reading the answer's fields by their dotted paths. The
request and the answer's reading are the token endpoint's (`exchange`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any

from ...core.errors import FailureKind, GrantError
from ...core.token import fingerprint
from ..endpoint import exchange, parse_json, text_or_none, token_response
from ..protocol import GrantContext, GrantType, Problem, RequestShape, TokenResponse
from ..settings import REFRESH_PLACEHOLDER, SecretShape, secret, url_problems


@dataclass(frozen=True)
class JsonEndpointSettings:
    """The `[token.json]` table: how the home-made endpoint is asked and where its answer's fields are."""

    url: str = ""
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict, metadata=secret(SecretShape.HEADER_VALUES))
    body: str = field(default='{"refreshToken": "{refresh_token}"}', metadata=secret(SecretShape.TEMPLATE_STRINGS))
    access_token_path: str = "accessToken"
    refresh_token_path: str = "refreshToken"
    expires_in_path: str = "expiresIn"
    refresh_cookie: str = ""


@dataclass(frozen=True)
class JsonSettings:
    """The endpoint (`token.json.url`, else `token.token_url`) and the `[token.json]` table."""

    token_url: str = ""
    json: JsonEndpointSettings = field(default_factory=JsonEndpointSettings)


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
        return template.replace(REFRESH_PLACEHOLDER, refresh_token)
    if isinstance(template, list):
        return [fill_template(item, refresh_token) for item in template]
    if isinstance(template, dict):
        return {key: fill_template(value, refresh_token) for key, value in template.items()}
    return template


def _refused(status: int) -> GrantError | None:
    """A 400, 401 or 403 refuses the refresh token; any other non-2xx is the endpoint's trouble."""
    if status in (400, 401, 403):
        return GrantError(f"refresh endpoint rejected the refresh token ({status})", kind=FailureKind.LOGIN_REQUIRED)
    if not 200 <= status < 300:
        return GrantError(f"refresh endpoint answered {status}")
    return None


@dataclass(frozen=True)
class JsonGrant:
    """Sends the refresh token as configured and reads the answer's fields by their paths."""

    context: GrantContext
    url: str
    method: str
    headers: Mapping[str, str] = field(repr=False)
    body_template: Any = field(repr=False)  # parsed JSON, or None in cookie mode
    access_token_path: str
    refresh_token_path: str
    expires_in_path: str
    refresh_cookie: str
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
        answer = await exchange(
            self.context.session,
            self.method,
            self.url,
            data=body,
            headers=headers,
            timeout=self.context.timeout,
            refuse=_refused,
        )
        # The rotated refresh token first (a cookie one even when the body is no JSON):
        # it must survive whatever else is wrong with the answer.
        rotated = self._cookie(answer.headers.getall("Set-Cookie", [])) if self.refresh_cookie else None
        data = parse_json(answer.body, answer.content_type, rotated)
        rotated = rotated or text_or_none(dotted_get(data, self.refresh_token_path))
        return token_response(
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


def check(settings: JsonSettings) -> Sequence[Problem]:
    """The endpoint, the access token's path, the body template (never quoted: it may hold a secret), the method."""
    spec = settings.json
    problems = url_problems("json.url", spec.url or settings.token_url)
    if not spec.access_token_path:
        problems.append(("json.access_token_path", "is required"))
    if not spec.refresh_cookie:
        try:
            json.loads(spec.body)
        except json.JSONDecodeError as exc:
            problems.append(
                ("json.body", f"must be a JSON document ({exc.msg} at line {exc.lineno} column {exc.colno})")
            )
        except RecursionError:
            problems.append(("json.body", "must be a JSON document (nested too deeply)"))
    if not re.fullmatch(r"[A-Za-z]+", spec.method):
        problems.append(("json.method", f"must be an HTTP method, got {spec.method!r}"))
    return problems


def build(settings: JsonSettings, context: GrantContext) -> JsonGrant:
    """The grant these settings describe."""
    spec = settings.json
    return JsonGrant(
        context,
        url=spec.url or settings.token_url,
        method=spec.method.upper(),
        headers=dict(spec.headers),
        body_template=None if spec.refresh_cookie else json.loads(spec.body),
        access_token_path=spec.access_token_path,
        refresh_token_path=spec.refresh_token_path,
        expires_in_path=spec.expires_in_path,
        refresh_cookie=spec.refresh_cookie,
    )


def identity(settings: JsonSettings) -> tuple[str, str, str]:
    """The endpoint (`token_url` first, as state files have always been keyed); no client or user."""
    return settings.token_url or settings.json.url, "", ""


def request(settings: JsonSettings) -> RequestShape:
    """What shapes the request: the endpoint, the method, the headers and the body template (both by their
    fingerprints: they may hold secrets), and the cookie that carries the refresh token instead of the body."""
    spec = settings.json
    headers = json.dumps(sorted(spec.headers.items()))
    return (
        ("token_url", settings.token_url),
        ("json.url", spec.url),
        ("json.method", spec.method.upper()),
        ("json.headers", fingerprint(headers)),
        ("json.body", "" if spec.refresh_cookie else fingerprint(spec.body)),
        ("json.refresh_cookie", spec.refresh_cookie),
    )


GRANT = GrantType("json", JsonSettings, check, build, identity, uses_refresh_token=True, request=request)

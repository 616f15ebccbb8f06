"""The vocabulary grant settings are written in: which fields hold credentials, and URL checks.

Owns: the `secret()` field marker and the shapes a secret takes (a whole
value, the values of a header table, the strings of a JSON template), how
to find the secret values in each shape, and the check of a URL setting.
Knows nothing of the config file's layout or of any one grant.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

# Request headers that never carry a credential: their values are not treated as secrets.
PLAIN_HEADERS = frozenset(
    {"accept", "accept-encoding", "accept-language", "cache-control", "content-type", "user-agent"}
)
# What a body template is filled in with; a template string holding it frames the refresh token, not a secret.
REFRESH_PLACEHOLDER = "{refresh_token}"
# `Authorization: <scheme> <credentials>`: the credentials alone are masked too.
_AUTH_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*[ \t]+([A-Za-z0-9._~+/-]+=*)")


class SecretShape(enum.Enum):
    """Where the credentials are in a secret field's value."""

    WHOLE = "whole"  # the value is a credential
    HEADER_VALUES = "header_values"  # a table of request headers: every value but those of PLAIN_HEADERS
    TEMPLATE_STRINGS = "template_strings"  # a JSON template: its string values but those framing the placeholder
    URL_PASSWORD = "url_password"  # a URL: the password in its userinfo, when it has one, makes the URL a secret


def secret(shape: SecretShape = SecretShape.WHOLE) -> dict[str, SecretShape]:
    """Field metadata marking a setting that holds a credential: never shown, masked in logs, warned about."""
    return {"secret": shape}


def secret_shape(metadata: Mapping[str, Any]) -> SecretShape | None:
    """The secret shape a field's metadata marks, or None for a field that holds no credential."""
    shape = metadata.get("secret")
    return shape if isinstance(shape, SecretShape) else None


def header_secrets(headers: Mapping[str, str]) -> list[str]:
    """The secret values among request headers: every value but those of PLAIN_HEADERS.

    For `Authorization` and `Proxy-Authorization` the credentials after the
    scheme count on their own too, so they are masked wherever they appear.
    """
    found = []
    for name, value in headers.items():
        if name.lower() in PLAIN_HEADERS or not value.strip():
            continue
        found.append(value.strip())
        match = _AUTH_CREDENTIALS.fullmatch(value.strip())
        if match and name.lower() in ("authorization", "proxy-authorization"):
            found.append(match.group(1))
    return found


def template_strings(template: Any) -> list[str]:
    """Every string value inside parsed JSON (object keys excluded)."""
    if isinstance(template, str):
        return [template]
    if isinstance(template, list):
        return [text for item in template for text in template_strings(item)]
    if isinstance(template, dict):
        return [text for item in template.values() for text in template_strings(item)]
    return []


def body_secrets(body: str) -> list[str]:
    """The secret literals of a JSON body template: its string values, but not those framing {refresh_token}.

    Object keys, numbers and `true`/`false` are structure, not secrets. A
    template that is not JSON (it is unused with a refresh cookie) gives none.
    """
    try:
        template = json.loads(body)
    except (ValueError, RecursionError):
        return []
    return [text for text in template_strings(template) if text.strip() and REFRESH_PLACEHOLDER not in text]


def url_password(value: Any) -> str:
    """The password in a URL's userinfo (`redis://user:PASSWORD@host`), or "" when it has none."""
    if not isinstance(value, str) or "@" not in value:
        return ""
    try:
        return urlsplit(value).password or ""
    except ValueError:
        return ""


def secret_values(shape: SecretShape, value: Any) -> list[str]:
    """The credentials inside a secret field's value, as the redaction filter must mask them."""
    if shape is SecretShape.HEADER_VALUES:
        return header_secrets(value)
    if shape is SecretShape.TEMPLATE_STRINGS:
        return body_secrets(value)
    if shape is SecretShape.URL_PASSWORD:
        password = url_password(value)
        return [value, password] if password else []
    return [value] if isinstance(value, str) and value else []


def url_problems(key: str, value: str, *, required: bool = True) -> list[tuple[str, str]]:
    """The problems of an http(s) URL setting at `key`: missing when required, unusable, or with a query."""
    if not value:
        return [(key, "is required")] if required else []
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [(key, f"must be an http(s) URL, got {value!r}")]
    problems = []
    try:
        _ = parts.port  # raises for a port that is not a number in range
    except ValueError:
        problems.append((key, f"has an invalid port, got {value!r}"))
    if parts.query or parts.fragment:
        problems.append((key, f"must not have a query or fragment, got {value!r}"))
    return problems

"""Warnings about the config file itself: literal secrets in a file other users may read, keys no one reads.

Owns: finding the secret keys (by their `secret()` markers) whose value in
the file is literal text rather than `${VAR}` references, and the warning
naming them (never their values). Knows nothing of validation.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..auth.registry import GRANTS
from ..auth.settings import (
    PLAIN_HEADERS,
    REFRESH_PLACEHOLDER,
    SecretShape,
    body_secrets,
    template_strings,
    url_password,
)
from .load import interpolate
from .schema import DEFAULT_GRANT, TokenConfig
from .secrets import SECRET_KEYS


def _literal(value: Any) -> bool:
    """True when a raw config string says something of its own, not only `${VAR}` references.

    A `${VAR:-default}` with a non-empty default counts as literal: the default is in the file.
    """
    return isinstance(value, str) and bool(interpolate(value, {}, "", []))


def _literal_body(body: Any) -> bool:
    """True when a raw JSON body template holds a literal secret (a string value body_secrets would mask)."""
    if not isinstance(body, str):
        return False
    try:
        strings = template_strings(json.loads(body))
    except (ValueError, RecursionError):
        # Not JSON until `${VAR}` is filled in (a bare `${PIN}`): judge it filled with nothing,
        # and when even that is not JSON, assume the worst.
        filled = interpolate(body, {}, "", [])
        try:
            json.loads(filled)
        except (ValueError, RecursionError):
            return bool(filled.strip())
        return bool(body_secrets(filled))
    return any(_literal(text) and REFRESH_PLACEHOLDER not in text for text in strings)


def _raw_value(raw: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key in a parsed config file, or None."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _credential_tables(raw: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """Each `[credentials.NAME]` and inline `[route.token]` table of a parsed config file, named where it sits."""
    tables: list[tuple[str, Any]] = []
    credentials = raw.get("credentials")
    if isinstance(credentials, Mapping):
        tables += [(f"credentials.{name}", table) for name, table in credentials.items()]
    routes = raw.get("route")
    if isinstance(routes, list):
        tables += [
            (f"route[{index}].token", route.get("token"))
            for index, route in enumerate(routes)
            if isinstance(route, Mapping)
        ]
    return [(where, table) for where, table in tables if isinstance(table, Mapping)]


def _secret_values(raw: Mapping[str, Any]) -> list[tuple[str, SecretShape, Any]]:
    """Every secret key of a parsed config file with its shape and raw value: the sections', and the `[token]`
    keys of each `[credentials.NAME]` and `[route.token]` table, named where they sit."""
    found = [(key, shape, _raw_value(raw, key)) for key, shape in SECRET_KEYS.items()]
    for where, table in _credential_tables(raw):
        found += [
            (where + key[len("token") :], shape, _raw_value({"token": table}, key))
            for key, shape in SECRET_KEYS.items()
            if key.startswith("token.")
        ]
    return found


def literal_secrets(raw: Mapping[str, Any]) -> list[str]:
    """The secret keys whose value in a parsed config file is literal text, not only `${VAR}` references.

    A `${VAR:-default}` with a non-empty default counts as literal: the default
    is in the file. Each header value of a header table but those of
    PLAIN_HEADERS counts as `KEY.NAME`, and a body template as its key when
    one of its string values is literal.
    """
    found = []
    for key, shape, value in _secret_values(raw):
        if shape is SecretShape.HEADER_VALUES:
            if isinstance(value, Mapping):
                found += [
                    f"{key}.{name}"
                    for name, text in value.items()
                    if str(name).lower() not in PLAIN_HEADERS and _literal(text)
                ]
        elif shape is SecretShape.TEMPLATE_STRINGS:
            if _literal_body(value):
                found.append(key)
        elif shape is SecretShape.URL_PASSWORD:
            if isinstance(value, str) and url_password(interpolate(value, {}, "", [])):
                found.append(key)
        elif _literal(value):
            found.append(key)
    return found


def exposed_secrets_warning(path: str, mode: int, raw: Mapping[str, Any]) -> str | None:
    """A warning when a config file its group or other users may read holds a literal secret, else None.

    Pure: the file's permission bits and parsed contents are passed in. The
    warning names the keys, never their values.
    """
    if not mode & 0o044:
        return None
    keys = literal_secrets(raw)
    if not keys:
        return None
    return (
        f"{path} is readable by other users and holds {', '.join(keys)} as literal text: "
        "chmod 600 the file, or write ${VAR} there and set the variable"
    )


def unused_grant_keys_warning(raw: Mapping[str, Any]) -> str | None:
    """A warning naming the keys of `[token]`, `[credentials.NAME]` or `[route.token]` that only another grant
    reads: they are ignored, not an error. One line, each table's keys with the grant that ignores them."""
    tables = [("token", raw["token"])] if isinstance(raw.get("token"), Mapping) else []
    other = {f.name for other in GRANTS.values() for f in dataclasses.fields(other.settings)}
    parts = []
    for where, table in [*tables, *_credential_tables(raw)]:
        grant = GRANTS.get(str(table.get("grant", DEFAULT_GRANT)))
        if grant is None:
            continue
        used = {f.name for f in dataclasses.fields(TokenConfig)} | {f.name for f in dataclasses.fields(grant.settings)}
        unused = [f"{where}.{key}" for key in table if key not in used and key in other]
        if unused:
            parts.append(f"{', '.join(unused)}: not used by grant {grant.name!r}")
    if not parts:
        return None
    return "; ".join(parts) + ", ignored"


def config_file_warnings(path: Path | None) -> list[str]:
    """Warnings about the config file itself, for `run` and `check` (read after load_config accepted it)."""
    if path is None:
        return []
    try:
        mode = path.stat().st_mode
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []
    warnings = (exposed_secrets_warning(str(path), mode & 0o777, raw), unused_grant_keys_warning(raw))
    return [warning for warning in warnings if warning]

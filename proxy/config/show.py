"""The config as a person reads it: the commented example shipped in the package, and the effective config as TOML.

Owns: reading the packaged example (`example.toml`, the repository's
`config.example.toml` under another name) and writing a Config back as
TOML that `load_config` reads again, every secret shown as `<set>` (or
empty when it is empty), never its value. Knows nothing of the command
line or of where a config file is found.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from importlib import resources
from typing import Any

from ..auth.settings import PLAIN_HEADERS, SecretShape, secret_shape, secret_values, url_password
from .schema import Config

# What a secret that is set shows instead of its value.
SET = "<set>"
# Keys whose integer reads best in octal, as a file mode.
_OCTAL = frozenset({"socket_mode"})


def example_config() -> bytes:
    """The commented example config, every key with its default: the bytes of `config.example.toml`."""
    return resources.files("proxy.config").joinpath("example.toml").read_bytes()


def effective_toml(config: Config, heading: str) -> str:
    """`config` as TOML, every key with its value (defaults included), secrets as `<set>`; `heading` is a comment.

    Reading the text back gives the same config, except that a secret that
    was set is now the text `<set>`.
    """
    lines = [f"# {line}".rstrip() for line in heading.splitlines()]
    _table(config, "", lines, skip=frozenset({"token"}) if config.routes else frozenset())
    inline = {route.name for route in config.routes if route.token == route.name}
    for name, token in config.credentials.items():
        if name not in inline:
            _table(token, f"credentials.{name}", lines)
    for route in config.routes:
        lines += ["", "[[route]]"]
        for key, f, value in _entries(route):
            if key != "token" or route.name not in inline:
                shape = secret_shape(f.metadata)
                lines.append(f"{key} = {_value(key, _masked(shape, value) if shape else value)}")
        if route.name in inline:
            _table(config.credentials[route.name], "route.token", lines)
    return "\n".join(lines) + "\n"


def _entries(section: Any) -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """The keys of one table with their fields and values; a FLAT field's keys sit in the table itself."""
    for f in dataclasses.fields(section):
        if f.name in ("routes", "credentials"):
            continue  # written after the sections, as [credentials.NAME] and [[route]] tables
        value = getattr(section, f.name)
        if f.metadata.get("flat"):
            yield from _entries(value)
        else:
            yield f.name, f, value


def _is_table(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _table(section: Any, name: str, lines: list[str], skip: frozenset[str] = frozenset()) -> None:
    """Append `[name]` and its keys, then its tables (but those in `skip`), each under its own header."""
    entries = [entry for entry in _entries(section) if entry[0] not in skip]
    if name:
        lines += ["", f"[{name}]"]
    for key, f, value in entries:
        if not _is_table(value):
            shape = secret_shape(f.metadata)
            lines.append(f"{key} = {_value(key, _masked(shape, value) if shape else value)}")
    for key, _, value in entries:
        if _is_table(value):
            _table(value, f"{name}.{key}".lstrip("."), lines)


def _masked(shape: SecretShape, value: Any) -> Any:
    """A secret setting as it may be shown: each credential in it replaced by `<set>`."""
    if shape is SecretShape.HEADER_VALUES:
        return {
            header: text if header.lower() in PLAIN_HEADERS or not text.strip() else SET
            for header, text in value.items()
        }
    if shape is SecretShape.TEMPLATE_STRINGS:
        try:
            json.loads(value)
        except (ValueError, RecursionError):
            return SET if value else value  # not JSON: nothing says where a credential in it would be
        return SET if secret_values(shape, value) else value
    if shape is SecretShape.URL_PASSWORD:
        if not url_password(value):
            return value
        scheme, _, rest = value.partition("://")
        userinfo, _, host = rest.rpartition("@")
        return f"{scheme}://{userinfo.partition(':')[0]}:{SET}@{host}"
    return SET if value else value


def _value(key: str, value: Any) -> str:
    """One value in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"0o{value:o}" if key in _OCTAL and value >= 0 else str(value)
    if isinstance(value, float):
        return repr(value)  # `inf` and `nan` read back in TOML too
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_value(key, item) for item in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_string(name, escape_dollar=False)} = {_value(key, text)}" for name, text in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"{key}: no TOML form for {type(value).__name__}")


def _string(text: str, *, escape_dollar: bool = True) -> str:
    """A TOML basic string; a `$` is written `$$` so that `${...}` is not filled in again when it is read back."""
    if escape_dollar:
        text = text.replace("$", "$$")
    # JSON's string escapes are TOML's, but for DEL, which TOML wants escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")

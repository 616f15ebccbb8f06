"""Configuration: TOML into frozen dataclasses, `${ENV}` interpolation, validation.

Owns: the schema (every key and its default), reading the config file and the
environment (the only module that does), and the messages for bad input.
Every problem is collected as `key.path: what is wrong, got X`; nothing is
read from files or the environment after `load_config` returns.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

GRANTS = ("refresh_token", "client_credentials", "password", "json", "static")
CLIENT_AUTHS = ("basic", "post", "none")
# How the proxy reaches the upstream: its own lean keep-alive pool, or aiohttp's ClientSession.
UPSTREAM_CLIENTS = ("fast", "session")
# The event loop: uvloop where it is installed (Linux, macOS), else asyncio's own.
EVENT_LOOPS = ("uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class ServerConfig:
    """Where the proxy listens."""

    listen: str = "127.0.0.1:8080"
    admin_listen: str = ""
    fetch_on_start: bool = False
    shutdown_timeout: float = 30.0
    allow_from: tuple[str, ...] = ()
    client_token: str = ""
    client_token_header: str = "Proxy-Authorization"
    allow_any: bool = False
    socket_mode: int = 0o600
    max_connections: int = 2048
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    max_headers: int = 100
    max_header_size: int = 8190
    max_request_line: int = 8190
    loop: str = "uvloop"


@dataclass(frozen=True)
class UpstreamConfig:
    """The API behind the proxy."""

    url: str = ""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    verify_tls: bool = True
    ca_file: str = ""
    max_connections: int = 100
    rewrite_redirects: bool = False
    client: str = "fast"


@dataclass(frozen=True)
class JsonGrantConfig:
    """A home-made refresh endpoint that speaks JSON (`grant = "json"`)."""

    url: str = ""
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = '{"refreshToken": "{refresh_token}"}'
    access_token_path: str = "accessToken"
    refresh_token_path: str = "refreshToken"
    expires_in_path: str = "expiresIn"
    refresh_cookie: str = ""


@dataclass(frozen=True)
class TokenConfig:
    """How tokens are obtained, kept and renewed."""

    grant: str = "refresh_token"
    token_url: str = ""
    client_id: str = ""
    client_secret: str = ""
    client_auth: str = "basic"
    scope: str = ""
    audience: str = ""
    refresh_token: str = ""
    access_token: str = ""
    username: str = ""
    password: str = ""
    state_file: str = "~/.local/state/tokenproxy/state.json"
    refresh_before: float = 30.0
    refresh_on: tuple[int, ...] = (401,)
    min_refresh_interval: float = 5.0
    default_lifetime: float = 300.0
    timeout: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    json: JsonGrantConfig = field(default_factory=JsonGrantConfig)


@dataclass(frozen=True)
class QueueConfig:
    """How many requests may wait for a token, and for how long."""

    max_waiting: int = 1000
    wait_timeout: float = 30.0


@dataclass(frozen=True)
class RetryConfig:
    """What can be resent after a refresh."""

    replay_limit: int = 1048576
    replay_memory: int = 32 * 1024 * 1024


@dataclass(frozen=True)
class LogConfig:
    """What is logged and how."""

    level: str = "info"
    format: str = "text"
    access_log: bool = True


@dataclass(frozen=True)
class Config:
    """The whole configuration, parsed and validated once."""

    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    token: TokenConfig = field(default_factory=TokenConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    log: LogConfig = field(default_factory=LogConfig)


# Keys whose values are credentials: never shown in a message, masked in the log, and written
# out literally in a file others can read, they leak.
SECRET_KEYS = (
    "token.client_secret",
    "token.refresh_token",
    "token.access_token",
    "token.password",
    "server.client_token",
)
# `[token.json]` parts that may hold credentials too: the extra request headers' values, and the
# string values of the JSON body template (a client secret, an API key sent with the refresh token).
SECRET_HEADERS = "token.json.headers"
SECRET_BODY = "token.json.body"
# Request headers that never carry a credential: their values are not treated as secrets.
PLAIN_HEADERS = frozenset(
    {"accept", "accept-encoding", "accept-language", "cache-control", "content-type", "user-agent"}
)
# What the JSON grant fills in; a template string holding it is the refresh token's frame, not a secret.
REFRESH_PLACEHOLDER = "{refresh_token}"
_SECRET_ROOTS = (*SECRET_KEYS, SECRET_HEADERS, SECRET_BODY)
# `Authorization: <scheme> <credentials>`: the credentials alone are masked too.
_AUTH_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*[ \t]+([A-Za-z0-9._~+/-]+=*)")


def is_secret_key(key: str) -> bool:
    """True for a secret key, a value inside one, or a table holding one: a message never shows its value."""
    return any(
        key == root or key.startswith((f"{root}.", f"{root}[")) or root.startswith(f"{key}.")
        for root in _SECRET_ROOTS
    )


def header_secrets(headers: Mapping[str, str]) -> list[str]:
    """The secret values among `[token.json] headers`: every value but those of PLAIN_HEADERS.

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


def _template_strings(template: Any) -> list[str]:
    if isinstance(template, str):
        return [template]
    if isinstance(template, list):
        return [text for item in template for text in _template_strings(item)]
    if isinstance(template, dict):
        return [text for item in template.values() for text in _template_strings(item)]
    return []


def body_secrets(body: str) -> list[str]:
    """The secret literals of a JSON body template: its string values, but not those framing {refresh_token}.

    Object keys, numbers and `true`/`false` are structure, not secrets. A
    template that is not JSON (it is unused with `refresh_cookie`) gives none.
    """
    try:
        template = json.loads(body)
    except (ValueError, RecursionError):
        return []
    return [text for text in _template_strings(template) if text.strip() and REFRESH_PLACEHOLDER not in text]


def secrets_of(config: Config) -> tuple[str, ...]:
    """Every configured secret, for the log's redaction filter."""
    tok, server = config.token, config.server
    values = [tok.client_secret, tok.refresh_token, tok.access_token, tok.password, server.client_token]
    values += header_secrets(tok.json.headers)
    values += body_secrets(tok.json.body)
    return tuple(dict.fromkeys(value for value in values if value))


class ConfigError(Exception):
    """The configuration is unusable; `problems` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_ENV_PATTERN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str], key: str, problems: list[str]) -> str:
    """Replace `${VAR}` and `${VAR:-default}` with the environment; `$$` is `$`."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(f"{key}: environment variable {name} is not set")
        return ""

    return _ENV_PATTERN.sub(substitute, value)


def parse_listen(value: str) -> tuple[str, int]:
    """Split `host:port` (or `[v6]:port`) into its parts; ValueError if malformed.

    (`unix:/path` is handled by the caller.)
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("port must be a number from 0 to 65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """True when `host` names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, "a table"
    )


def _kind(value: Any) -> str:
    """What sort of value `value` is, without showing it: for messages about secret keys."""
    if isinstance(value, bool):
        return "a boolean"
    for tp, name in ((int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"), (dict, "a table")):
        if isinstance(value, tp):
            return name
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date or time"
    return "a value of another kind"


def _shown(key: str, value: Any) -> str:
    """`value` as a message may show it: quoted, or only its kind when `key` is secret."""
    return _kind(value) if is_secret_key(key) else repr(value)


def _convert(value: Any, tp: Any, key: str, env: Mapping[str, str], problems: list[str]) -> Any:
    """Check one value against its declared type; interpolate strings."""
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: must be a table, got {_shown(key, value)}")
            return tp()
        return _build(tp, value, key, env, problems)
    if origin is tuple:
        (item_type, _) = get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{key}: must be a list, got {_shown(key, value)}")
            return ()
        return tuple(
            _convert(item, item_type, f"{key}[{i}]", env, problems)
            for i, item in enumerate(value)
        )
    if origin is Mapping:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            bad = [k for k, v in value.items() if not isinstance(v, str)] if isinstance(value, dict) else []
            # A secret table names its first bad entry and that value's kind, never a value.
            shown = f"{_kind(value[bad[0]])} for {bad[0]!r}" if bad and is_secret_key(key) else _shown(key, value)
            problems.append(f"{key}: must be a table of strings, got {shown}")
            return {}
        return {k: interpolate(v, env, f"{key}.{k}", problems) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return interpolate(value, env, key, problems)
    if type(value) is tp:
        return value
    if isinstance(value, str) and tp in (int, float, bool):
        # An interpolated `${VAR}` can only give text: accept text that reads as the type.
        text = interpolate(value, env, key, problems).strip()
        try:
            if tp is bool:
                if text.lower() in ("true", "false"):
                    return text.lower() == "true"
                raise ValueError
            return tp(text)
        except ValueError:
            pass
    problems.append(f"{key}: must be {_type_name(tp)}, got {_shown(key, value)}")
    return tp()


def _build(cls: Any, raw: Mapping[str, Any], prefix: str, env: Mapping[str, str], problems: list[str]) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for unknown in sorted(set(raw) - names):
        problems.append(f"{prefix}.{unknown}: unknown key".lstrip("."))
    values = {}
    for name in (f.name for f in dataclasses.fields(cls) if f.name in raw):
        key = f"{prefix}.{name}".lstrip(".")
        values[name] = _convert(raw[name], hints[name], key, env, problems)
    return cls(**values)


def _check_url(key: str, value: str, problems: list[str], required: bool = True) -> None:
    if not value:
        if required:
            problems.append(f"{key}: is required")
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{key}: must be an http(s) URL, got {value!r}")
        return
    try:
        _ = parts.port  # raises for a port that is not a number in range
    except ValueError:
        problems.append(f"{key}: has an invalid port, got {value!r}")
    if parts.query or parts.fragment:
        problems.append(f"{key}: must not have a query or fragment, got {value!r}")


def _validate(config: Config, problems: list[str]) -> None:
    server = config.server
    for key, value in (("server.listen", server.listen), ("server.admin_listen", server.admin_listen)):
        if (key == "server.admin_listen" and not value) or value.startswith("unix:"):
            if value == "unix:":
                problems.append(f"{key}: a unix socket needs a path, got {value!r}")
            continue
        try:
            host, _ = parse_listen(value)
        except ValueError as exc:
            problems.append(f"{key}: {exc}, got {value!r}")
            continue
        if key == "server.listen" and not is_loopback(host) and not (
            server.allow_from or server.client_token or server.allow_any
        ):
            problems.append(
                f"server.listen: {host} is reachable from other machines, and anyone who can reach the proxy "
                "uses its token: say who may connect with server.allow_from (client CIDRs), "
                "server.client_token, or server.allow_any = true"
            )
    for index, cidr in enumerate(server.allow_from):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            problems.append(f"server.allow_from[{index}]: must be an address or CIDR range, got {cidr!r}")
    if server.client_token and len(server.client_token) < 16:
        problems.append("server.client_token: must be at least 16 characters long")
    if not re.fullmatch(r"[A-Za-z0-9-]+", server.client_token_header):
        problems.append(f"server.client_token_header: must be a header name, got {server.client_token_header!r}")
    if not 0 <= server.socket_mode <= 0o777:
        problems.append(f"server.socket_mode: must be a file mode like 0o600, got {server.socket_mode!r}")

    if server.loop not in EVENT_LOOPS:
        problems.append(f"server.loop: must be one of {', '.join(EVENT_LOOPS)}, got {server.loop!r}")
    if config.server.shutdown_timeout < 0:
        problems.append(f"server.shutdown_timeout: must not be negative, got {config.server.shutdown_timeout!r}")
    for name in ("header_timeout", "body_timeout", "keepalive_timeout"):
        if getattr(server, name) <= 0:
            problems.append(f"server.{name}: must be greater than 0, got {getattr(server, name)!r}")
    for name, least in (("max_connections", 1), ("max_headers", 1), ("max_header_size", 64), ("max_request_line", 64)):
        if getattr(server, name) < least:
            problems.append(f"server.{name}: must be at least {least}, got {getattr(server, name)!r}")
    up = config.upstream
    _check_url("upstream.url", up.url, problems)
    for name in ("connect_timeout", "read_timeout"):
        if getattr(up, name) <= 0:
            problems.append(f"upstream.{name}: must be greater than 0, got {getattr(up, name)!r}")
    if up.client not in UPSTREAM_CLIENTS:
        problems.append(f"upstream.client: must be one of {', '.join(UPSTREAM_CLIENTS)}, got {up.client!r}")
    if up.max_connections < 1:
        problems.append(f"upstream.max_connections: must be at least 1, got {up.max_connections!r}")
    if up.ca_file and not Path(up.ca_file).expanduser().is_file():
        problems.append(f"upstream.ca_file: no such file, got {up.ca_file!r}")

    tok = config.token
    if tok.grant not in GRANTS:
        problems.append(f"token.grant: must be one of {', '.join(GRANTS)}, got {tok.grant!r}")
    if tok.client_auth not in CLIENT_AUTHS:
        problems.append(
            f"token.client_auth: must be one of {', '.join(CLIENT_AUTHS)}, got {tok.client_auth!r}"
        )
    if tok.grant in ("refresh_token", "client_credentials", "password"):
        _check_url("token.token_url", tok.token_url, problems)
    if tok.grant == "client_credentials" and not tok.client_id:
        problems.append("token.client_id: is required for grant 'client_credentials'")
    if tok.grant == "password":
        for name in ("username", "password"):
            if not getattr(tok, name):
                problems.append(f"token.{name}: is required for grant 'password'")
    if tok.grant == "static" and not tok.access_token:
        problems.append("token.access_token: is required for grant 'static'")
    if tok.grant in ("refresh_token", "json") and not tok.refresh_token and not tok.state_file:
        problems.append(
            f"token.refresh_token: is required for grant {tok.grant!r} when token.state_file is empty"
        )
    if tok.grant == "json":
        _check_url("token.json.url", tok.json.url or tok.token_url, problems)
        if not tok.json.access_token_path:
            problems.append("token.json.access_token_path: is required")
        if not tok.json.refresh_cookie:
            # Never quoted: the body may hold a literal secret (or one from ${VAR}).
            try:
                json.loads(tok.json.body)
            except json.JSONDecodeError as exc:
                problems.append(
                    f"token.json.body: must be a JSON document ({exc.msg} at line {exc.lineno} column {exc.colno})"
                )
            except RecursionError:
                problems.append("token.json.body: must be a JSON document (nested too deeply)")
        if not re.fullmatch(r"[A-Za-z]+", tok.json.method):
            problems.append(f"token.json.method: must be an HTTP method, got {tok.json.method!r}")
    for name in ("refresh_before", "min_refresh_interval"):
        if getattr(tok, name) < 0:
            problems.append(f"token.{name}: must not be negative, got {getattr(tok, name)!r}")
    for name in ("default_lifetime", "timeout", "backoff_initial", "backoff_max"):
        if getattr(tok, name) <= 0:
            problems.append(f"token.{name}: must be greater than 0, got {getattr(tok, name)!r}")
    for status in tok.refresh_on:
        if not 400 <= status <= 599:
            problems.append(f"token.refresh_on: must list 4xx or 5xx statuses, got {status!r}")

    if config.queue.max_waiting < 0:
        problems.append(f"queue.max_waiting: must not be negative, got {config.queue.max_waiting!r}")
    if config.queue.wait_timeout <= 0:
        problems.append(f"queue.wait_timeout: must be greater than 0, got {config.queue.wait_timeout!r}")
    for name in ("replay_limit", "replay_memory"):
        if getattr(config.retry, name) < 0:
            problems.append(f"retry.{name}: must not be negative, got {getattr(config.retry, name)!r}")
    if config.log.level not in LOG_LEVELS:
        problems.append(f"log.level: must be one of {', '.join(LOG_LEVELS)}, got {config.log.level!r}")
    if config.log.format not in LOG_FORMATS:
        problems.append(f"log.format: must be one of {', '.join(LOG_FORMATS)}, got {config.log.format!r}")


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """Turn a parsed TOML document into a validated Config, or raise ConfigError."""
    problems: list[str] = []
    config: Config = _build(Config, raw, "", env, problems)
    checks: list[str] = []
    _validate(config, checks)
    # A key that already failed its type check is not judged again on its default.
    named = {line.split(":", 1)[0] for line in problems}
    problems.extend(line for line in checks if line.split(":", 1)[0] not in named)
    if problems:
        raise ConfigError(problems)
    state_file = config.token.state_file
    if state_file:
        state_file = str(Path(state_file).expanduser())
    return dataclasses.replace(config, token=dataclasses.replace(config.token, state_file=state_file))


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, name = dotted.partition(".")
    table = raw.setdefault(section, {})
    if isinstance(table, dict):
        table[name] = value


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
        strings = _template_strings(json.loads(body))
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


def literal_secrets(raw: Mapping[str, Any]) -> list[str]:
    """The secret keys whose value in a parsed config file is literal text, not only `${VAR}` references.

    A `${VAR:-default}` with a non-empty default counts as literal: the default
    is in the file. Each `[token.json] headers` value but those of PLAIN_HEADERS
    counts as `token.json.headers.NAME`, and the body template as
    `token.json.body` when one of its string values is literal.
    """
    found = []
    for dotted in SECRET_KEYS:
        section, _, name = dotted.partition(".")
        table = raw.get(section)
        value = table.get(name) if isinstance(table, Mapping) else None
        if _literal(value):
            found.append(dotted)
    token = raw.get("token")
    spec = token.get("json") if isinstance(token, Mapping) else None
    if isinstance(spec, Mapping):
        headers = spec.get("headers")
        if isinstance(headers, Mapping):
            found += [
                f"{SECRET_HEADERS}.{name}"
                for name, value in headers.items()
                if str(name).lower() not in PLAIN_HEADERS and _literal(value)
            ]
        if _literal_body(spec.get("body")):
            found.append(SECRET_BODY)
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


def config_file_warnings(path: Path | None) -> list[str]:
    """Warnings about the config file itself, for `run` and `check` (read after load_config accepted it)."""
    if path is None:
        return []
    try:
        mode = path.stat().st_mode
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []
    warning = exposed_secrets_warning(str(path), mode & 0o777, raw)
    return [warning] if warning else []


def find_config_path(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    """The config file to read: `-c`, then $TOKENPROXY_CONFIG, then ./tokenproxy.toml."""
    if explicit:
        return Path(explicit)
    if env.get("TOKENPROXY_CONFIG"):
        return Path(env["TOKENPROXY_CONFIG"])
    default = Path("tokenproxy.toml")
    return default if default.exists() else None


def load_config(
    path: Path | None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read, interpolate and validate the config; raise ConfigError listing every problem.

    `overrides` maps dotted keys (`server.listen`) to values from the command line.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"config: {path}: no such file"]) from None
        except OSError as exc:
            raise ConfigError([f"config: {path}: cannot be read ({exc.strerror})"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config: {path}: not valid TOML ({exc})"]) from None
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    return parse_config(raw, env)

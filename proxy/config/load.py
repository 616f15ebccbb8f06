"""Reading the configuration: TOML and command-line overrides into a validated Config, `${ENV}` filled in.

Owns: reading the config file and the environment (the only module that
does), checking each value against its declared type, and ConfigError.
Every problem is collected as `key.path: what is wrong, got X`; nothing is
read from files or the environment after `load_config` returns.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from ..auth.registry import GRANTS
from .schema import DEFAULT_GRANT, Config, RouteConfig, TokenConfig, UpstreamConfig, token_keys
from .secrets import is_secret_key
from .validate import route_problems, validate


class ConfigError(Exception):
    """The configuration is unusable; `problems` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_ENV_PATTERN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Where find_config_path looks, in its order: for help texts.
CONFIG_SEARCH = "-c FILE, else $TOKENPROXY_CONFIG, else ./tokenproxy.toml (in the current directory)"


class WithoutCredentialSecrets(Mapping[str, str]):
    """The environment for a command that uses no credential's secret (`env`, `exec`, `ca`): there a
    credential's secret whose variable is unset is no problem, so a tool's shell need not hold it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def __getitem__(self, name: str) -> str:
        return self._env[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


# What a credential's secret with its variable unset reads as under WithoutCredentialSecrets (never used there).
UNSET_SECRET = "unset"


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
        if (
            isinstance(env, WithoutCredentialSecrets)
            and is_secret_key(key)
            and not key.startswith(("server.", "store."))
        ):
            return UNSET_SECRET
        problems.append(f"{key}: environment variable {name} is not set")
        return ""

    return _ENV_PATTERN.sub(substitute, value)


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, "a table")


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
        if tp is TokenConfig:
            return _build_token(value, env, problems)
        return _build(tp, value, key, env, problems)
    if origin is tuple:
        (item_type, _) = get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{key}: must be a list, got {_shown(key, value)}")
            return ()
        return tuple(_convert(item, item_type, f"{key}[{i}]", env, problems) for i, item in enumerate(value))
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


def _values(
    types: Mapping[str, Any], raw: Mapping[str, Any], prefix: str, env: Mapping[str, str], problems: list[str]
) -> dict[str, Any]:
    """The keys of one table, each checked against its type (in `types` order); unknown keys reported."""
    for unknown in sorted(set(raw) - set(types)):
        problems.append(_unknown(unknown, raw[unknown], types, prefix))
    return {
        name: _convert(raw[name], tp, f"{prefix}.{name}".lstrip("."), env, problems)
        for name, tp in types.items()
        if name in raw
    }


def _is_table(tp: Any) -> bool:
    return (isinstance(tp, type) and dataclasses.is_dataclass(tp)) or get_origin(tp) is Mapping


def _unknown(name: str, value: Any, types: Mapping[str, Any], prefix: str) -> str:
    """The line for a key `types` does not have: a table is called a section, with the closest valid name if any."""
    if isinstance(value, dict):
        tables = [key for key, tp in types.items() if _is_table(tp)]
        close = difflib.get_close_matches(name, tables, n=1)
        dotted = f"{prefix}.{name}".lstrip(".")
        guess = f"; did you mean [{f'{prefix}.{close[0]}'.lstrip('.')}]?" if close else ""
        return f"[{dotted}]: unknown section{guess}"
    close = difflib.get_close_matches(name, list(types), n=1)
    return f"{prefix}.{name}: unknown key".lstrip(".") + (f"; did you mean {close[0]}?" if close else "")


def _build(cls: Any, raw: Mapping[str, Any], prefix: str, env: Mapping[str, str], problems: list[str]) -> Any:
    hints = get_type_hints(cls)
    return cls(**_values({f.name: hints[f.name] for f in dataclasses.fields(cls)}, raw, prefix, env, problems))


def _build_token(
    raw: Mapping[str, Any], env: Mapping[str, str], problems: list[str], prefix: str = "token"
) -> TokenConfig:
    """`[token]` (or a credential's table, named by `prefix`): the shared keys, and the chosen grant's own keys
    as its settings object.

    Every grant's keys are known (and checked against their types) whatever
    the grant; only the chosen grant's are kept.
    """
    values = _values(token_keys(), raw, prefix, env, problems)
    grant = GRANTS.get(values.get("grant", DEFAULT_GRANT), GRANTS[DEFAULT_GRANT])
    own = {f.name for f in dataclasses.fields(grant.settings)}
    settings = grant.settings(**{name: value for name, value in values.items() if name in own})
    shared = {f.name for f in dataclasses.fields(TokenConfig)}
    return TokenConfig(**{name: value for name, value in values.items() if name in shared}, settings=settings)


# The keys of a `[[route]]` table besides the upstream keys (which are `[upstream]`'s).
_ROUTE_KEYS: dict[str, Any] = {"name": str, "host": str, "path_prefix": str, "strip_prefix": bool}


def _build_credentials(raw: Any, env: Mapping[str, str], problems: list[str]) -> dict[str, TokenConfig]:
    """`[credentials.NAME]` tables, each with the keys of `[token]`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"credentials: must be a table of [credentials.NAME] tables, got {_kind(raw)}")
        return {}
    credentials = {}
    for name, table in raw.items():
        if not isinstance(table, dict):
            problems.append(f"credentials.{name}: must be a table (the keys of [token]), got {_kind(table)}")
            continue
        credentials[name] = _build_token(table, env, problems, f"credentials.{name}")
    return credentials


def _build_route(
    index: int, raw: Any, upstream: UpstreamConfig, env: Mapping[str, str], problems: list[str]
) -> tuple[RouteConfig, TokenConfig | None]:
    """One `[[route]]` table: its own keys, its upstream keys laid over `[upstream]`, and its inline
    `[route.token]` credential (None when it names one with `token = "NAME"`)."""
    prefix = f"route[{index}]"
    if not isinstance(raw, dict):
        problems.append(f"{prefix}: must be a table ([[route]]), got {_kind(raw)}")
        return RouteConfig(), None
    raw = dict(raw)
    token = raw.pop("token", "")
    inline: TokenConfig | None = None
    if isinstance(token, dict):
        inline, token = _build_token(token, env, problems, f"{prefix}.token"), ""
    elif not isinstance(token, str):
        problems.append(f"{prefix}.token: must be a credential's name or a [route.token] table, got {token!r}")
        token = ""
    hints = get_type_hints(UpstreamConfig)
    # `token` is known (for did-you-mean), though it was taken out above.
    types = {**_ROUTE_KEYS, "token": str, **{f.name: hints[f.name] for f in dataclasses.fields(UpstreamConfig)}}
    values = _values(types, raw, prefix, env, problems)
    own = {name: values.pop(name) for name in _ROUTE_KEYS if name in values}
    route = RouteConfig(**own, token=token, upstream=dataclasses.replace(upstream, **values))
    if inline is not None:
        route = dataclasses.replace(route, token=route.name)
    return route, inline


def _build_routes(
    raw: Mapping[str, Any], upstream: UpstreamConfig, env: Mapping[str, str], problems: list[str]
) -> tuple[tuple[RouteConfig, ...], dict[str, TokenConfig]]:
    """The `[[route]]` tables and every credential (named and inline); empty without `[[route]]`."""
    credentials = _build_credentials(raw.get("credentials"), env, problems)
    tables = raw.get("route")
    if tables is None:
        if credentials:
            problems.append("credentials: [credentials.NAME] tables are used by [[route]] tables, and there are none")
        return (), credentials
    if not isinstance(tables, list) or not tables:
        problems.append(f"route: must be one or more [[route]] tables, got {_kind(tables)}")
        return (), credentials
    routes = []
    for index, table in enumerate(tables):
        if len(tables) > 1 and isinstance(table, dict) and "name" not in table:
            problems.append(f"route[{index}].name: is required when there are several routes (logs and metrics use it)")
        route, inline = _build_route(index, table, upstream, env, problems)
        if inline is not None:
            if route.name in credentials:
                problems.append(
                    f"route[{index}].token: an inline [route.token] is the credential {route.name!r}, "
                    f"and [credentials.{route.name}] has that name too"
                )
            credentials[route.name] = inline
        routes.append(route)
    return tuple(routes), credentials


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """Turn a parsed TOML document into a validated Config, or raise ConfigError."""
    problems: list[str] = []
    sections = {name: value for name, value in raw.items() if name not in ("route", "credentials")}
    config: Config = _build(Config, sections, "", env, problems)
    if "route" in raw or "credentials" in raw:
        routes, credentials = _build_routes(raw, config.upstream, env, problems)
        config = dataclasses.replace(config, routes=routes, credentials=credentials)
        if routes and "token" in raw:
            problems.append(
                "[token]: with [[route]] tables, a credential is a [credentials.NAME] table (or a route's "
                "[route.token]), named by the route's token key"
            )
    # A key that already failed its type check is not judged again on its default.
    named = {line.split(":", 1)[0] for line in problems}
    problems.extend(line for line in validate(config) + route_problems(config) if line.split(":", 1)[0] not in named)
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(
        config,
        token=_expand_state_file(config.token),
        credentials={name: _expand_state_file(tok) for name, tok in config.credentials.items()},
    )


def _expand_state_file(token: TokenConfig) -> TokenConfig:
    """`token` with `~` in its state_file expanded."""
    state_file = str(Path(token.state_file).expanduser()) if token.state_file else ""
    return dataclasses.replace(token, state_file=state_file)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, name = dotted.partition(".")
    table = raw.setdefault(section, {})
    if isinstance(table, dict):
        table[name] = value


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
        except UnicodeDecodeError as exc:
            raise ConfigError([f"config: {path}: not UTF-8 text (byte {exc.start + 1})"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config: {path}: not valid TOML ({exc})"]) from None
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    return parse_config(raw, env)

"""The configuration's schema: every section and key, its default, and what its field metadata says.

Owns: the frozen dataclasses a config file becomes (the defaults live here
only; a grant's own keys and defaults are its settings dataclass in the
grant registry), and the two field markers: `secret()` (the value holds a
credential) and RESTART (a change takes effect only after a restart).
Knows nothing of TOML, the environment or validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from ..auth.registry import GRANTS
from ..auth.settings import SecretShape, secret, secret_shape

# Field metadata: the key shapes listeners, pools or TLS set up once; a reload leaves it as it was.
RESTART = {"restart": True}
# Field metadata: a dataclass whose keys sit in the enclosing table (the grant's keys in `[token]`).
FLAT = {"flat": True}

DEFAULT_GRANT = "refresh_token"
# How the proxy reaches the upstream: its own lean keep-alive pool, or aiohttp's ClientSession.
UPSTREAM_CLIENTS = ("fast", "session")
# The event loop: uvloop where it is installed (Linux, macOS), else asyncio's own.
EVENT_LOOPS = ("uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# Where the token state is shared: the state file (one host) or Redis (many hosts).
STORE_BACKENDS = ("file", "redis")


@dataclass(frozen=True)
class ServerConfig:
    """Where the proxy listens."""

    listen: str = field(default="127.0.0.1:8080", metadata=RESTART)
    admin_listen: str = field(default="", metadata=RESTART)
    fetch_on_start: bool = False
    ready_before_token: bool = False  # /readyz 200 before the first token (lazy readiness)
    shutdown_timeout: float = 30.0
    allow_from: tuple[str, ...] = ()
    client_token: str = field(default="", metadata=secret())
    client_token_header: str = "Proxy-Authorization"
    allow_any: bool = False
    socket_mode: int = field(default=0o600, metadata=RESTART)
    max_connections: int = field(default=2048, metadata=RESTART)
    header_timeout: float = field(default=10.0, metadata=RESTART)
    body_timeout: float = field(default=30.0, metadata=RESTART)
    keepalive_timeout: float = field(default=75.0, metadata=RESTART)
    max_headers: int = field(default=100, metadata=RESTART)
    max_header_size: int = field(default=8190, metadata=RESTART)
    max_request_line: int = field(default=8190, metadata=RESTART)
    loop: str = field(default="uvloop", metadata=RESTART)
    workers: int = field(default=1, metadata=RESTART)  # processes serving the port; 0 = one per CPU
    ca_dir: str = field(default="~/.local/state/tokenproxy/ca", metadata=RESTART)  # the local CA (`tokenproxy ca`)
    # CONNECT hosts (fnmatch patterns) tunnelled blind, without a token
    connect_passthrough: tuple[str, ...] = field(default=(), metadata=RESTART)


@dataclass(frozen=True)
class UpstreamConfig:
    """The API behind the proxy."""

    url: str = ""
    connect_timeout: float = field(default=10.0, metadata=RESTART)
    read_timeout: float = field(default=60.0, metadata=RESTART)
    verify_tls: bool = field(default=True, metadata=RESTART)
    ca_file: str = field(default="", metadata=RESTART)
    client_cert_file: str = field(default="", metadata=RESTART)  # mTLS: the PEM certificate shown to the upstream
    client_key_file: str = field(default="", metadata=RESTART)  # mTLS: its private key
    max_connections: int = field(default=100, metadata=RESTART)
    rewrite_redirects: bool = False
    client: str = field(default="fast", metadata=RESTART)


def _default_grant_settings() -> object:
    return GRANTS[DEFAULT_GRANT].settings()


@dataclass(frozen=True)
class TokenConfig:
    """How tokens are obtained, kept and renewed.

    The keys every grant shares are fields here; the chosen grant's own keys
    (flat in `[token]` too) are its settings object, `settings`.
    """

    grant: str = DEFAULT_GRANT
    # Discovery and `tokenproxy login`: the authorization server named by its issuer instead of token_url,
    # and the loopback port its browser login redirects to (0: a free one).
    issuer: str = ""
    redirect_port: int = 0
    # The endpoints `login` and `logout` use when there is no issuer (its metadata names them otherwise).
    authorization_url: str = ""
    device_authorization_url: str = ""
    revocation_url: str = ""
    refresh_token: str = field(default="", metadata=secret())
    state_file: str = field(default="~/.local/state/tokenproxy/state.json", metadata=RESTART)
    refresh_before: float = 30.0
    refresh_on: tuple[int, ...] = (401,)
    min_refresh_interval: float = 5.0
    default_lifetime: float = 300.0
    timeout: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    settings: object = field(default_factory=_default_grant_settings, metadata=FLAT)


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
class StoreConfig:
    """Where replicas share the token state and the right to refresh it (`backend = "redis"`)."""

    backend: str = field(default="file", metadata=RESTART)
    # redis:// or rediss://; a password (and ACL user) in it makes the whole URL a secret.
    url: str = field(default="", metadata={**secret(SecretShape.URL_PASSWORD), **RESTART})
    ca_file: str = field(default="", metadata=RESTART)
    key_prefix: str = field(default="tokenproxy:", metadata=RESTART)
    # Outlives token.timeout (default 10 s) plus the save, so a holder whose renewals fail still
    # holds the lease until its token call has ended; it bounds how long a killed holder blocks others.
    lease_ttl: float = field(default=15.0, metadata=RESTART)


@dataclass(frozen=True)
class LogConfig:
    """What is logged and how."""

    level: str = "info"
    format: str = "text"
    access_log: bool = True


# The name of the one route (and of its credential) that `[upstream]` + `[token]` without `[[route]]` make.
DEFAULT_ROUTE = "default"


@dataclass(frozen=True)
class RouteConfig:
    """One `[[route]]` table: what it matches, the upstream it goes to and the credential it is sent with.

    `upstream` is `[upstream]` with the route's own upstream keys (flat in the
    route's table) laid over it. `token` names the route's credential: a
    `[credentials.NAME]` table, or the route's inline `[route.token]`, which
    is a credential named after the route.
    """

    name: str = DEFAULT_ROUTE
    host: str = ""  # lower-case; a port in it must match, none matches any port
    path_prefix: str = ""  # "" or "/a/b": matches /a/b and /a/b/..., never /a/bc
    strip_prefix: bool = False
    token: str = ""
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig, metadata=FLAT)


@dataclass(frozen=True)
class Config:
    """The whole configuration, parsed and validated once.

    `routes` and `credentials` are empty for a config without `[[route]]`:
    its `[upstream]` and `[token]` are then one route that matches every
    request (see `routes_of`).
    """

    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    token: TokenConfig = field(default_factory=TokenConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    log: LogConfig = field(default_factory=LogConfig)
    routes: tuple[RouteConfig, ...] = ()
    credentials: Mapping[str, TokenConfig] = field(default_factory=dict)


def routes_of(config: Config) -> tuple[RouteConfig, ...]:
    """The routes in force, first match first: the `[[route]]` tables, or the one route `[upstream]` makes."""
    if config.routes:
        return config.routes
    return (RouteConfig(token=DEFAULT_ROUTE, upstream=config.upstream),)


def credentials_of(config: Config) -> dict[str, TokenConfig]:
    """Every credential by its name: the named and inline ones of the routes, or `[token]` as `default`."""
    if config.routes:
        return dict(config.credentials)
    return {DEFAULT_ROUTE: config.token}


def with_state_file_where_none(config: Config, path: str) -> Config:
    """`config` with `path` as the state file of every credential that has none (`state_file = ""`).

    For the workers of a group: they share their tokens through one private
    state file (keyed by credential) where the config keeps none.
    """
    token = config.token if config.token.state_file else dataclasses.replace(config.token, state_file=path)
    credentials = {
        name: tok if tok.state_file else dataclasses.replace(tok, state_file=path)
        for name, tok in config.credentials.items()
    }
    return dataclasses.replace(config, token=token, credentials=credentials)


def for_credential(config: Config, name: str) -> Config:
    """`config` as one credential sees it: its `[token]` is that credential's table (a route's upstream
    is given to it with `for_route`)."""
    return dataclasses.replace(config, token=credentials_of(config)[name])


def for_route(config: Config, route: RouteConfig) -> Config:
    """`config` as one route sees it: its upstream and its credential in place of `[upstream]` and `[token]`."""
    return dataclasses.replace(config, upstream=route.upstream, token=credentials_of(config)[route.token])


def token_keys() -> dict[str, Any]:
    """Every key `[token]` accepts and its type: the shared keys, then each grant's own (first one wins)."""
    hints = get_type_hints(TokenConfig)
    keys = {f.name: hints[f.name] for f in dataclasses.fields(TokenConfig) if not f.metadata.get("flat")}
    for grant in GRANTS.values():
        for name, tp in get_type_hints(grant.settings).items():
            keys.setdefault(name, tp)
    return keys


def _key_fields(cls: Any, prefix: str) -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """Every key a dataclass type names, dotted from `prefix`, with its field; into tables, and into
    the settings of every grant where a field is FLAT."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("flat"):
            for grant in GRANTS.values():
                yield from _key_fields(grant.settings, prefix)
        elif dataclasses.is_dataclass(hints[f.name]):
            yield from _key_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def secret_keys() -> dict[str, SecretShape]:
    """Every key, in any grant, whose value holds a credential, and where in the value the credential is."""
    found: dict[str, SecretShape] = {}
    for key, f in _key_fields(Config, ""):
        shape = secret_shape(f.metadata)
        if shape is not None:
            found.setdefault(key, shape)
    return found


def values_of(config: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """Every key of a config (or a section of it), dotted, with its field and value; a FLAT field's keys
    are listed in the enclosing table."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("flat"):
            yield from values_of(value, prefix)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from values_of(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The keys marked RESTART whose values differ between two configs, dotted, in schema order."""
    after = {key: value for key, _, value in values_of(new)}
    return [
        key
        for key, f, before in values_of(old)
        if f.metadata.get("restart") and (key not in after or after[key] != before)
    ]

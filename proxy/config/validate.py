"""Validating a parsed Config: each section's checks, one line per problem naming the key.

Owns: the checks of values that have the right type but are not usable
(`key.path: what is wrong, got X`); the grant's own checks come from the
grant registry. Knows nothing of TOML or the environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from ..auth.registry import GRANTS, identity_of
from ..auth.settings import url_problems
from .schema import (
    EVENT_LOOPS,
    LOG_FORMATS,
    LOG_LEVELS,
    STORE_BACKENDS,
    UPSTREAM_CLIENTS,
    Config,
    LogConfig,
    QueueConfig,
    RetryConfig,
    RouteConfig,
    ServerConfig,
    StoreConfig,
    TokenConfig,
    UpstreamConfig,
)


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


def _server_problems(server: ServerConfig) -> list[str]:
    problems = []
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
    problems.extend(_workers_problems(server))
    problems.extend(_passthrough_problems(server))
    if server.shutdown_timeout < 0:
        problems.append(f"server.shutdown_timeout: must not be negative, got {server.shutdown_timeout!r}")
    for name in ("header_timeout", "body_timeout", "keepalive_timeout"):
        if getattr(server, name) <= 0:
            problems.append(f"server.{name}: must be greater than 0, got {getattr(server, name)!r}")
    for name, least in (("max_connections", 1), ("max_headers", 1), ("max_header_size", 64), ("max_request_line", 64)):
        if getattr(server, name) < least:
            problems.append(f"server.{name}: must be at least {least}, got {getattr(server, name)!r}")
    return problems


def _passthrough_problems(server: ServerConfig) -> list[str]:
    """`server.connect_passthrough`: host name patterns (`*.example.org`, `git.example.com:22`), nothing else."""
    problems = []
    if not server.ca_dir:
        problems.append("server.ca_dir: must name a directory, got ''")
    for index, pattern in enumerate(server.connect_passthrough):
        if not re.fullmatch(r"[A-Za-z0-9*?.\[\]-]+(:[0-9*]+)?", pattern or "-"):
            problems.append(
                f"server.connect_passthrough[{index}]: must be a host name pattern like \"*.example.org\" "
                f"(optionally :PORT), got {pattern!r}"
            )
    return problems


def _workers_problems(server: ServerConfig) -> list[str]:
    """`server.workers`: a count, and only where a port can be shared (a unix socket is one process's)."""
    if server.workers < 0:
        return [f"server.workers: must be 0 (one per CPU) or more, got {server.workers!r}"]
    if server.workers != 1 and server.listen.startswith("unix:"):
        return [
            f"server.workers: a unix socket (server.listen = {server.listen!r}) is served by one process; "
            f"set workers = 1 or listen on a TCP port, got {server.workers!r}"
        ]
    return []


def _upstream_problems(up: UpstreamConfig) -> list[str]:
    problems = [f"upstream.{key}: {what}" for key, what in url_problems("url", up.url)]
    for name in ("connect_timeout", "read_timeout"):
        if getattr(up, name) <= 0:
            problems.append(f"upstream.{name}: must be greater than 0, got {getattr(up, name)!r}")
    if up.client not in UPSTREAM_CLIENTS:
        problems.append(f"upstream.client: must be one of {', '.join(UPSTREAM_CLIENTS)}, got {up.client!r}")
    if up.max_connections < 1:
        problems.append(f"upstream.max_connections: must be at least 1, got {up.max_connections!r}")
    if up.ca_file and not Path(up.ca_file).expanduser().is_file():
        problems.append(f"upstream.ca_file: no such file, got {up.ca_file!r}")
    return problems + _upstream_cert_problems(up)


def _upstream_cert_problems(up: UpstreamConfig) -> list[str]:
    """The client certificate shown to the upstream: both files or neither, present, and a matching pair."""
    if not up.client_cert_file and not up.client_key_file:
        return []
    problems = []
    for key, other in (("client_cert_file", "client_key_file"), ("client_key_file", "client_cert_file")):
        value = getattr(up, key)
        if not value:
            problems.append(f"upstream.{key}: is required with upstream.{other}")
        elif not Path(value).expanduser().is_file():
            problems.append(f"upstream.{key}: no such file, got {value!r}")
    if not problems:
        try:
            ssl.create_default_context().load_cert_chain(
                Path(up.client_cert_file).expanduser(), Path(up.client_key_file).expanduser()
            )
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            problems.append(
                f"upstream.client_cert_file: cannot be used with upstream.client_key_file ({reason}), "
                f"got {up.client_cert_file!r}"
            )
    return problems


def _logs_in(tok: TokenConfig) -> bool:
    """True when the grant logs in by itself without a refresh token (`token.login`)."""
    return bool(getattr(tok.settings, "login", ""))


def _grant_token_problems(tok: TokenConfig) -> list[str]:
    """What a grant's keys and the shared `[token]` keys get wrong together."""
    command_timeout = getattr(tok.settings, "command_timeout", None)
    if tok.grant == "command" and isinstance(command_timeout, float) and command_timeout > tok.timeout:
        return [
            f"token.command_timeout: must not be longer than token.timeout ({tok.timeout:g}), "
            f"which ends every fetch, got {command_timeout!r}"
        ]
    return []


def _token_problems(tok: TokenConfig) -> list[str]:
    problems = []
    grant = GRANTS.get(tok.grant)
    if grant is None:
        problems.append(f"token.grant: must be one of {', '.join(GRANTS)}, got {tok.grant!r}")
    else:
        problems += _issuer_problems(tok)
        problems += [f"token.{key}: {what}" for key, what in grant.check(_endpoint_named(tok))]
        problems += _grant_token_problems(tok)
        if grant.uses_refresh_token and not tok.refresh_token and not tok.state_file and not _logs_in(tok):
            problems.append(
                f"token.refresh_token: is required for grant {tok.grant!r} when token.state_file is empty "
                "(or name a state file and run `tokenproxy login`)"
            )
    for name in ("refresh_before", "min_refresh_interval"):
        if getattr(tok, name) < 0:
            problems.append(f"token.{name}: must not be negative, got {getattr(tok, name)!r}")
    for name in ("default_lifetime", "timeout", "backoff_initial", "backoff_max"):
        if getattr(tok, name) <= 0:
            problems.append(f"token.{name}: must be greater than 0, got {getattr(tok, name)!r}")
    for status in tok.refresh_on:
        if not 400 <= status <= 599:
            problems.append(f"token.refresh_on: must list 4xx or 5xx statuses, got {status!r}")
    return problems


def _endpoint_named(tok: TokenConfig) -> object:
    """The grant's settings as checked: with `issuer` given, the token endpoint is found at start, not missing;
    with neither issuer nor token_url, a refresh_token grant's is found by `tokenproxy login` from the API (RFC 9728),
    and the other commands say what to add (`endpoint_missing`)."""
    settings = tok.settings
    if not dataclasses.is_dataclass(settings) or not hasattr(settings, "token_url") or settings.token_url:
        return settings
    if tok.issuer:
        return dataclasses.replace(settings, token_url=tok.issuer)  # type: ignore[type-var]
    if tok.grant == "refresh_token" and tok.state_file:
        return dataclasses.replace(settings, token_url="https://found-by-login.invalid")  # type: ignore[type-var]
    return settings


def endpoint_missing(config: Config) -> str | None:
    """The problem of a config that names no token endpoint (neither token.issuer nor token.token_url): only
    `tokenproxy login` can start from it. None when it names one."""
    tok = config.token
    if tok.issuer or not hasattr(tok.settings, "token_url") or tok.settings.token_url:
        return None
    return (
        "token.token_url: is required (or token.issuer); `tokenproxy login` finds the issuer from upstream.url "
        "when the API names it (RFC 9728)"
    )


def _issuer_problems(tok: TokenConfig) -> list[str]:
    """`issuer` and `redirect_port`: an issuer is an http(s) URL without query, for an OAuth client, and
    takes the place of token_url."""
    problems = []
    if tok.issuer:
        problems += [f"token.{key}: {what}" for key, what in url_problems("issuer", tok.issuer)]
        if not hasattr(tok.settings, "client_id"):
            problems.append(f"token.issuer: is not used by grant {tok.grant!r}, which has no OAuth client")
        elif getattr(tok.settings, "token_url", ""):
            problems.append(
                "token.issuer: give token.issuer or token.token_url, not both "
                "(the token endpoint comes from the issuer's metadata)"
            )
    for name in ("authorization_url", "device_authorization_url", "revocation_url"):
        problems += [f"token.{key}: {what}" for key, what in url_problems(name, getattr(tok, name), required=False)]
    if not 0 <= tok.redirect_port <= 65535:
        problems.append(f"token.redirect_port: must be a port from 0 (a free one) to 65535, got {tok.redirect_port!r}")
    return problems


def _queue_problems(queue: QueueConfig) -> list[str]:
    problems = []
    if queue.max_waiting < 0:
        problems.append(f"queue.max_waiting: must not be negative, got {queue.max_waiting!r}")
    if queue.wait_timeout <= 0:
        problems.append(f"queue.wait_timeout: must be greater than 0, got {queue.wait_timeout!r}")
    return problems


def _retry_problems(retry: RetryConfig) -> list[str]:
    return [
        f"retry.{name}: must not be negative, got {getattr(retry, name)!r}"
        for name in ("replay_limit", "replay_memory")
        if getattr(retry, name) < 0
    ]


def redis_url_problem(url: str) -> str | None:
    """What makes `url` unusable as a Redis URL, or None; the sentence never shows the URL (it may hold a password)."""
    if not url:
        return "is required when store.backend is 'redis'"
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return "must start with redis:// or rediss://"
    try:
        port = parts.port
    except ValueError:
        return "has a port that is not a number from 0 to 65535"
    if not parts.hostname:
        return "must name a host (redis://HOST:PORT/DB)"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"must end with a database number (/0), got /{db}"
    if port == 0:
        return "has port 0"
    return None


def _store_problems(store: StoreConfig, token: TokenConfig) -> list[str]:
    problems = []
    if store.backend not in STORE_BACKENDS:
        problems.append(f"store.backend: must be one of {', '.join(STORE_BACKENDS)}, got {store.backend!r}")
    if store.backend == "redis" and (problem := redis_url_problem(store.url)) is not None:
        problems.append(f"store.url: {problem}")
    if store.ca_file and not Path(store.ca_file).expanduser().is_file():
        problems.append(f"store.ca_file: no such file, got {store.ca_file!r}")
    if store.ca_file and not store.url.startswith("rediss://"):
        problems.append("store.ca_file: is used only with a rediss:// store.url (TLS)")
    if not store.key_prefix:
        problems.append("store.key_prefix: must not be empty")
    if store.backend == "redis" and store.lease_ttl < token.timeout:
        problems.append(
            f"store.lease_ttl: must be at least token.timeout ({token.timeout:g}s), so a lease outlives "
            f"the token call it guards, got {store.lease_ttl!r}"
        )
    return problems


def _log_problems(log: LogConfig) -> list[str]:
    problems = []
    if log.level not in LOG_LEVELS:
        problems.append(f"log.level: must be one of {', '.join(LOG_LEVELS)}, got {log.level!r}")
    if log.format not in LOG_FORMATS:
        problems.append(f"log.format: must be one of {', '.join(LOG_FORMATS)}, got {log.format!r}")
    return problems


def _renamed(problems: list[str], section: str, prefix: str) -> list[str]:
    """Problems a section's checks name as `section.key`, named `prefix.key` instead (a route, a credential)."""
    return [prefix + line[len(section) :] if line.startswith(f"{section}.") else line for line in problems]


# A route's host: a name or address as a client asks for it, with an optional port; no scheme, path or user.
_ROUTE_HOST = re.compile(r"(?:[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")
# A route's path_prefix: /segment/segment, no query, no trailing slash.
_PATH_PREFIX = re.compile(r"(?:/[^/?#\s]+)+")


def _one_route_problems(index: int, route: RouteConfig, several: bool, credentials: set[str]) -> list[str]:
    """What one `[[route]]` table gets wrong on its own."""
    prefix = f"route[{index}]"
    problems = []
    if several and not route.host and not route.path_prefix:
        problems.append(
            f"{prefix}: give host or path_prefix (or both): with several routes, each says which requests it takes"
        )
    if route.host and not _ROUTE_HOST.fullmatch(route.host):
        problems.append(f"{prefix}.host: must be a lower-case host name with an optional :port, got {route.host!r}")
    if route.path_prefix and not _PATH_PREFIX.fullmatch(route.path_prefix):
        problems.append(
            f"{prefix}.path_prefix: must start with / and not end with /, without a query, got {route.path_prefix!r}"
        )
    if route.strip_prefix and not route.path_prefix:
        problems.append(f"{prefix}.strip_prefix: needs {prefix}.path_prefix")
    if not route.token:
        problems.append(f"{prefix}.token: is required: a [credentials.NAME] table's name, or a [route.token] table")
    elif route.token not in credentials:
        close = difflib.get_close_matches(route.token, sorted(credentials), n=1)
        guess = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"{prefix}.token: no [credentials.{route.token}] table{guess}")
    return problems + _renamed(_upstream_problems(route.upstream), "upstream", prefix)


def route_problems(config: Config) -> list[str]:
    """Every problem of the `[[route]]` tables and `[credentials.NAME]` tables, naming the key."""
    if not config.routes:
        return []
    problems = []
    if config.upstream.url:
        problems.append(
            "upstream.url: with [[route]] tables each route gives its url; [upstream] holds only what they share"
        )
    several = len(config.routes) > 1
    seen: dict[str, int] = {}
    for index, route in enumerate(config.routes):
        if route.name in seen:
            problems.append(f"route[{index}].name: {route.name!r} is already the name of route[{seen[route.name]}]")
        seen.setdefault(route.name, index)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", route.name):
            problems.append(f"route[{index}].name: must be letters, digits, '_', '-' or '.', got {route.name!r}")
        problems += _one_route_problems(index, route, several, set(config.credentials))
    identities: dict[tuple[str, ...], str] = {}
    for name, tok in config.credentials.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            problems.append(f"credentials.{name}: a credential's name must be letters, digits, '_', '-' or '.'")
        inline = next((i for i, r in enumerate(config.routes) if r.name == name and r.token == name), None)
        where = f"credentials.{name}" if inline is None else f"route[{inline}].token"
        problems += _renamed(_token_problems(tok), "token", where)
        other = identities.setdefault(identity_of(tok.grant, tok.settings), where) if tok.grant in GRANTS else where
        if other != where:
            problems.append(
                f"{where}: is the same credential as {other} (same grant, endpoint, client and what is asked for), "
                "so the two would share one token and one state: name one credential in both routes"
            )
    return problems


def validate(config: Config) -> list[str]:
    """Every problem of a config whose values have the right types, one line each, naming the key."""
    routed = bool(config.routes)
    return [
        *_server_problems(config.server),
        *(_upstream_problems(config.upstream) if not routed else []),
        *(_token_problems(config.token) if not routed else []),
        *_queue_problems(config.queue),
        *_retry_problems(config.retry),
        *_store_problems(config.store, config.token),
        *_log_problems(config.log),
    ]

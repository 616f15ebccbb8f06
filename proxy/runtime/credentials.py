"""From the `[token]` section to a running TokenManager: the grant, the store, the policy, the identity."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from ..auth.discovery import ServerMetadata, discover
from ..auth.protocol import Grant, GrantContext, RequestShape
from ..auth.registry import GRANTS, identity_of
from ..config import Config, TokenConfig
from ..config.schema import credentials_of, for_credential
from ..core.causes import safe_url
from ..observe.metrics import NULL_METRICS, Recorder
from ..tokens.coordination import Coordination, InProcessCoordination
from ..tokens.file_lock import LOCK_MARGIN, FileLockCoordination
from ..tokens.manager import Clock, RefreshPolicy, TokenManager, credential_id
from ..tokens.redis_store import RedisCoordination, RedisSettings, check_redis
from ..tokens.store import FileStore, NullStore, Store

logger = logging.getLogger("tokenproxy")

# `token.client_auth` -> its name in metadata's token_endpoint_auth_methods_supported (RFC 8414 §2, RFC 7591 §2).
AUTH_METHOD_NAMES = {"basic": "client_secret_basic", "post": "client_secret_post", "none": "none"}


def build_grant(token: TokenConfig, session: aiohttp.ClientSession) -> Grant:
    """The grant object the `token` section describes; `session` carries its calls to the endpoint."""
    context = GrantContext(session, timeout=token.timeout, default_lifetime=token.default_lifetime)
    return GRANTS[token.grant].build(token.settings, context)


async def with_discovery(config: Config, session: aiohttp.ClientSession) -> tuple[Config, ServerMetadata | None]:
    """The config with the token endpoint `token.issuer`'s metadata names, and that metadata; unchanged (and
    None) without an issuer. Raises DiscoveryError naming the URL tried. Called before a grant is built."""
    tok = config.token
    if not tok.issuer:
        return with_registered_client(config), None
    metadata = await discover(session, tok.issuer, tok.timeout)
    settings = dataclasses.replace(tok.settings, token_url=metadata.token_endpoint)  # type: ignore[type-var]
    # The registered client is found by the token endpoint it was registered for: after discovery.
    config = with_registered_client(dataclasses.replace(config, token=dataclasses.replace(tok, settings=settings)))
    tok = config.token
    method = AUTH_METHOD_NAMES.get(getattr(tok.settings, "client_auth", ""), "")
    # No client id yet: `login` registers one, with method none.
    if method and getattr(tok.settings, "client_id", "") and method not in metadata.token_endpoint_auth_methods:
        logger.warning(
            "token.client_auth %r (%s) is not among the methods %s lists: %s",
            getattr(tok.settings, "client_auth", ""),
            method,
            safe_url(metadata.source),
            ", ".join(metadata.token_endpoint_auth_methods) or "(none)",
        )
    return config, metadata


async def resolve_credentials(config: Config, session_for: Callable[[Config, str], aiohttp.ClientSession]) -> Config:
    """`config` with each credential's registered client filled in and its issuer's metadata fetched
    (`with_discovery`, one credential after the other, each with its own token endpoint session)."""
    for name in credentials_of(config):
        resolved, _ = await with_discovery(for_credential(config, name), session_for(config, name))
        config = _with_credential(config, name, resolved.token)
    return config


def registered_clients(config: Config) -> Config:
    """`config` with each credential's registered client filled in (`with_registered_client`)."""
    for name in credentials_of(config):
        config = _with_credential(config, name, with_registered_client(for_credential(config, name)).token)
    return config


def _with_credential(config: Config, name: str, token: TokenConfig) -> Config:
    """`config` with the credential `name` replaced by `token`."""
    if config.routes:
        return dataclasses.replace(config, credentials={**config.credentials, name: token})
    return dataclasses.replace(config, token=token)


def has_issuer(config: Config) -> bool:
    """True when a credential names its token endpoint by an issuer (found by discovery)."""
    return any(token.issuer for token in credentials_of(config).values())


def with_registered_client(config: Config) -> Config:
    """The config with the public client `tokenproxy login` registered (kept in the state file) when it names
    no client_id; unchanged otherwise. Reads the state file: at start and on reload only."""
    tok = config.token
    if not tok.state_file or not hasattr(tok.settings, "client_id") or tok.settings.client_id:
        return config
    # A state file may hold other configs' logins: the client is the one whose entry this config's would be.
    for state in FileStore(Path(tok.state_file)).load_all().values():
        if not state.client_id:
            continue
        settings = dataclasses.replace(tok.settings, client_id=state.client_id, client_auth="none")  # type: ignore[type-var]
        registered = dataclasses.replace(tok, settings=settings)
        if credential_of(registered) == state.credential:
            return dataclasses.replace(config, token=registered)
    return config


def credential_of(token: TokenConfig) -> str:
    """What identifies the credential a token belongs to: the grant and what its registry entry names."""
    return credential_id(*identity_of(token.grant, token.settings))


def request_of(token: TokenConfig) -> RequestShape:
    """What shapes the token request: the grant, and everything its registry entry says the request carries."""
    return (("grant", token.grant), *GRANTS[token.grant].request(token.settings))


def build_store(token: TokenConfig) -> Store:
    """The state file store (this credential's entry in it), or one that keeps nothing when `state_file` is empty."""
    return FileStore(Path(token.state_file), credential_of(token)) if token.state_file else NullStore()


def build_redis_coordination(config: Config, local: Store, metrics: Recorder) -> RedisCoordination | None:
    """With `store.backend = "redis"`, the Redis lease and state, once Redis answered; else None.

    Pings Redis first (blocking, bounded): StoreUnavailable naming its host
    when it cannot be reached or refuses the credentials.
    """
    settings = redis_settings(config)
    if settings is None:
        return None
    check_redis(settings)
    return RedisCoordination(settings, local, metrics)


def redis_settings(config: Config) -> RedisSettings | None:
    """How the configured credential reaches Redis with `store.backend = "redis"`; None with the file store."""
    store = config.store
    if store.backend != "redis":
        return None
    return RedisSettings(
        url=store.url,
        key_prefix=store.key_prefix,
        lease_ttl=store.lease_ttl,
        wait_timeout=config.queue.wait_timeout,
        rotating=GRANTS[config.token.grant].uses_refresh_token,
        ca_file=str(Path(store.ca_file).expanduser()) if store.ca_file else "",
    )


def build_coordination(token: TokenConfig, store: Store) -> Coordination:
    """Who may refresh: with a state file, the processes sharing it take turns under its lock; else this one alone.

    A corrupt state file is moved aside here, before it is first read, when no peer holds the lock.
    """
    if not isinstance(store, FileStore):
        return InProcessCoordination(store)
    coordination = FileLockCoordination(store, wait=token.timeout + LOCK_MARGIN)
    coordination.set_aside_corrupt()
    return coordination


def build_policy(config: Config) -> RefreshPolicy:
    """The token manager's timings and bounds."""
    tok = config.token
    return RefreshPolicy(
        refresh_before=tok.refresh_before,
        min_refresh_interval=tok.min_refresh_interval,
        default_lifetime=tok.default_lifetime,
        timeout=tok.timeout,
        backoff_initial=tok.backoff_initial,
        backoff_max=tok.backoff_max,
        max_waiting=config.queue.max_waiting,
        wait_timeout=config.queue.wait_timeout,
    )


def make_token_manager(
    config: Config,
    session: aiohttp.ClientSession,
    clock: Clock = time.time,
    metrics: Recorder = NULL_METRICS,
    store: Store | None = None,
    name: str = "",
) -> TokenManager:
    """A TokenManager for the configured credential, resumed from its state file (`store`, else its own).

    `name`, when given, is named in its log lines (a config with several credentials).
    """
    tok = config.token
    store = build_store(tok) if store is None else store
    manager = TokenManager(
        build_grant(tok, session),
        store,
        build_policy(config),
        refresh_token=tok.refresh_token or None,
        credential=credential_of(tok),
        request=request_of(tok),
        clock=clock,
        metrics=metrics,
        coordination=build_redis_coordination(config, store, metrics) or build_coordination(tok, store),
    )
    manager.name_in_logs(name)
    manager.resume()
    return manager

"""From the `[token]` section to a running TokenManager: the grant, the store, the policy, the identity."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp

from ..auth.protocol import Grant, GrantContext, RequestShape
from ..auth.registry import GRANTS
from ..config import Config, TokenConfig
from ..observe.metrics import NULL_METRICS, Recorder
from ..tokens.coordination import Coordination, InProcessCoordination
from ..tokens.file_lock import LOCK_MARGIN, FileLockCoordination
from ..tokens.manager import Clock, RefreshPolicy, TokenManager, credential_id
from ..tokens.store import FileStore, NullStore, Store


def build_grant(token: TokenConfig, session: aiohttp.ClientSession) -> Grant:
    """The grant object the `token` section describes; `session` carries its calls to the endpoint."""
    context = GrantContext(session, timeout=token.timeout, default_lifetime=token.default_lifetime)
    return GRANTS[token.grant].build(token.settings, context)


def credential_of(token: TokenConfig) -> str:
    """What identifies the credential a token belongs to: the grant and what its registry entry names."""
    return credential_id(token.grant, *GRANTS[token.grant].identity(token.settings))


def request_of(token: TokenConfig) -> RequestShape:
    """What shapes the token request: the grant, and everything its registry entry says the request carries."""
    return (("grant", token.grant), *GRANTS[token.grant].request(token.settings))


def build_store(token: TokenConfig) -> Store:
    """The state file store, or one that keeps nothing when `state_file` is empty."""
    return FileStore(Path(token.state_file)) if token.state_file else NullStore()


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
    config: Config, session: aiohttp.ClientSession, clock: Clock = time.time, metrics: Recorder = NULL_METRICS
) -> TokenManager:
    """A TokenManager for the configured credential, resumed from its state file."""
    tok = config.token
    store = build_store(tok)
    manager = TokenManager(
        build_grant(tok, session),
        store,
        build_policy(config),
        refresh_token=tok.refresh_token or None,
        credential=credential_of(tok),
        request=request_of(tok),
        clock=clock,
        metrics=metrics,
        coordination=build_coordination(tok, store),
    )
    manager.resume()
    return manager

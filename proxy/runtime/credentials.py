"""From the `[token]` section to a running TokenManager: the grant, the store, the policy, the identity."""

from __future__ import annotations

import json
import time
from pathlib import Path

import aiohttp

from ..auth.grants import Grant, JsonGrant, OAuthGrant, StaticGrant
from ..config.load import Config, TokenConfig
from ..observe.metrics import NULL_METRICS, Metrics
from ..tokens.manager import Clock, RefreshPolicy, TokenManager, credential_id
from ..tokens.store import FileStore, NullStore, Store


def build_grant(token: TokenConfig, session: aiohttp.ClientSession) -> Grant:
    """The grant object the `token` section describes; `session` carries its calls to the endpoint."""
    if token.grant == "static":
        return StaticGrant(token.access_token, token.default_lifetime)
    if token.grant == "json":
        spec = token.json
        return JsonGrant(
            session=session,
            url=spec.url or token.token_url,
            method=spec.method.upper(),
            headers=dict(spec.headers),
            body_template=None if spec.refresh_cookie else json.loads(spec.body),
            access_token_path=spec.access_token_path,
            refresh_token_path=spec.refresh_token_path,
            expires_in_path=spec.expires_in_path,
            refresh_cookie=spec.refresh_cookie,
            timeout=token.timeout,
        )
    params = {"username": token.username, "password": token.password} if token.grant == "password" else {}
    return OAuthGrant(
        session=session,
        name=token.grant,
        token_url=token.token_url,
        client_id=token.client_id,
        client_secret=token.client_secret,
        client_auth=token.client_auth,
        params=params,
        scope=token.scope,
        audience=token.audience,
        timeout=token.timeout,
    )


def credential_of(token: TokenConfig) -> str:
    """What identifies the credential a token belongs to: grant, endpoint, client, user."""
    return credential_id(token.grant, token.token_url or token.json.url, token.client_id, token.username)


def build_store(token: TokenConfig) -> Store:
    """The state file store, or one that keeps nothing when `state_file` is empty."""
    return FileStore(Path(token.state_file)) if token.state_file else NullStore()


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
    config: Config, session: aiohttp.ClientSession, clock: Clock = time.time, metrics: Metrics | None = None
) -> TokenManager:
    """A TokenManager for the configured credential, resumed from its state file."""
    tok = config.token
    manager = TokenManager(
        build_grant(tok, session),
        build_store(tok),
        build_policy(config),
        refresh_token=tok.refresh_token or None,
        credential=credential_of(tok),
        clock=clock,
        metrics=metrics if metrics is not None else NULL_METRICS,
    )
    manager.resume()
    return manager

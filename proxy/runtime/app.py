"""The proxy's aiohttp Application: its resources (opened and closed in a `cleanup_ctx`), route and entry handler."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from ..config import Config
from ..http.access import AccessRules
from ..http.entry import Entry
from ..http.forward import Forwarder
from ..http.headers import request_drop_set
from ..http.route import Route
from ..observe.metrics import Metrics, TokenGauges
from ..tokens.manager import Clock, TokenManager
from ..upstream.model import Upstream
from .clients import token_session, upstream_client
from .credentials import make_token_manager, with_discovery

FORWARDER = web.AppKey("forwarder", Forwarder)


TOKENS = web.AppKey("tokens", TokenManager)


METRICS = web.AppKey("metrics", Metrics)


TOKEN_SESSION = web.AppKey("token_session", aiohttp.ClientSession)


ENTRY = web.AppKey("entry", Entry)


def build_route(config: Config, tokens: TokenManager) -> Route:
    """The route the config describes: its upstream, `tokens` for its credential, and how it forwards."""
    server = config.server
    return Route(
        upstream=Upstream.parse(config.upstream.url),
        tokens=tokens,
        access=AccessRules.build(server.allow_from, server.client_token, server.client_token_header),
        refresh_on=frozenset(config.token.refresh_on),
        replay_limit=config.retry.replay_limit,
        drop=request_drop_set((server.client_token_header,) if server.client_token else ()),
        rewrite_redirects=config.upstream.rewrite_redirects,
    )


def build_app(config: Config, *, clock: Clock = time.time) -> web.Application:
    """The proxy's aiohttp Application: resources in a cleanup context; its entry handler once they are open."""
    app = web.Application()

    def token_gauges() -> TokenGauges | None:
        manager = app.get(TOKENS)
        if manager is None:
            return None
        status = manager.status()
        expires_in = None if status.expires_at is None else status.expires_at - clock()
        return TokenGauges(status.waiting, expires_in, status.generation)

    app[METRICS] = Metrics(token_gauges)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        metrics = app[METRICS]
        tokens_http = token_session(config)
        try:
            # The issuer's metadata first (a DiscoveryError stops the start); then the state file is
            # resumed: one that is refused (UnsafeStateError) leaves nothing open.
            manager = make_token_manager((await with_discovery(config, tokens_http))[0], tokens_http, clock, metrics)
        except BaseException:
            await tokens_http.close()
            raise
        client = upstream_client(config)
        route = build_route(config, manager)
        client.use(route.upstream)
        forwarder = Forwarder(
            client,
            replay_memory=config.retry.replay_memory,
            # A body that finds replay_memory full waits for room as long as a stalled body is
            # tolerated (a stall attack holding it is over by then), then streams.
            replay_wait=config.server.body_timeout,
            metrics=metrics,
        )
        app[TOKEN_SESSION] = tokens_http
        app[TOKENS] = manager
        app[FORWARDER] = forwarder
        app[ENTRY] = Entry(forwarder, route)
        try:
            yield
        finally:
            await manager.close()
            await client.close()
            await tokens_http.close()

    async def release_waiters(app: web.Application) -> None:
        # Runs before aiohttp waits for in-flight handlers: waiting requests
        # get 503 shutting_down at once instead of holding up the shutdown.
        await app[TOKENS].close()

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(release_waiters)
    return app

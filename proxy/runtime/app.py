"""The proxy's aiohttp Application: its resources (opened and closed in a `cleanup_ctx`), routes and entry handler."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from ..config import Config
from ..http.entry import Entry
from ..http.forward import Forwarder
from ..observe.metrics import Metrics, TokenGauges
from ..tokens.manager import Clock, TokenManager
from .credentials import resolve_credentials
from .routing import Routing, build_route

__all__ = ["ENTRY", "FORWARDER", "METRICS", "ROUTING", "TOKENS", "TOKEN_SESSION", "build_app", "build_route"]

FORWARDER = web.AppKey("forwarder", Forwarder)


# The first credential's token manager: the only one of a config without routes.
TOKENS = web.AppKey("tokens", TokenManager)


METRICS = web.AppKey("metrics", Metrics)


# The first credential's token endpoint session.
TOKEN_SESSION = web.AppKey("token_session", aiohttp.ClientSession)


ENTRY = web.AppKey("entry", Entry)


ROUTING = web.AppKey("routing", Routing)


def build_app(config: Config, *, clock: Clock = time.time) -> web.Application:
    """The proxy's aiohttp Application: resources in a cleanup context; its entry handler once they are open."""
    app = web.Application()

    def credential_gauges() -> dict[str, TokenGauges]:
        routing = app.get(ROUTING)
        if routing is None:
            return {}
        gauges = {}
        for name, credential in routing.credentials.items():
            status = credential.manager.status()
            expires_in = None if status.expires_at is None else status.expires_at - clock()
            gauges[name] = TokenGauges(status.waiting, expires_in, status.generation)
        return gauges

    app[METRICS] = Metrics(credential_gauges=credential_gauges)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        metrics = app[METRICS]
        routing = Routing(clock, metrics)
        try:
            # The issuers' metadata first (a DiscoveryError stops the start); then the state file is
            # resumed: one that is refused (UnsafeStateError) leaves nothing open.
            resolved = await resolve_credentials(config, routing.session_for)
            routing.start_credentials(resolved)
            router = routing.build_routes(resolved, metrics.for_route)
        except BaseException:
            await routing.close()
            raise
        forwarder = Forwarder(
            routing.clients,
            replay_memory=config.retry.replay_memory,
            # A body that finds replay_memory full waits for room as long as a stalled body is
            # tolerated (a stall attack holding it is over by then), then streams.
            replay_wait=config.server.body_timeout,
            metrics=metrics,
        )
        app[ROUTING] = routing
        app[TOKEN_SESSION] = next(iter(routing.credentials.values())).session
        app[TOKENS] = routing.first
        app[FORWARDER] = forwarder
        app[ENTRY] = Entry(forwarder, router, metrics)
        try:
            yield
        finally:
            await routing.close()

    async def release_waiters(app: web.Application) -> None:
        # Runs before aiohttp waits for in-flight handlers: waiting requests
        # get 503 shutting_down at once instead of holding up the shutdown.
        await app[ROUTING].close_managers()

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(release_waiters)
    return app

"""The proxy's aiohttp Application: its resources (opened and closed in a `cleanup_ctx`) and its entry handler."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import hdrs, web

from ..config import Config
from ..core.errors import ExpectationFailed
from ..http.access import AccessRules
from ..http.forward import Forwarder
from ..http.render import error_response
from ..observe.metrics import Metrics, TokenGauges
from ..tokens.manager import Clock, TokenManager
from ..upstream.model import Upstream
from .clients import token_session, upstream_client
from .credentials import make_token_manager

FORWARDER = web.AppKey("forwarder", Forwarder)


TOKENS = web.AppKey("tokens", TokenManager)


METRICS = web.AppKey("metrics", Metrics)


TOKEN_SESSION = web.AppKey("token_session", aiohttp.ClientSession)


class LiveSettings:
    """The settings a reload may change that are read per request.

    Owned by the composition root: created by build_app, replaced attribute
    by attribute only by apply_reload, on the event loop.
    """

    def __init__(self, rules: AccessRules) -> None:
        self.rules = rules


LIVE = web.AppKey("live", LiveSettings)


Entry = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


ENTRY: web.AppKey[Entry] = web.AppKey("entry")


def build_app(config: Config, *, clock: Clock = time.time) -> web.Application:
    """The proxy's aiohttp Application: one catch-all handler, resources in a cleanup context."""
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
        up = config.upstream
        metrics = app[METRICS]
        tokens_http = token_session(config)
        try:
            # Resumes from the state file first: one that is refused (UnsafeStateError) leaves nothing open.
            manager = make_token_manager(config, tokens_http, clock, metrics)
        except BaseException:
            await tokens_http.close()
            raise
        client = upstream_client(config)
        app[TOKEN_SESSION] = tokens_http
        app[TOKENS] = manager
        app[FORWARDER] = Forwarder(
            client,
            Upstream.parse(up.url),
            manager,
            refresh_on=frozenset(config.token.refresh_on),
            replay_limit=config.retry.replay_limit,
            replay_memory=config.retry.replay_memory,
            # A body that finds replay_memory full waits for room as long as a stalled body is
            # tolerated (a stall attack holding it is over by then), then streams.
            replay_wait=config.server.body_timeout,
            drop_headers=(config.server.client_token_header,) if config.server.client_token else (),
            rewrite_redirects=config.upstream.rewrite_redirects,
            metrics=metrics,
        )
        try:
            yield
        finally:
            await manager.close()
            await client.close()
            await tokens_http.close()

    live = LiveSettings(
        AccessRules.build(config.server.allow_from, config.server.client_token, config.server.client_token_header)
    )
    app[LIVE] = live

    async def release_waiters(app: web.Application) -> None:
        # Runs before aiohttp waits for in-flight handlers: waiting requests
        # get 503 shutting_down at once instead of holding up the shutdown.
        await app[TOKENS].close()

    async def entry(request: web.BaseRequest) -> web.StreamResponse:
        """Every request on the proxy port: no router, since every target goes to the forwarder."""
        if request.version >= (1, 1) and hdrs.EXPECT in request.headers:
            if request.headers[hdrs.EXPECT].lower() != "100-continue":
                return error_response(ExpectationFailed("only Expect: 100-continue is understood"))
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        rules = live.rules
        if rules.active:
            refusal = rules.check(request.remote, request.headers)
            if refusal is not None:
                response = error_response(refusal)
                if refusal.status == 407:
                    response.headers["Proxy-Authenticate"] = 'Bearer realm="tokenproxy"'
                return response
        return await app[FORWARDER].handle(request)

    app[ENTRY] = entry
    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(release_waiters)
    return app

"""The routes in force: one token manager per credential, one upstream client per upstream, and the Router.

Owns `Routing`: the credentials by name (each with its TokenManager, token
endpoint session and store), the upstream clients, and building a Router
from a config, at start and again on each reload. A credential that stays
(by name) keeps its manager, reconfigured; a new one gets a new manager; a
removed one is retired (closed at shutdown: a request that read the old
route may still be using it). Lives on the event loop; only the serving
loop's reloads change it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..config import Config
from ..config.schema import RouteConfig, TokenConfig, credentials_of, for_credential, for_route, routes_of
from ..core.errors import UpstreamUnreachable
from ..http.access import AccessRules
from ..http.headers import request_drop_set
from ..http.route import Route, Router
from ..observe.metrics import NULL_METRICS, Recorder
from ..tokens.change import Reconfigured, TokenChange
from ..tokens.manager import Clock, TokenManager
from ..tokens.store import FileStore, Store
from ..upstream.model import AnswerSink, Outgoing, QuickExchange, Upstream, UpstreamAnswer, UpstreamClient
from .clients import token_session, upstream_client
from .credentials import build_grant, build_policy, build_store, credential_of, make_token_manager, request_of

logger = logging.getLogger("tokenproxy")

# What a retired upstream client is told to use instead: no request goes there, so its own pool closes.
_NOWHERE = Upstream("http", "retired.invalid", 9, "")

# What a route's metrics recorder is, given its route name (Metrics.for_route, or nothing).
RouteRecorders = Callable[[str], Recorder]


class RouteClients:
    """An UpstreamClient that sends each request through the client made for its route's upstream.

    One client per upstream (URL), made with the settings of the first route
    that goes there, and kept while a route goes there; with one upstream,
    `send` is that client's own (nothing added per request). A client no
    route uses any more keeps serving the requests that still name its
    upstream, its idle connections closed at once, and is itself closed at shutdown.
    """

    def __init__(self) -> None:
        self._clients: dict[Upstream, UpstreamClient] = {}  # guarded by the event loop; replaced by `update`
        self._retired: dict[Upstream, UpstreamClient] = {}
        self.send: Callable[[Outgoing, str], Coroutine[Any, Any, UpstreamAnswer]] = self._dispatch
        self.start: Callable[[Outgoing, str, AnswerSink], QuickExchange | None] = self._start

    def update(self, wanted: Mapping[Upstream, Callable[[], UpstreamClient]]) -> None:
        """Use a client for each upstream of `wanted` (made by its factory when there is none yet)."""
        clients: dict[Upstream, UpstreamClient] = {}
        for upstream, make in wanted.items():
            client = self._clients.get(upstream)
            if client is None:
                client = self._retired.pop(upstream, None) or make()
                client.use(upstream)
            clients[upstream] = client
        for upstream, client in self._clients.items():
            if upstream not in clients:
                # Its keep-alive connections close as their requests end; late requests are served unpooled.
                client.use(_NOWHERE)
                self._retired[upstream] = client
        self._clients = clients
        only = next(iter(clients.values())) if len(clients) == 1 and not self._retired else None
        self.send = only.send if only is not None else self._dispatch
        self.start = only.start if only is not None else self._start

    async def _dispatch(self, request: Outgoing, authorization: str) -> UpstreamAnswer:
        client = self._clients.get(request.upstream) or self._retired.get(request.upstream)
        if client is None:  # pragma: no cover - every route's upstream has a client
            raise UpstreamUnreachable("no client for this route's upstream")
        return await client.send(request, authorization)

    def _start(self, request: Outgoing, authorization: str, sink: AnswerSink) -> QuickExchange | None:
        client = self._clients.get(request.upstream) or self._retired.get(request.upstream)
        return None if client is None else client.start(request, authorization, sink)

    def use(self, upstream: Upstream) -> None:
        """Nothing: `update` says which upstreams are in use."""

    async def close(self) -> None:
        """Close every client."""
        for client in (*self._clients.values(), *self._retired.values()):
            await client.close()
        self._clients.clear()
        self._retired.clear()


@dataclass
class Credential:
    """One configured credential in force: its name, its resolved `[token]` table and its token manager.

    Owned by `Routing` on the event loop; a reload replaces `token` (and may re-key `store`).
    """

    name: str
    token: TokenConfig
    manager: TokenManager
    session: aiohttp.ClientSession  # its token endpoint's (its own TLS client certificate, if any)
    store: Store  # its entry of the state file (or nothing kept)


class Routing:
    """The credentials, upstream clients and Router in force, built from a config and rebuilt on reload."""

    def __init__(self, clock: Clock = time.time, metrics: Recorder = NULL_METRICS) -> None:
        self._clock = clock
        self._metrics = metrics
        self.credentials: dict[str, Credential] = {}  # by name, in config order
        self.retired: list[Credential] = []  # removed by a reload; closed at shutdown
        self.clients = RouteClients()
        self.router = Router(())
        self.route_credentials: dict[str, str] = {}  # route name -> credential name, in config order
        # Token endpoint sessions by credential name, made for discovery or a manager; closed by close().
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def start_credentials(self, config: Config) -> None:
        """Make a token manager for each credential of a config whose discovery is done (blocking: reads the
        state file; Redis is pinged). Raises what `make_token_manager` raises; `close()` then closes what
        was made."""
        wanted = credentials_of(config)
        for name, token in wanted.items():
            self._add(config, name, token, several=len(wanted) > 1)

    def session_for(self, config: Config, name: str) -> aiohttp.ClientSession:
        """The token endpoint session of the credential `name`: its own, or a new one (closed with the rest)."""
        credential = self.credentials.get(name)
        if credential is not None:
            return credential.session
        session = self._sessions.get(name)
        if session is None:
            session = self._sessions[name] = token_session(for_credential(config, name))
        return session

    def _add(self, config: Config, name: str, token: TokenConfig, *, several: bool) -> Credential:
        view = for_credential(config, name)
        session = self.session_for(config, name)
        store = build_store(view.token)
        metrics = self._credential_metrics(name)
        manager = make_token_manager(view, session, self._clock, metrics, store, name if several else "")
        credential = Credential(name, token, manager, session, store)
        self.credentials[name] = credential
        return credential

    def _credential_metrics(self, name: str) -> Recorder:
        labelled = getattr(self._metrics, "for_credential", None)
        return labelled(name) if labelled is not None else self._metrics

    def reconfigure_credentials(self, config: Config) -> list[str]:
        """Put a reloaded config's credentials in force: same name, same manager (reconfigured); new ones made;
        removed ones retired. Returns the log lines saying what happened to each one's token."""
        notes = []
        wanted = credentials_of(config)
        several = len(wanted) > 1 or len(self.credentials) > 1
        for name, token in wanted.items():
            credential = self.credentials.get(name)
            if credential is None:
                self._add(config, name, token, several=several)
                notes.append(f"credential {name} added")
                continue
            outcome = credential.manager.reconfigure(
                build_grant(token, credential.session),
                build_policy(for_credential(config, name)),
                refresh_token=token.refresh_token or None,
                credential=credential_of(token),
                request=request_of(token),
                fetch_now=config.server.fetch_on_start or token.grant == "static",
            )
            if isinstance(credential.store, FileStore):
                credential.store.credential = credential_of(token)  # its entry follows a changed identity
            credential.token = token
            text = token_note(outcome)
            notes.append(f"credential {name}: {text}" if several else text)
        for name in [name for name in self.credentials if name not in wanted]:
            self.retired.append(self.credentials.pop(name))
            notes.append(f"credential {name} removed")
        self.credentials = {name: self.credentials[name] for name in wanted}
        for name, credential in self.credentials.items():
            credential.manager.name_in_logs(name if len(wanted) > 1 else "")
        return notes

    def build_routes(self, config: Config, recorders: RouteRecorders | None = None) -> Router:
        """The Router of a config's routes, with the managers in force; the upstream clients brought in line."""
        routes = []
        factories: dict[Upstream, Callable[[], UpstreamClient]] = {}
        for route_config in routes_of(config):
            view = for_route(config, route_config)
            route = build_route(
                view,
                self.credentials[route_config.token].manager,
                route_config,
                NULL_METRICS if recorders is None else recorders(route_config.name),
            )
            factories.setdefault(route.upstream, functools.partial(upstream_client, view))
            routes.append(route)
        self.clients.update(factories)
        self.router = Router(routes)
        self.route_credentials = {route.name: route.credential for route in routes}
        return self.router

    def in_force(self) -> tuple[dict[str, str], dict[str, TokenManager]]:
        """The routes (name -> credential name) and credentials (name -> token manager) in force: for /readyz."""
        return self.route_credentials, {name: each.manager for name, each in self.credentials.items()}

    @property
    def first(self) -> TokenManager:
        """The first credential's manager (the only one of a config without routes)."""
        return next(iter(self.credentials.values())).manager

    async def close_managers(self) -> None:
        """Answer every waiter of every credential (in force and retired) with 503 shutting_down."""
        for credential in (*self.credentials.values(), *self.retired):
            await credential.manager.close()

    async def close(self) -> None:
        """Close the managers, the upstream clients and the token endpoint sessions."""
        await self.close_managers()
        await self.clients.close()
        for session in self._sessions.values():
            await session.close()


def build_route(
    config: Config, tokens: TokenManager, route: RouteConfig | None = None, metrics: Recorder = NULL_METRICS
) -> Route:
    """The route a config (as the route sees it: `for_route`) describes: its upstream, `tokens` for its
    credential, and how it forwards."""
    server = config.server
    route = route or RouteConfig(token="default", upstream=config.upstream)
    return Route(
        upstream=Upstream.parse(config.upstream.url),
        tokens=tokens,
        access=AccessRules.build(server.allow_from, server.client_token, server.client_token_header),
        refresh_on=frozenset(config.token.refresh_on),
        replay_limit=config.retry.replay_limit,
        drop=request_drop_set((server.client_token_header,) if server.client_token else ()),
        rewrite_redirects=config.upstream.rewrite_redirects,
        name=route.name,
        credential=route.token,
        host=route.host,
        path_prefix=route.path_prefix,
        strip_prefix=route.strip_prefix,
        metrics=metrics,
    )


def token_note(outcome: Reconfigured) -> str:
    """What the log says a reload did to the current token, naming the keys (never their values) that changed."""
    keys = f" ({', '.join(outcome.keys)})" if outcome.keys else ""
    if outcome.change is TokenChange.KEPT:
        return "current token kept"
    if outcome.change is TokenChange.REQUEST:
        return f"token request changed{keys}: a new token will be fetched"
    if outcome.change is TokenChange.LOGIN:
        return f"login changed{keys}: a new token will be fetched"
    return f"credential changed{keys}: a new token will be fetched"

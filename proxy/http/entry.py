"""The proxy port's one request handler: what is settled before a request is forwarded.

Owns: `Expect`, the access check (with `Proxy-Authenticate` on a 407), and
picking the request's route once on arrival (404 `no_route` when none takes
it). Knows nothing of how the routes were built from the config, nor of
what forwarding does with the route.
"""

from __future__ import annotations

from ..core.errors import BadRequest, ExpectationFailed, NoRoute, ProxyError
from ..observe.log import access_line
from ..observe.metrics import NULL_METRICS, Recorder
from .access import PROXY_CHALLENGE
from .exchange import Request
from .forward import CONNECT_LATER, Forwarder
from .route import Route, Router, authority_of, split_host


def route_of(router: Router, request: Request) -> Route | None:
    """The route that takes `request`: by its Host header and path, or, for an absolute-form target, by the
    host and path it names (only a host a route names); None when no route does."""
    target = request.target
    if target.startswith("/"):
        return router.match(request.host.lower(), target)
    authority = authority_of(target)
    if authority is None:
        return None
    rest = target.partition("://")[2][len(authority) :]
    return router.match_absolute(authority, rest if rest.startswith("/") else "/" + rest)


def names_tunnel_host(request: Request, tunnel: str) -> bool:
    """Whether a request inside the CONNECT tunnel to `tunnel` (`name:port`) names that host: its absolute-form
    target, else its Host header (the port, when given, must be the tunnel's)."""
    target = request.target
    named = authority_of(target) if not target.startswith("/") else request.host.lower()
    if not named:
        return False
    name, port = split_host(named)
    tunnel_name, tunnel_port = split_host(tunnel)
    return name.rstrip(".") == tunnel_name and port in ("", tunnel_port)


def tunnel_route(router: Router, request: Request, tunnel: str) -> Route | None:
    """The route of a request inside an intercepted tunnel: by the CONNECT host and the request's path."""
    target = request.target
    if not target.startswith("/"):
        authority = authority_of(target) or ""
        rest = target.partition("://")[2][len(authority) :]
        target = rest if rest.startswith("/") else "/" + rest
    return router.match(tunnel, target)


class Entry:
    """Every request on the proxy port: routed, checked, then forwarded along its route.

    `router` is replaced whole (by a reload, on the event loop); a request
    reads it once on arrival and keeps the route it picked to its end. The
    proxy's own refusals are logged and counted as forwarded requests are:
    by their route's recorder, or by `metrics` as unrouted.
    """

    __slots__ = ("_forwarder", "_metrics", "router")

    def __init__(self, forwarder: Forwarder, router: Router, metrics: Recorder = NULL_METRICS) -> None:
        self._forwarder = forwarder
        self._metrics = metrics
        self.router = router

    def start(self, request: Request) -> bool:
        """Begin forwarding `request` in callbacks when it needs no answer of the proxy's own first (a route
        takes it, no `Expect`, the access rules let it in); False when `handle` must serve it."""
        router = self.router
        route = router.everything
        tunnel = request.tunnel
        if tunnel is not None:
            if not names_tunnel_host(request, tunnel):
                return False
            route = tunnel_route(router, request, tunnel)
        elif route is None:
            route = route_of(router, request)
        if route is None or request.expect is not None:
            return False
        access = route.access
        if access.active and tunnel is None and access.check(request.remote, request.headers) is not None:
            return False
        return self._forwarder.start(request, route)

    async def handle(self, request: Request) -> None:
        """Refuse a request no route takes; answer `Expect`; refuse a client the access rules do not let in;
        else forward. The answer is written to the request's connection."""
        router = self.router
        route = router.everything
        tunnel = request.tunnel
        if tunnel is not None:
            # The token goes only where the CONNECT went: a request naming another host is refused.
            if not names_tunnel_host(request, tunnel):
                self._refuse(
                    request,
                    None,
                    BadRequest(
                        f"a request inside the tunnel to {tunnel} must name that host "
                        "(its Host header or absolute-form target)"
                    ),
                    close=True,
                )
                return
            route = tunnel_route(router, request, tunnel)
        elif route is None:
            route = route_of(router, request)
        expect = request.expect if request.version >= (1, 1) else None
        if route is None:
            if request.method == "CONNECT":  # a first CONNECT never reaches here (connect.py)
                self._refuse(request, None, BadRequest(CONNECT_LATER), close=True)
                return
            # With Expect, its body was not asked for: the connection cannot carry another request.
            self._refuse(
                request,
                None,
                NoRoute("no configured route takes this request's host and path"),
                close=expect is not None,
            )
            return
        if expect is not None:
            if expect.lower() != "100-continue":
                self._refuse(request, route, ExpectationFailed("only Expect: 100-continue is understood"))
                return
            request.write_continue()
        access = route.access
        if access.active and tunnel is None:  # a tunnel's CONNECT was checked (its client token is not resent)
            refusal = access.check(request.remote, request.headers)
            if refusal is not None:
                extra = PROXY_CHALLENGE if refusal.status == 407 else b""
                self._refuse(request, route, refusal, extra=extra)
                return
        await self._forwarder.handle(request, route)

    def _refuse(
        self, request: Request, route: Route | None, error: ProxyError, *, close: bool = False, extra: bytes = b""
    ) -> None:
        """Answer `request` with `error` instead of forwarding it; count it (for `route`, else as unrouted) and
        log its access line."""
        request.answer_error(error, close=close, extra=extra)
        if route is None:
            self._metrics.unrouted()
        else:
            route.metrics.request_done(error.status)
        access_line(
            request.method, request.target, error.status, 0.0, False, None, "-" if route is None else route.name
        )

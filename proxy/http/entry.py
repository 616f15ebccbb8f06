"""The proxy port's one request handler: what is settled before a request is forwarded.

Owns: `Expect`, the access check (with `Proxy-Authenticate` on a 407), and
picking the request's route once on arrival (404 `no_route` when none takes
it). Knows nothing of how the routes were built from the config, nor of
what forwarding does with the route.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from ..core.errors import BadRequest, ExpectationFailed, NoRoute
from ..observe.log import access_line
from .forward import CONNECT_LATER, Forwarder
from .render import error_response
from .route import Route, Router, authority_of, split_host

# Sent with a 407 so a client knows how to present the client token.
_PROXY_AUTHENTICATE = 'Bearer realm="tokenproxy"'


def route_of(router: Router, request: web.BaseRequest) -> Route | None:
    """The route that takes `request`: by its Host header and path, or, for an absolute-form target, by the
    host and path it names (only a host a route names); None when no route does."""
    target = request.raw_path
    if target.startswith("/"):
        return router.match(request.headers.get(hdrs.HOST, "").lower(), target)
    authority = authority_of(target)
    if authority is None:
        return None
    rest = target.partition("://")[2][len(authority) :]
    return router.match_absolute(authority, rest if rest.startswith("/") else "/" + rest)


def names_tunnel_host(request: web.BaseRequest, tunnel: str) -> bool:
    """Whether a request inside the CONNECT tunnel to `tunnel` (`name:port`) names that host: its absolute-form
    target, else its Host header (the port, when given, must be the tunnel's)."""
    target = request.raw_path
    named = authority_of(target) if not target.startswith("/") else request.headers.get(hdrs.HOST, "").lower()
    if not named:
        return False
    name, port = split_host(named)
    tunnel_name, tunnel_port = split_host(tunnel)
    return name.rstrip(".") == tunnel_name and port in ("", tunnel_port)


def tunnel_route(router: Router, request: web.BaseRequest, tunnel: str) -> Route | None:
    """The route of a request inside an intercepted tunnel: by the CONNECT host and the request's path."""
    target = request.raw_path
    if not target.startswith("/"):
        authority = authority_of(target) or ""
        rest = target.partition("://")[2][len(authority) :]
        target = rest if rest.startswith("/") else "/" + rest
    return router.match(tunnel, target)


class Entry:
    """Every request on the proxy port: routed, checked, then forwarded along its route.

    `router` is replaced whole (by a reload, on the event loop); a request
    reads it once on arrival and keeps the route it picked to its end.
    """

    __slots__ = ("_forwarder", "router")

    def __init__(self, forwarder: Forwarder, router: Router) -> None:
        self._forwarder = forwarder
        self.router = router

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Refuse a request no route takes; answer `Expect`; refuse a client the access rules do not let in;
        else forward."""
        router = self.router
        route = router.everything
        tunnel: str | None = getattr(request.protocol, "tunnel", None)
        if tunnel is not None:
            # The token goes only where the CONNECT went: a request naming another host is refused.
            if not names_tunnel_host(request, tunnel):
                answer = error_response(
                    BadRequest(f"a request inside the tunnel to {tunnel} must name that host (Host header)")
                )
                answer.force_close()
                return answer
            route = tunnel_route(router, request, tunnel)
        elif route is None:
            route = route_of(router, request)
        if route is None:
            if request.method == hdrs.METH_CONNECT:  # a first CONNECT never reaches aiohttp (connect.py)
                answer = error_response(BadRequest(CONNECT_LATER))
                answer.force_close()
                return answer
            access_line(request.method, request.raw_path.partition("?")[0], NoRoute.status, 0.0, False, None, "-")
            answer = error_response(NoRoute("no configured route takes this request's host and path"))
            if request.version >= (1, 1) and hdrs.EXPECT in request.headers:
                answer.force_close()  # its body was not asked for: the connection cannot carry another request
            return answer
        if request.version >= (1, 1) and hdrs.EXPECT in request.headers:
            if request.headers[hdrs.EXPECT].lower() != "100-continue":
                return error_response(ExpectationFailed("only Expect: 100-continue is understood"))
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        access = route.access
        if access.active and tunnel is None:  # a tunnel's CONNECT was checked (its client token is not resent)
            refusal = access.check(request.remote, request.headers)
            if refusal is not None:
                response = error_response(refusal)
                if refusal.status == 407:
                    response.headers[hdrs.PROXY_AUTHENTICATE] = _PROXY_AUTHENTICATE
                return response
        return await self._forwarder.handle(request, route)

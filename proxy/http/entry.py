"""The proxy port's one request handler: what is settled before a request is forwarded.

Owns: `Expect`, the access check (with `Proxy-Authenticate` on a 407), and
picking the request's route once on arrival (404 `no_route` when none takes
it). Knows nothing of how the routes were built from the config, nor of
what forwarding does with the route.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from ..core.errors import ExpectationFailed, NoRoute
from ..observe.log import access_line
from .forward import Forwarder
from .render import error_response
from .route import Route, Router, authority_of

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
        if route is None:
            route = route_of(router, request)
            if route is None:
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
        if access.active:
            refusal = access.check(request.remote, request.headers)
            if refusal is not None:
                response = error_response(refusal)
                if refusal.status == 407:
                    response.headers[hdrs.PROXY_AUTHENTICATE] = _PROXY_AUTHENTICATE
                return response
        return await self._forwarder.handle(request, route)

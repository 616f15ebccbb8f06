"""The proxy port's one request handler: what is settled before a request is forwarded.

Owns: `Expect`, the access check (with `Proxy-Authenticate` on a 407), and
reading the current route once per request. Knows nothing of how the route
was built from the config, nor of what forwarding does with it.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from ..core.errors import ExpectationFailed
from .forward import Forwarder
from .render import error_response
from .route import Route

# Sent with a 407 so a client knows how to present the client token.
_PROXY_AUTHENTICATE = 'Bearer realm="tokenproxy"'


class Entry:
    """Every request on the proxy port, without a router: each one is checked, then forwarded along the route.

    `route` is replaced whole (by a reload, on the event loop); a request
    reads it once on arrival and keeps that value to its end.
    """

    __slots__ = ("_forwarder", "route")

    def __init__(self, forwarder: Forwarder, route: Route) -> None:
        self._forwarder = forwarder
        self.route = route

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer `Expect`, refuse a client the access rules do not let in, else forward."""
        route = self.route
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

"""Where a request goes and how it is treated there: the Route, and the Router that picks one.

Owns: the `Route` value and the `Router`. A Route is built once from the
config by the composition root, replaced whole on reload, and read once per
request, so a request finishes with the settings it started with. The
Router is built once per config and answers `match(host, path)` with a dict
lookup and a short prefix scan. Knows nothing of the config file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..observe.metrics import NULL_METRICS, Recorder
from ..tokens.manager import TokenManager
from ..upstream.model import Upstream
from .access import AccessRules


@dataclass(frozen=True, slots=True)
class Route:
    """One upstream with the credential it is sent and the forwarding settings it is sent with."""

    upstream: Upstream
    tokens: TokenManager  # the credential's token manager, shared by every route that names it
    access: AccessRules  # who may use this route
    refresh_on: frozenset[int]  # upstream statuses that mean "renew the token and resend"
    replay_limit: int  # the largest body kept to be resent
    drop: frozenset[str]  # request headers never forwarded (lower-case), the client token's among them
    rewrite_redirects: bool  # re-point a Location naming the upstream at the proxy
    name: str = "default"  # in logs and metrics
    credential: str = "default"  # the name of the credential `tokens` serves
    host: str = ""  # lower-case, maybe with a port; "" matches any host
    path_prefix: str = ""  # "" matches any path
    strip_prefix: bool = False  # remove path_prefix before forwarding
    metrics: Recorder = NULL_METRICS  # what this route's requests record, labelled with its name

    def takes(self, path: str) -> bool:
        """True when `path` (an origin-form target) lies under path_prefix: `/api` takes /api, /api/x, /api?q,
        never /apix."""
        prefix = self.path_prefix
        if not prefix:
            return True
        return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] in "/?")

    def forwarded_target(self, target: str) -> str:
        """The origin-form target sent upstream: with strip_prefix, path_prefix taken off (`/api?q` -> `/?q`)."""
        if not self.strip_prefix:
            return target
        rest = target[len(self.path_prefix) :]
        return rest if rest.startswith("/") else "/" + rest

    def origin_form_of(self, target: str) -> str | None:
        """The path and query of an absolute-form target this route takes: one naming its upstream's host, or,
        for a route matched by its host, any target (the Router checked that it names that host)."""
        form = self.upstream.origin_form_of(target)
        if form is not None or not self.host:
            return form
        authority = target.partition("://")[2]
        cut = min((i for i in (authority.find("/"), authority.find("?")) if i != -1), default=len(authority))
        rest = authority[cut:]
        return rest if rest.startswith("/") else "/" + rest


def split_host(host: str) -> tuple[str, str]:
    """`name:port` as (name, port); (name, "") without a port; an IPv6 `[addr]` keeps its brackets."""
    name, sep, port = host.rpartition(":")
    if not sep or name.endswith(":") or (host.startswith("[") and not name.endswith("]")) or not port.isdigit():
        return host, ""
    return name, port


def authority_of(target: str) -> str | None:
    """The lower-case host (and port) an absolute-form target names; None when it names none (or a user)."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=len(rest))
    authority = rest[:cut].lower()
    if not authority or "@" in authority:
        return None
    return authority


class Router:
    """Picks the route of a request: the first configured route whose host and path_prefix take it.

    Built once per config (and per reload); `match` is a dict lookup by host
    and a scan of the few routes for that host. Immutable once built.
    """

    __slots__ = ("_absolute", "_any_host", "_by_host", "everything", "routes")

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        # One route that takes every request (today's single [upstream]): no lookup at all.
        only = self.routes[0] if len(self.routes) == 1 else None
        self.everything = only if only is not None and not only.host and not only.path_prefix else None
        hosts = {route.host for route in self.routes if route.host}
        self._by_host = {host: self._candidates(host, any_host=True) for host in hosts}
        self._any_host = tuple(route for route in self.routes if not route.host)
        # Absolute-form targets: only routes that name the host, or take any host and go to that very host.
        names = hosts | {_authority(route.upstream) for route in self._any_host} | {
            route.upstream.host.lower() for route in self._any_host
        }
        self._absolute = {name: self._candidates(name, any_host=False) for name in names}

    def _candidates(self, host: str, *, any_host: bool) -> tuple[Route, ...]:
        """The routes, in order, that take requests for `host`: those naming it (with or without a port)."""
        name, port = split_host(host)
        found = []
        for route in self.routes:
            if route.host:
                if route.host == host or (port and route.host == name):
                    found.append(route)
            elif any_host or host in (_authority(route.upstream), route.upstream.host.lower()):
                found.append(route)
        return tuple(found)

    def match(self, host: str, path: str) -> Route | None:
        """The route for an origin-form request with this Host header (lower-case) and target; None for none."""
        candidates = self._by_host.get(host)
        if candidates is None:
            name, port = split_host(host)
            candidates = self._by_host.get(name, self._any_host) if port else self._any_host
        for route in candidates:
            if route.takes(path):
                return route
        return None

    def match_absolute(self, authority: str, path: str) -> Route | None:
        """The route for an absolute-form target naming `authority` (lower-case): only one that names that host
        (or goes to it); a host no route names gets None, so the token never goes there."""
        candidates = self._absolute.get(authority)
        if candidates is None:
            name, port = split_host(authority)
            candidates = self._absolute.get(name, ()) if port else ()
        for route in candidates:
            if route.takes(path):
                return route
        return None


def _authority(upstream: Upstream) -> str:
    """`host:port` of an upstream, lower-case, as an absolute-form target may name it."""
    host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    return f"{host}:{upstream.port}".lower()

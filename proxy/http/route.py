"""Where a request goes and how it is treated there: the Route.

Owns: the `Route` value. It is built once from the config by the
composition root, replaced whole on reload, and read once per request, so a
request finishes with the settings it started with. Knows nothing of the
config file or of how a route is matched.
"""

from __future__ import annotations

from dataclasses import dataclass

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

"""What every grant is: the Grant protocol, what a fetch gives back, and what a grant type provides.

Owns: the interface the token manager calls (`Grant`, `TokenResponse`,
`BadAnswer`) and the shape of a registry entry (`GrantType`: settings,
checks, builder, identity, request shape). Knows nothing of any one grant, of the config
file or of how a token is cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import aiohttp

from ..core.errors import GrantError

# One problem with a grant's settings: the key (relative to the section holding the grant's keys)
# and what is wrong with it, e.g. ("client_id", "is required for grant 'client_credentials'").
Problem = tuple[str, str]

# What shapes a grant's token request, key by key: (key, value), a secret's value given only as its fingerprint.
# Two configs whose shapes are equal ask the endpoint for the same token; the keys that differ name the change.
RequestShape = tuple[tuple[str, str], ...]


class BadAnswer(GrantError):
    """A 2xx answer with no usable token in it.

    `refresh_token` is a rotated refresh token the answer did carry: the
    endpoint has spent the one presented, so this one must be kept and
    presented next, whatever else is wrong with the answer.
    """

    def __init__(self, reason: str, *, refresh_token: str | None = None) -> None:
        super().__init__(reason)
        self.refresh_token = refresh_token


@dataclass(frozen=True)
class TokenResponse:
    """What a token endpoint gave (RFC 6749 §5.1): the access token, its lifetime if stated, a rotated
    refresh token, and the token type and granted scope when the endpoint named them."""

    access_token: str
    expires_in: float | None = None
    refresh_token: str | None = None
    token_type: str | None = None
    scope: str | None = None


class Grant(Protocol):
    """A way of obtaining an access token."""

    @property
    def name(self) -> str:
        """The grant's name, for logs and metrics."""

    @property
    def uses_refresh_token(self) -> bool:
        """True when each call spends (and may rotate) a refresh token."""

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """Ask the endpoint once; raise GrantError when no token comes back.

        A grant that calls an endpoint holds its own HTTP session (given when it
        is built); the caller does not know how a token is obtained.
        """


@dataclass(frozen=True)
class GrantContext:
    """What a grant is built with besides its own settings: the settings every grant shares."""

    session: aiohttp.ClientSession = field(repr=False, compare=False)  # carries calls to the endpoint
    timeout: float  # the most one call to the endpoint may take, in seconds
    default_lifetime: float  # how long a token lives when nothing says so, in seconds


S = TypeVar("S")


@dataclass(frozen=True)
class GrantType(Generic[S]):
    """One grant as the registry knows it: everything needed to configure, check, build and identify it.

    `settings` is a frozen dataclass of only this grant's keys (defaults
    included; a field with `metadata=secret()` holds a credential). `check`
    names each problem with those settings; `build` makes the Grant;
    `identity` gives what identifies the credential (never a secret): the
    parts its state is keyed by in state files and metrics. `request` gives
    everything the token request carries (scope, audience, client
    authentication, a body template...) but the client's own secret: a token
    fetched with one request shape is not the token another one asks for,
    even for the same credential.
    """

    name: str
    settings: type[S]
    check: Callable[[S], Sequence[Problem]]
    build: Callable[[S, GrantContext], Grant]
    identity: Callable[[S], tuple[str, ...]]
    uses_refresh_token: bool
    request: Callable[[S], RequestShape]


def changed_keys(old: RequestShape, new: RequestShape) -> list[str]:
    """The keys whose values differ between two request shapes (in the order `new` names them, then gone ones)."""
    before, after = dict(old), dict(new)
    keys = [key for key in after if before.get(key) != after[key]]
    return keys + [key for key in before if key not in after]

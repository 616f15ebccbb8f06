"""What a reload does to the current token: kept, or replaced, and why.

Owns the decision alone (`decide_change`), a pure function of what the
token manager holds and what the reloaded config asks for. Knows nothing
of tokens' values, of refreshes or of the config file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..auth.protocol import RequestShape, changed_keys


class TokenChange(enum.Enum):
    """What a reload did to the current token."""

    KEPT = "kept"  # it still answers the configured request
    REQUEST = "request"  # the same credential asks for another token: a new one, on the same refresh-token chain
    LOGIN = "login"  # a newly configured refresh token: a new chain, a new token
    CREDENTIAL = "credential"  # another credential: a new chain, a new token


@dataclass(frozen=True)
class Reconfigured:
    """The outcome of a reload for the token: what changed, and the keys (never their values) that did."""

    change: TokenChange
    keys: tuple[str, ...]

    @property
    def kept(self) -> bool:
        """True when the current token is still the one to send."""
        return self.change is TokenChange.KEPT


def decide_change(
    credential: str, seed: str, request: RequestShape, *, new_credential: str, new_seed: str, new_request: RequestShape
) -> Reconfigured:
    """Compare what is in force (credential id, the seed of the refresh-token chain, the request's shape)
    with a reloaded config's. An empty `new_seed` (no refresh token configured) continues the chain held."""
    keys = tuple(changed_keys(request, new_request))
    if new_credential != credential:
        return Reconfigured(TokenChange.CREDENTIAL, keys)
    if new_seed and new_seed != seed:
        return Reconfigured(TokenChange.LOGIN, ("refresh_token", *keys))
    return Reconfigured(TokenChange.REQUEST if keys else TokenChange.KEPT, keys)

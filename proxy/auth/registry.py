"""The grant registry: each `token.grant` name and its GrantType (settings, checks, builder, identity).

Adding a grant is its module in `grants/` and one line here. The order is
the one messages list the choices in.
"""

from __future__ import annotations

from typing import Any

from .grants import client_credentials, command, json, password, refresh_token, static, token_exchange
from .protocol import GrantType

GRANTS: dict[str, GrantType[Any]] = {
    grant.name: grant
    for grant in (
        refresh_token.GRANT,
        client_credentials.GRANT,
        password.GRANT,
        token_exchange.GRANT,
        command.GRANT,
        json.GRANT,
        static.GRANT,
    )
}


def identity_of(grant_name: str, settings: Any) -> tuple[str, ...]:
    """What makes a credential this one and not another: the grant and what its registry entry names.

    For a grant that spends no refresh token, what its request asks for
    (scope, audience, params, the command, the static token's fingerprint)
    too: a token for another audience is another credential's. A refresh
    token's chain stays one credential whatever scope it is asked for, so
    that a changed scope never sends the proxy back to a spent refresh token.
    """
    grant = GRANTS[grant_name]
    parts = (grant_name, *grant.identity(settings))
    if not grant.uses_refresh_token:
        parts += tuple(f"{key}={value}" for key, value in grant.request(settings))
    return parts

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

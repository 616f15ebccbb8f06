"""Token revocation (RFC 7009): telling the authorization server a refresh token is no longer wanted.

Owns: the revocation request, with the client's authentication as for the
token endpoint. Knows nothing of the state file. Never shows the token.
"""

from __future__ import annotations

import functools

from ...core.causes import safe_url
from ...core.errors import GrantError
from ..endpoint import TokenEndpoint, exchange


def _server_trouble(url: str, status: int) -> GrantError | None:
    if status != 200:
        return GrantError(f"revocation endpoint {safe_url(url)}: answered {status}")
    return None


async def revoke(endpoint: TokenEndpoint, url: str, refresh_token: str) -> None:
    """Revoke `refresh_token` at `url` (§2.1); GrantError naming the endpoint when it is not answered 200."""
    form = {"token": refresh_token, "token_type_hint": "refresh_token"}
    headers: dict[str, str] = {}
    endpoint.client.apply(form, headers)
    await exchange(
        endpoint.session,
        "POST",
        url,
        data=form,
        headers=headers,
        timeout=endpoint.timeout,
        refuse=functools.partial(_server_trouble, url),
        what="revocation endpoint",
    )

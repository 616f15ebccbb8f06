"""Dynamic client registration (RFC 7591): a public client for `tokenproxy login` when the config names none.

Owns: the registration request (a native, public client: no secret,
`token_endpoint_auth_method = "none"`, the loopback redirect, the grants a
login and the proxy use) and reading the client id from the answer. Knows
nothing of where the registration is kept.
"""

from __future__ import annotations

import functools
import json

import aiohttp

from ...core.causes import safe_url
from ...core.errors import GrantError
from ..endpoint import exchange, parse_json
from .device import DEVICE_GRANT
from .prompt import LoginError


def _refused(url: str, status: int) -> GrantError | None:
    if status not in (200, 201):
        return GrantError(f"registration endpoint {safe_url(url)}: answered {status}")
    return None


async def register_client(
    session: aiohttp.ClientSession, url: str, redirect_uri: str, scope: str, timeout: float
) -> str:
    """Register a public client at `url` and return its client id; LoginError when it cannot be had."""
    metadata = {
        "client_name": "tokenproxy",
        "application_type": "native",
        "token_endpoint_auth_method": "none",
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token", DEVICE_GRANT],
        "response_types": ["code"],
        **({"scope": scope} if scope else {}),
    }
    try:
        answer = await exchange(
            session,
            "POST",
            url,
            data=json.dumps(metadata),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            timeout=timeout,
            refuse=functools.partial(_refused, url),
            what="registration endpoint",
        )
        data = parse_json(answer.body, answer.content_type, url=url)
    except GrantError as error:
        raise LoginError(f"registering a client failed: {error}") from None
    client_id = data.get("client_id") if isinstance(data, dict) else None
    if not isinstance(client_id, str) or not client_id:
        raise LoginError(f"registration endpoint {safe_url(url)}: the answer has no client_id")
    return client_id

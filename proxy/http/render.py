"""The one way tokenproxy's own answers are rendered.

Owns: turning a ProxyError into the JSON answer every port gives
(`{"error": code, "detail": sentence}` and `X-Tokenproxy-Error`). Knows
nothing of where the error came from.
"""

from __future__ import annotations

import json

from aiohttp import web

from ..core.errors import ProxyError


def error_response(error: ProxyError) -> web.Response:
    """Render a ProxyError as tokenproxy's JSON answer."""
    headers = {"X-Tokenproxy-Error": error.code}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, error.retry_after))
    body = json.dumps({"error": error.code, "detail": error.detail})
    return web.Response(
        status=error.status,
        body=body.encode(),
        content_type="application/json",
        headers=headers,
    )

"""An API that wants a valid JWT from the demo token server, checked with no clock skew.

Owns: the bearer check (missing, invalid or expired token: 401 with a
`WWW-Authenticate` challenge) and an echo of what it received. Knows
nothing of the proxy. The tests' fake API checks tokens with `bearer_claims`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web


def bearer_claims(request: web.BaseRequest, signing_key: str) -> dict[str, Any] | str:
    """The claims of the request's bearer token, or why it is refused (missing, invalid, expired)."""
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        return "missing bearer token"
    try:
        claims: dict[str, Any] = jwt.decode(auth[7:], signing_key, algorithms=["HS256"], leeway=0)
    except jwt.ExpiredSignatureError:
        return "token expired"
    except jwt.PyJWTError:
        return "token invalid"
    return claims


@dataclass
class DemoApi:
    """An API that wants a valid JWT (zero clock skew) and echoes what it received."""

    signing_key: str

    def app(self) -> web.Application:
        """The aiohttp app: every path echoes method, path, query and who called."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        """Check the bearer, then describe the request."""
        claims = bearer_claims(request, self.signing_key)
        if isinstance(claims, str):
            return self._unauthorized(claims)
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "user": claims["sub"],
                "token_expires_in": round(claims["exp"] - time.time(), 1),
                "body_bytes": len(body),
            }
        )

    @staticmethod
    def _unauthorized(why: str) -> web.Response:
        return web.json_response(
            {"error": "invalid_token", "detail": why},
            status=401,
            headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{why}"'},
        )

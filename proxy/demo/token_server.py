"""An OAuth2 token endpoint (RFC 6749 §4-6) that behaves like a real one.

Owns: issuing HS256 JWT access tokens; the refresh_token, client_credentials
and password grants; client authentication (HTTP Basic or in the form);
rotating refresh tokens and revoking the whole grant when a rotated-away one
is presented again, as real servers do. Knows nothing of the proxy.

The demo serves it as it is; the tests' fake adds fault modes and the
benchmark's server a delay by overriding `record`, `intercept` and `issue`.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

GRANTS = frozenset({"refresh_token", "client_credentials", "password"})


def new_refresh_token() -> str:
    """A fresh, unguessable refresh token."""
    return "rt-" + secrets.token_urlsafe(16)


def oauth_error(code: str, status: int = 400) -> web.Response:
    """An RFC 6749 §5.2 error answer."""
    return web.json_response({"error": code}, status=status)


@dataclass
class TokenServer:
    """The token endpoint and its state; change the attributes to change how it behaves.

    Its handlers run on one event loop and never await between reading and
    changing the refresh-token state, so no lock guards it.
    """

    signing_key: str = field(default_factory=lambda: secrets.token_hex(32))
    lifetime: Any = 300.0  # expires_in, sent as it is; None leaves it out
    jwt_lifetime: float = 3600.0  # the access token's `exp` claim, seconds from now
    subject: str = "demo-user"
    client_id: str | None = None  # with client_secret, the one client it serves; None serves any client
    client_secret: str = ""
    users: dict[str, str] = field(default_factory=dict)  # the password grant's username -> password
    grants: frozenset[str] = GRANTS
    rotate: bool = True
    current_refresh: str = field(default_factory=new_refresh_token)
    used_refresh: set[str] = field(default_factory=set)
    reuse_detected: bool = False
    revoked: bool = False
    count: int = 0  # requests received, answered or not

    def app(self) -> web.Application:
        """The aiohttp app serving POST /oauth/token."""
        app = web.Application()
        app.router.add_post("/oauth/token", self.oauth_token)
        return app

    def expiry(self, now: float) -> Any:
        """The `exp` claim of an access token issued at `now`."""
        return now + self.jwt_lifetime

    def new_access(self) -> str:
        """Sign a fresh access token."""
        now = time.time()
        claims = {"sub": self.subject, "iat": int(now), "exp": self.expiry(now), "jti": secrets.token_hex(6)}
        return jwt.encode(claims, self.signing_key, algorithm="HS256")

    def issue(self) -> dict[str, Any]:
        """The access-token fields of a successful answer: `access_token` and `expires_in`."""
        fields: dict[str, Any] = {"access_token": self.new_access()}
        if self.lifetime is not None:
            fields["expires_in"] = self.lifetime
        return fields

    def spend_refresh(self, presented: str | None) -> bool:
        """Accept the current refresh token and rotate it; a rotated-away one revokes the grant. False: refused."""
        if presented in self.used_refresh:
            self.reuse_detected = True
            self.revoked = True
        if self.revoked or presented != self.current_refresh:
            return False
        if self.rotate:
            self.used_refresh.add(self.current_refresh)
            self.current_refresh = new_refresh_token()
        return True

    def record(self, request: web.Request, form: dict[str, str]) -> None:
        """Note a request as it arrives."""
        self.count += 1

    async def intercept(self, request: web.Request) -> web.StreamResponse | None:
        """An answer to give instead of the real one, or None to answer normally; may wait first."""
        return None

    def client_allowed(self, request: web.Request, form: dict[str, str]) -> bool:
        """Whether the client authenticated (HTTP Basic or form fields), when this server names its client."""
        if self.client_id is None:
            return True
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
        return client_id == self.client_id and client_secret == self.client_secret

    async def oauth_token(self, request: web.Request) -> web.StreamResponse:
        """POST /oauth/token: check the client and the grant, then answer a token."""
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.record(request, form)
        instead = await self.intercept(request)
        if instead is not None:
            return instead
        if not self.client_allowed(request, form):
            return oauth_error("invalid_client", 401)
        grant = form.get("grant_type", "")
        if grant not in self.grants:
            return oauth_error("unsupported_grant_type")
        answer: dict[str, Any] = {"token_type": "Bearer"}
        if grant == "refresh_token":
            if not self.spend_refresh(form.get("refresh_token")):
                return oauth_error("invalid_grant")
            answer["refresh_token"] = self.current_refresh
        elif grant == "password":
            username = form.get("username", "")
            if username not in self.users or self.users[username] != form.get("password"):
                return oauth_error("invalid_grant")
        answer.update(self.issue())
        return web.json_response(answer)

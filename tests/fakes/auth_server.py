"""A fake OAuth 2.0 authorization server for discovery and `tokenproxy login`, on 127.0.0.1.

Serves RFC 8414 metadata (or a 404, another issuer, HTML), the device
authorization endpoint (RFC 8628) with a scripted sequence of poll
answers, an authorization endpoint that redirects straight back (the test
plays the browser over HTTP), a token endpoint checking the PKCE verifier
(RFC 7636 S256) and rotating refresh tokens, revocation (RFC 7009), and a
small API that accepts the access tokens it issued and otherwise answers
401 with an RFC 9728 `resource_metadata` challenge. Records what it
issued, so tests can check that no secret ever appears in output or logs.
A test can end the grants issued so far (`revoke_grants`), have the API
refuse the access tokens issued so far (`refuse_access`), and hold refresh
requests at a gate.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from aiohttp import web

PUBLIC_CLIENT = "login-client"


@dataclass
class FakeAuthServer:
    """The server's state; set the attributes to steer it."""

    base_url: str = ""  # set by whoever starts it
    metadata_mode: str = "ok"  # ok | 404 | mismatch | html
    device_script: list[str] = field(default_factory=lambda: ["ok"])  # poll answers in turn; the last repeats
    device_interval: int = 0
    expires_in: int = 300
    issued_access: list[str] = field(default_factory=list)
    issued_refresh: list[str] = field(default_factory=list)
    secrets_seen: list[str] = field(default_factory=list)  # codes, verifiers, device codes
    revoked: list[str] = field(default_factory=list)
    polls: int = 0
    polled_at: list[float] = field(default_factory=list)  # `clock()` at each device-code poll
    clock: Callable[[], float] = time.monotonic
    metadata_requests: list[str] = field(default_factory=list)
    authorize_error: str = ""  # when set, the authorization endpoint answers with this error instead of a code
    authorize_iss: str | None = None  # when set, the `iss` the redirect carries (RFC 9207)
    registered: dict[str, list[str]] = field(default_factory=dict)  # client id -> its redirect URIs
    refused_access: set[str] = field(default_factory=set)  # access tokens the API no longer accepts
    accepted: list[str] = field(default_factory=list)  # access tokens the API accepted, in order
    refreshes: list[str] = field(default_factory=list)  # refresh tokens presented, in order
    device_issued: asyncio.Event = field(default_factory=asyncio.Event)  # set when a device-code poll got tokens
    refresh_arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set when a refresh request came in
    refresh_gate: asyncio.Event | None = None  # when set, a refresh request waits for it before being answered
    _codes: dict[str, dict[str, str]] = field(default_factory=dict)

    def _known(self, client_id: Any) -> bool:
        return client_id == PUBLIC_CLIENT or client_id in self.registered

    def _redirect_ok(self, client_id: str, redirect_uri: str) -> bool:
        """A registered client's loopback redirect matches whatever its port (RFC 8252 §7.3)."""
        if client_id == PUBLIC_CLIENT:
            return True
        parts = urlsplit(redirect_uri)
        portless = urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
        return portless in self.registered[client_id]

    def revoke_grants(self) -> None:
        """End every grant issued so far, as an administrator would: its refresh and access tokens are refused."""
        self.revoked.extend(self.issued_refresh)
        self.refuse_access()

    def refuse_access(self) -> None:
        """The API refuses the access tokens issued so far (as once they have expired)."""
        self.refused_access.update(self.issued_access)

    @property
    def issuer(self) -> str:
        """The issuer this server names in its metadata."""
        return self.base_url

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 metadata for this server."""
        base = self.base_url
        return {
            "issuer": self.issuer if self.metadata_mode != "mismatch" else "https://elsewhere.example",
            "token_endpoint": f"{base}/token",
            "authorization_endpoint": f"{base}/authorize",
            "device_authorization_endpoint": f"{base}/device",
            "revocation_endpoint": f"{base}/revoke",
            "registration_endpoint": f"{base}/register",
            "token_endpoint_auth_methods_supported": ["none"],
            "code_challenge_methods_supported": ["S256"],
        }

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application()
        app.router.add_get("/.well-known/oauth-authorization-server", self.well_known)
        app.router.add_get("/.well-known/openid-configuration", self.well_known_oidc)
        app.router.add_get("/.well-known/oauth-protected-resource", self.resource_metadata)
        app.router.add_post("/device", self.device)
        app.router.add_get("/authorize", self.authorize)
        app.router.add_post("/token", self.token)
        app.router.add_post("/revoke", self.revoke)
        app.router.add_post("/register", self.register)
        app.router.add_get("/api", self.api)
        return app

    async def well_known(self, request: web.Request) -> web.Response:
        """The RFC 8414 document, or the configured fault."""
        self.metadata_requests.append(request.path)
        if self.metadata_mode == "404":
            return web.Response(status=404, text="not here")
        if self.metadata_mode == "html":
            return web.Response(text="<html>login page</html>", content_type="text/html")
        return web.json_response(self.metadata())

    async def well_known_oidc(self, request: web.Request) -> web.Response:
        """No OpenID Connect document: 404 (the RFC 8414 one is the only one)."""
        self.metadata_requests.append(request.path)
        return web.Response(status=404, text="not here")

    async def resource_metadata(self, request: web.Request) -> web.Response:
        """RFC 9728 protected-resource metadata naming this server."""
        return web.json_response({"resource": f"{self.base_url}/api", "authorization_servers": [self.issuer]})

    async def device(self, request: web.Request) -> web.Response:
        """A device code and user code (RFC 8628 §3.2)."""
        form = await request.post()
        if not self._known(form.get("client_id")):
            return web.json_response({"error": "invalid_client"}, status=401)
        device_code = "dc-" + secrets.token_urlsafe(12)
        self.secrets_seen.append(device_code)
        return web.json_response(
            {
                "device_code": device_code,
                "user_code": "WDJB-MJHT",
                "verification_uri": f"{self.base_url}/activate",
                "verification_uri_complete": f"{self.base_url}/activate?user_code=WDJB-MJHT",
                "expires_in": self.expires_in,
                "interval": self.device_interval,
            }
        )

    async def authorize(self, request: web.Request) -> web.Response:
        """The person approves at once: redirect to redirect_uri with a code (or 400 for a bad request)."""
        query = request.query
        client_id = query.get("client_id", "")
        if (
            not self._known(client_id)
            or query.get("code_challenge_method") != "S256"
            or not self._redirect_ok(client_id, query.get("redirect_uri", ""))
        ):
            return web.Response(status=400, text="bad authorization request")
        if self.authorize_error:
            answer = {"error": self.authorize_error, "state": query.get("state", "")}
            raise web.HTTPFound(query["redirect_uri"] + "?" + urlencode(answer))
        code = "code-" + secrets.token_urlsafe(12)
        self.secrets_seen.append(code)
        self._codes[code] = {"challenge": query["code_challenge"], "redirect_uri": query["redirect_uri"]}
        answer = {"code": code, "state": query.get("state", "")}
        if self.authorize_iss is not None:
            answer["iss"] = self.authorize_iss
        location = query["redirect_uri"] + "?" + urlencode(answer)
        raise web.HTTPFound(location)

    def _issue(self) -> web.Response:
        access, refresh = "at-" + secrets.token_urlsafe(16), "rt-" + secrets.token_urlsafe(16)
        self.issued_access.append(access)
        self.issued_refresh.append(refresh)
        return web.json_response(
            {"access_token": access, "token_type": "Bearer", "expires_in": 600, "refresh_token": refresh}
        )

    async def token(self, request: web.Request) -> web.Response:
        """The token endpoint: authorization_code (PKCE checked), device_code (scripted), refresh_token."""
        form = await request.post()
        grant = form.get("grant_type")
        if not self._known(form.get("client_id")):
            return web.json_response({"error": "invalid_client"}, status=401)
        if grant == "authorization_code":
            verifier = str(form.get("code_verifier", ""))
            self.secrets_seen.append(verifier)
            issued = self._codes.pop(str(form.get("code", "")), None)
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if issued is None or issued["challenge"] != digest or issued["redirect_uri"] != form.get("redirect_uri"):
                return web.json_response({"error": "invalid_grant"}, status=400)
            return self._issue()
        if grant == "urn:ietf:params:oauth:grant-type:device_code":
            answer = self.device_script[min(self.polls, len(self.device_script) - 1)]
            self.polls += 1
            self.polled_at.append(self.clock())
            if answer == "ok":
                self.device_issued.set()
                return self._issue()
            return web.json_response({"error": answer}, status=400)
        if grant == "refresh_token":
            presented = str(form.get("refresh_token", ""))
            self.refreshes.append(presented)
            self.refresh_arrived.set()
            if self.refresh_gate is not None:
                await self.refresh_gate.wait()
            if presented not in self.issued_refresh or presented in self.revoked:
                return web.json_response({"error": "invalid_grant"}, status=400)
            self.revoked.append(presented)  # rotation: each refresh token is good once
            return self._issue()
        return web.json_response({"error": "unsupported_grant_type"}, status=400)

    async def register(self, request: web.Request) -> web.Response:
        """RFC 7591: a public client with the redirect URIs asked for."""
        body = await request.json()
        if body.get("token_endpoint_auth_method") != "none":
            return web.json_response({"error": "invalid_client_metadata"}, status=400)
        client_id = f"dyn-{len(self.registered) + 1}"
        self.registered[client_id] = list(body.get("redirect_uris", []))
        return web.json_response({"client_id": client_id, **body}, status=201)

    async def revoke(self, request: web.Request) -> web.Response:
        """RFC 7009: forget the token; always 200."""
        form = await request.post()
        self.revoked.append(str(form.get("token", "")))
        return web.Response(status=200)

    async def api(self, request: web.Request) -> web.Response:
        """200 with an issued access token; else 401 with an RFC 9728 challenge."""
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if token in self.issued_access and token not in self.refused_access:
            self.accepted.append(token)
            return web.json_response({"ok": True})
        challenge = f'Bearer resource_metadata="{self.base_url}/.well-known/oauth-protected-resource"'
        return web.json_response({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": challenge})

"""The tests' OAuth2 authorization server: the demo's token server (`proxy.demo.token_server`) plus faults.

On top of the demo's JWTs, refresh-token rotation and reuse detection: it
serves the password grant and the home-made `json` refresh endpoints (body
and cookie mode), records every call, and exposes events to hold a refresh
in flight. It also verifies `private_key_jwt` client assertions (signature,
aud, iss/sub, a jti never seen before, a short exp), RFC 8693 token exchange,
a client certificate's name when served over mTLS, and can start a refresh
token chain on a password or client_credentials login. Its answers can be broken on purpose: a given access token value,
any `expires_in` or `exp` (NaN, 400 digits, in the past), or an endless body.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

from proxy.demo.token_server import GRANTS, TokenServer, new_refresh_token, oauth_error

CLIENT_ID = "test-client"
CLIENT_SECRET = "test-secret-s3cr3t"
USERNAME = "alice"
PASSWORD = "alice-password-pw"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
SUBJECT_TOKEN = "subject-jwt-from-the-platform-0001"


@dataclass
class Call:
    """One request the token server received."""

    path: str
    form: dict[str, str]
    headers: dict[str, str]
    json_body: Any = None


@dataclass
class FakeTokenServer(TokenServer):
    """The token endpoint's state; mutate the attributes to change its behaviour."""

    subject: str = "alice"
    client_id: str | None = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    users: dict[str, str] = field(default_factory=lambda: {USERNAME: PASSWORD})
    jwt_exp: Any = None  # when not None, the `exp` claim as it is (NaN, 10**400, a past time ...)
    access_value: str | None = None  # when set, issued as the access token instead of a JWT
    # ok | 500 | html | invalid_grant | invalid_client | no_token | hang | garbage_json
    # | huge (an endless JSON body, chunked) | huge_declared (the same with a huge Content-Length)
    mode: str = "ok"
    huge_limit: int = 256 << 20  # the most a huge answer streams before it gives up
    huge_sent: int = 0  # bytes of huge answers written so far
    huge_dropped: asyncio.Event = field(default_factory=asyncio.Event)  # set when the client dropped one
    calls: list[Call] = field(default_factory=list)
    issued_access: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None  # when set to an Event, answers wait for it
    delay: float = 0.0  # seconds every answer takes (a slow server), after the gate
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each call's arrival
    drop_abandoned: bool = False  # when True, a held call whose client has gone is dropped, nothing spent
    entered: asyncio.Event = field(default_factory=asyncio.Event)  # set when a call arrives
    base_url: str = ""  # where it listens, set by the fixture that starts it
    grants: frozenset[str] = GRANTS | {EXCHANGE_GRANT}
    assertion_key: Any = None  # a public key: client assertions (private_key_jwt) are verified with it
    assertion_audience: str = ""  # the `aud` an assertion must carry; "" = this server's /oauth/token
    assertions: list[dict[str, Any]] = field(default_factory=list)  # accepted assertions: header and claims
    assertion_errors: list[str] = field(default_factory=list)  # why assertions were refused
    mtls: bool = False  # true: the client is the name (CN) on its TLS client certificate, no secret
    peer_names: list[str] = field(default_factory=list)  # the client certificate names seen, one per call
    subject_tokens: set[str] = field(default_factory=lambda: {SUBJECT_TOKEN})  # what token exchange accepts
    login_refresh: bool = False  # true: a password or client_credentials answer starts a new refresh token chain
    login_pending: bool = False  # set while such a login is being answered

    def app(self) -> web.Application:
        """The aiohttp app: /oauth/token, /auth/refresh (json body), /auth/cookie (json, cookie)."""
        app = super().app()
        app.router.add_route("*", "/auth/refresh", self.json_refresh)
        app.router.add_route("*", "/auth/cookie", self.cookie_refresh)
        return app

    def expiry(self, now: float) -> Any:
        """`jwt_exp` when set, else the demo server's expiry."""
        return super().expiry(now) if self.jwt_exp is None else self.jwt_exp

    def new_access(self) -> str:
        """Sign a fresh access token (or issue `access_value`), and remember it."""
        token = self.access_value or super().new_access()
        self.issued_access.append(token)
        return token

    def _assertion_client(self, form: dict[str, str]) -> str | None:
        """The client a `private_key_jwt` assertion proves, or None (the reason kept in assertion_errors)."""
        if self.assertion_key is None:
            self.assertion_errors.append("no key to verify assertions with")
            return None
        token = form.get("client_assertion", "")
        try:
            claims = jwt.decode(
                token,
                self.assertion_key,
                algorithms=["RS256", "PS256", "ES256"],
                audience=self.assertion_audience or f"{self.base_url}/oauth/token",
                issuer=self.client_id,
                options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
            )
        except jwt.InvalidTokenError as exc:
            self.assertion_errors.append(type(exc).__name__)
            return None
        if claims["sub"] != claims["iss"] or claims["exp"] - claims["iat"] > 300:
            self.assertion_errors.append("sub or exp")
            return None
        if any(seen["jti"] == claims["jti"] for seen in self.assertions):
            self.assertion_errors.append("jti replayed")
            return None
        self.assertions.append({"header": jwt.get_unverified_header(token), **claims})
        return str(claims["sub"])

    def client_allowed(self, request: web.Request, form: dict[str, str]) -> bool:
        """The demo's Basic or form secret, or a verified client assertion, or (mtls) the certificate's name."""
        if self.mtls:
            cert = request.transport.get_extra_info("peercert") if request.transport else None
            names = [value for rdn in (cert or {}).get("subject", ()) for key, value in rdn if key == "commonName"]
            self.peer_names.append(names[0] if names else "")
            return bool(names) and names[0] == self.client_id == form.get("client_id")
        if form.get("client_assertion_type") == ASSERTION_TYPE:
            client = self._assertion_client(form)
            return client is not None and client == self.client_id and form.get("client_id", client) == client
        return super().client_allowed(request, form)

    async def oauth_token(self, request: web.Request) -> web.StreamResponse:
        """The demo's grants, RFC 8693 token exchange, and a refresh token chain begun by a login (login_refresh)."""
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.login_pending = self.login_refresh and form.get("grant_type") in ("password", "client_credentials")
        if form.get("grant_type") != EXCHANGE_GRANT:
            return await super().oauth_token(request)
        self.record(request, form)
        instead = await self.intercept(request)
        if instead is not None:
            return instead
        if not self.client_allowed(request, form):
            return oauth_error("invalid_client", 401)
        if form.get("subject_token") not in self.subject_tokens:
            return oauth_error("invalid_grant")
        if form.get("subject_token_type") != "urn:ietf:params:oauth:token-type:jwt":
            return oauth_error("invalid_request")
        answer: dict[str, Any] = {"token_type": "Bearer", **self.issue()}
        answer["issued_token_type"] = "urn:ietf:params:oauth:token-type:access_token"
        return web.json_response(answer)

    def issue(self) -> dict[str, Any]:
        """The demo server's token fields (without the access token in `no_token` mode); with `login_refresh`,
        a login's answer also carries the new chain's refresh token."""
        fields = super().issue() if self.mode != "no_token" else {}
        if self.mode == "no_token" and self.lifetime is not None:
            fields["expires_in"] = self.lifetime
        if self.login_pending:
            self.login_pending, self.revoked, self.current_refresh = False, False, new_refresh_token()
            fields["refresh_token"] = self.current_refresh
        return fields

    def record(self, request: web.Request, form: dict[str, str], json_body: Any = None) -> None:
        """Keep the call, for tests to read."""
        super().record(request, form)
        self.arrivals.append(time.monotonic())
        self.calls.append(Call(request.path, form, dict(request.headers), json_body))

    async def intercept(self, request: web.Request) -> web.StreamResponse | None:
        """The fault `mode` asks for, or the OAuth error of the `invalid_grant`/`invalid_client` modes."""
        fault = await self._fault(request)
        if fault is None and self.mode in ("invalid_grant", "invalid_client"):
            return oauth_error(self.mode, 400 if self.mode == "invalid_grant" else 401)
        return fault

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        """A JSON answer that never ends (up to `huge_limit`), written 64 KiB at a time, never held whole."""
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if self.mode == "huge_declared":
            resp.content_length = self.huge_limit
        chunk = b"a" * 65536
        finished = False
        try:
            await resp.prepare(request)
            await resp.write(b'{"access_token": "')
            while self.huge_sent < self.huge_limit:
                await resp.write(chunk)
                self.huge_sent += len(chunk)
            finished = True
        except ConnectionError:
            pass
        finally:
            if not finished:
                self.huge_dropped.set()
        return resp

    async def _fault(self, request: web.Request) -> web.StreamResponse | None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.drop_abandoned and (request.transport is None or request.transport.is_closing()):
            # Its client went away while the call was held: as if it never reached the server (nothing spent).
            return web.Response(status=499)
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "500":
            return web.Response(status=500, text="internal error")
        if self.mode == "html":
            return web.Response(status=200, text="<html>login page</html>", content_type="text/html")
        if self.mode == "garbage_json":
            return web.json_response({"hello": "world"})
        if self.mode in ("huge", "huge_declared"):
            return await self._huge(request)
        return None

    async def json_refresh(self, request: web.Request) -> web.StreamResponse:
        """A home-made endpoint: {"refreshToken": ...} -> {"data": {"accessToken", "refreshToken", "expiresIn"}}."""
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        self.record(request, {}, body)
        fault = await self._fault(request)
        if fault is not None:
            return fault
        presented = body.get("refreshToken") if isinstance(body, dict) else None
        if self.mode == "invalid_grant" or not self.spend_refresh(presented):
            return web.json_response({"message": "refresh token invalid"}, status=401)
        data: dict[str, Any] = {"refreshToken": self.current_refresh}
        if self.mode != "no_token":
            data["accessToken"] = self.new_access()
        if self.lifetime is not None:
            data["expiresIn"] = self.lifetime
        return web.json_response({"data": data})

    async def cookie_refresh(self, request: web.Request) -> web.StreamResponse:
        """A home-made endpoint reading the refresh token from a cookie and rotating it by Set-Cookie."""
        self.record(request, {})
        fault = await self._fault(request)
        if fault is not None:
            return fault
        presented = request.cookies.get("refresh")
        if self.mode == "invalid_grant" or not self.spend_refresh(presented):
            return web.json_response({"message": "refresh token invalid"}, status=403)
        answer: dict[str, Any] = {}
        if self.mode != "no_token":
            answer["accessToken"] = self.new_access()
        response = web.json_response(answer)
        response.set_cookie("refresh", self.current_refresh, httponly=True, path="/auth")
        return response


class FakeClock:
    """A wall clock that moves only when a test says so: `clock()` reads it, `advance()` moves it."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds`."""
        self.now += seconds


async def until(condition: Any, turns: int = 200_000) -> None:
    """Yield to the event loop until `condition()` is true; fail after `turns` loop turns (never sleeps)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached within the turn budget")

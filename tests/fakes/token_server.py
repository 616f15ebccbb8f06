"""A small OAuth2 authorization server for tests.

Issues HS256 JWTs with PyJWT, rotates refresh tokens and revokes the whole
grant when a rotated-away refresh token is reused (as real servers do).
Counts its calls and exposes events to hold a refresh in flight. Also
serves the home-made `json` refresh endpoints, in body and cookie mode.
Its answers can be broken on purpose: a given access token value, any
`expires_in` or `exp` (NaN, 400 digits, in the past), or an endless body.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

CLIENT_ID = "test-client"
CLIENT_SECRET = "test-secret-s3cr3t"
USERNAME = "alice"
PASSWORD = "alice-password-pw"


@dataclass
class Call:
    """One request the token server received."""

    path: str
    form: dict[str, str]
    headers: dict[str, str]
    json_body: Any = None


@dataclass
class FakeTokenServer:
    """The token endpoint's state; mutate the attributes to change its behaviour."""

    signing_key: str = field(default_factory=lambda: secrets.token_hex(32))
    lifetime: Any = 300.0  # expires_in, sent as it is (NaN, 10**400, 1e-9 ...); None leaves it out
    jwt_lifetime: float = 3600.0  # the `exp` claim, seconds from now
    jwt_exp: Any = None  # when not None, the `exp` claim as it is (NaN, 10**400, a past time ...)
    access_value: str | None = None  # when set, issued as the access token instead of a JWT
    # ok | 500 | html | invalid_grant | invalid_client | no_token | hang | garbage_json
    # | huge (an endless JSON body, chunked) | huge_declared (the same with a huge Content-Length)
    mode: str = "ok"
    huge_limit: int = 256 << 20  # the most a huge answer streams before it gives up
    huge_sent: int = 0  # bytes of huge answers written so far
    huge_dropped: asyncio.Event = field(default_factory=asyncio.Event)  # set when the client dropped one
    rotate: bool = True
    calls: list[Call] = field(default_factory=list)
    issued_access: list[str] = field(default_factory=list)
    current_refresh: str = field(default_factory=lambda: "rt-" + secrets.token_urlsafe(12))
    used_refresh: set[str] = field(default_factory=set)
    reuse_detected: bool = False
    revoked: bool = False
    gate: asyncio.Event | None = None  # when set to an Event, answers wait for it
    entered: asyncio.Event = field(default_factory=asyncio.Event)  # set when a call arrives

    @property
    def count(self) -> int:
        """How many calls the token endpoint has seen."""
        return len(self.calls)

    def app(self) -> web.Application:
        """The aiohttp app: /oauth/token, /auth/refresh (json body), /auth/cookie (json, cookie)."""
        app = web.Application()
        app.router.add_post("/oauth/token", self.oauth_token)
        app.router.add_route("*", "/auth/refresh", self.json_refresh)
        app.router.add_route("*", "/auth/cookie", self.cookie_refresh)
        return app

    def new_access(self) -> str:
        """Sign a fresh access token (or issue `access_value`)."""
        now = time.time()
        exp = now + self.jwt_lifetime if self.jwt_exp is None else self.jwt_exp
        token = self.access_value or jwt.encode(
            {"sub": "alice", "iat": int(now), "exp": exp, "jti": secrets.token_hex(6)},
            self.signing_key,
            algorithm="HS256",
        )
        self.issued_access.append(token)
        return token

    def _spend_refresh(self, presented: str | None) -> bool:
        """Check a refresh token and rotate it; False when it is not the current one."""
        if presented in self.used_refresh:
            self.reuse_detected = True
            self.revoked = True
        if self.revoked or presented != self.current_refresh:
            return False
        if self.rotate:
            self.used_refresh.add(self.current_refresh)
            self.current_refresh = "rt-" + secrets.token_urlsafe(12)
        return True

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

    async def oauth_token(self, request: web.Request) -> web.StreamResponse:
        """RFC 6749 token endpoint: refresh_token, client_credentials and password grants."""
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.calls.append(Call(request.path, form, dict(request.headers)))
        fault = await self._fault(request)
        if fault is not None:
            return fault
        if self.mode in ("invalid_grant", "invalid_client"):
            return web.json_response({"error": self.mode}, status=400 if self.mode == "invalid_grant" else 401)
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
        if client_id != CLIENT_ID or client_secret != CLIENT_SECRET:
            return web.json_response({"error": "invalid_client"}, status=401)
        grant = form.get("grant_type")
        answer: dict[str, Any] = {"token_type": "Bearer"}
        if grant == "refresh_token":
            if not self._spend_refresh(form.get("refresh_token")):
                return web.json_response({"error": "invalid_grant"}, status=400)
            answer["refresh_token"] = self.current_refresh
        elif grant == "password":
            if form.get("username") != USERNAME or form.get("password") != PASSWORD:
                return web.json_response({"error": "invalid_grant"}, status=400)
        elif grant != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if self.mode != "no_token":
            answer["access_token"] = self.new_access()
        if self.lifetime is not None:
            answer["expires_in"] = self.lifetime
        return web.json_response(answer)

    async def json_refresh(self, request: web.Request) -> web.StreamResponse:
        """A home-made endpoint: {"refreshToken": ...} -> {"data": {"accessToken", "refreshToken", "expiresIn"}}."""
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        self.calls.append(Call(request.path, {}, dict(request.headers), body))
        fault = await self._fault(request)
        if fault is not None:
            return fault
        presented = body.get("refreshToken") if isinstance(body, dict) else None
        if self.mode == "invalid_grant" or not self._spend_refresh(presented):
            return web.json_response({"message": "refresh token invalid"}, status=401)
        data: dict[str, Any] = {"refreshToken": self.current_refresh}
        if self.mode != "no_token":
            data["accessToken"] = self.new_access()
        if self.lifetime is not None:
            data["expiresIn"] = self.lifetime
        return web.json_response({"data": data})

    async def cookie_refresh(self, request: web.Request) -> web.StreamResponse:
        """A home-made endpoint reading the refresh token from a cookie and rotating it by Set-Cookie."""
        self.calls.append(Call(request.path, {}, dict(request.headers)))
        fault = await self._fault(request)
        if fault is not None:
            return fault
        presented = request.cookies.get("refresh")
        if self.mode == "invalid_grant" or not self._spend_refresh(presented):
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

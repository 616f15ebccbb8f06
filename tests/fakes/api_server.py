"""A small API for tests: checks the JWT like a strict real API, and echoes what it got.

Tokens are checked with zero clock skew by the demo API's check
(`proxy.demo.api.bearer_claims`); `expire_all()` makes every token issued
so far count as expired, so tests need no sleeping to see a 401.
Routes stream, drip, gzip, redirect and misbehave on demand; counters and
events let tests synchronise without sleeps.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.demo.api import bearer_claims

GZIP_PAYLOAD = gzip.compress(b"hello compressed world " * 100, mtime=0)


@dataclass
class FakeApi:
    """The API's state; tests read the counters and set the events."""

    signing_key: str
    expired: set[str] = field(default_factory=set)  # tokens the API now rejects
    requests: int = 0
    rejected: int = 0
    tokens_seen: list[str] = field(default_factory=list)
    sse_gate: asyncio.Event = field(default_factory=asyncio.Event)
    hang_entered: asyncio.Event = field(default_factory=asyncio.Event)
    gated_entered: asyncio.Event = field(default_factory=asyncio.Event)  # /gated has its request
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # /gated answers once it is set
    upload_started: asyncio.Event = field(default_factory=asyncio.Event)
    endless_aborted: asyncio.Event = field(default_factory=asyncio.Event)  # /endless lost its reader
    base_url: str = ""  # where it listens, set by the fixture that starts it
    server: TestServer | None = None  # the server it runs in, set by that fixture

    def expire_all(self, issued: list[str]) -> None:
        """From now on, treat every token in `issued` as expired."""
        self.expired.update(issued)

    def app(self) -> web.Application:
        """The aiohttp app with every route the tests use."""
        app = web.Application(client_max_size=1024**3)
        r = app.router
        r.add_route("*", "/echo{tail:.*}", self.echo)
        r.add_get("/download/{size}", self.download)
        r.add_get("/sized/{size}", self.sized)
        r.add_route("*", "/upload", self.upload)
        r.add_get("/sse", self.sse)
        r.add_get("/gzip", self.gzipped)
        r.add_get("/redirect", self.redirect)
        r.add_get("/hop", self.hop)
        r.add_route("*", "/status/{code}", self.status)
        r.add_get("/challenge/{error}", self.challenge)
        r.add_get("/hang", self.hang)
        r.add_get("/gated", self.gated)
        r.add_get("/cookies", self.cookies)
        r.add_get("/open", self.open)
        r.add_route("*", "/method", self.method)
        r.add_get("/broken", self.broken)
        r.add_get("/endless", self.endless)
        return app

    def _check(self, request: web.BaseRequest) -> web.Response | None:
        self.requests += 1
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            self.tokens_seen.append(auth[7:])
        claims = bearer_claims(request, self.signing_key)
        if isinstance(claims, str):
            return self._unauthorized(claims)
        if auth[7:] in self.expired:
            return self._unauthorized("token expired")
        return None

    def _unauthorized(self, why: str) -> web.Response:
        self.rejected += 1
        return web.json_response(
            {"message": why},
            status=401,
            headers={"WWW-Authenticate": f'Bearer realm="api", error="invalid_token", error_description="{why}"'},
        )

    async def echo(self, request: web.Request) -> web.Response:
        """Describe the request exactly as it arrived."""
        denied = self._check(request)
        if denied is not None:
            return denied
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body": body.decode("latin-1") if len(body) <= 4096 else None,
            }
        )

    async def download(self, request: web.Request) -> web.StreamResponse:
        """`size` bytes, chunked, generated as they are sent."""
        denied = self._check(request)
        if denied is not None:
            return denied
        size = int(request.match_info["size"])
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        block = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def sized(self, request: web.Request) -> web.StreamResponse:
        """`size` bytes with a Content-Length."""
        denied = self._check(request)
        if denied is not None:
            return denied
        size = int(request.match_info["size"])
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        await response.prepare(request)
        block = b"x" * 65536
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def upload(self, request: web.Request) -> web.Response:
        """Hash an upload as it streams in; answer its length, hash and framing."""
        denied = self._check(request)
        if denied is not None:
            return denied
        self.upload_started.set()
        digest = hashlib.sha256()
        total = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            total += len(chunk)
        return web.json_response(
            {
                "length": total,
                "sha256": digest.hexdigest(),
                "content_length": request.headers.get("Content-Length"),
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
            }
        )

    async def sse(self, request: web.Request) -> web.StreamResponse:
        """One event at once, the second only after `sse_gate` is set."""
        denied = self._check(request)
        if denied is not None:
            return denied
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await self.sse_gate.wait()
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    async def gzipped(self, request: web.Request) -> web.Response:
        """A gzip-encoded body, to be passed through untouched."""
        denied = self._check(request)
        if denied is not None:
            return denied
        return web.Response(
            body=GZIP_PAYLOAD, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    async def redirect(self, request: web.Request) -> web.Response:
        """A redirect the proxy must pass on, not follow."""
        denied = self._check(request)
        if denied is not None:
            return denied
        return web.Response(status=302, headers={"Location": "/echo/after-redirect"})

    async def hop(self, request: web.Request) -> web.Response:
        """Hop-by-hop headers that must not reach the client, and end-to-end ones that must."""
        denied = self._check(request)
        if denied is not None:
            return denied
        headers = [
            ("Connection", "X-Private-Hop"),
            ("X-Private-Hop", "secret-hop"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "h2c"),
            ("X-End-To-End", "kept"),
        ]
        response = web.Response(text="hop")
        for name, value in headers:
            response.headers.add(name, value)
        return response

    async def status(self, request: web.Request) -> web.Response:
        """Answer with the status in the path (204, 304, 500, ...)."""
        denied = self._check(request)
        if denied is not None:
            return denied
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code, headers={"ETag": '"v1"'})
        return web.Response(status=code, text=f"status {code}")

    async def challenge(self, request: web.Request) -> web.Response:
        """Always 401 with the given challenge error (insufficient_scope, use_dpop_nonce, ...)."""
        self.requests += 1
        self.rejected += 1
        error = request.match_info["error"]
        scheme = "DPoP" if error == "use_dpop_nonce" else "Bearer"
        return web.json_response(
            {"message": error}, status=401, headers={"WWW-Authenticate": f'{scheme} error="{error}"'}
        )

    async def hang(self, request: web.Request) -> web.Response:
        """Never answer."""
        self.hang_entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def gated(self, request: web.Request) -> web.Response:
        """Answer only once `gate` is set (its arrival told by `gated_entered`)."""
        denied = self._check(request)
        if denied is not None:
            return denied
        self.gated_entered.set()
        await self.gate.wait()
        return web.json_response({"gated": True})

    async def cookies(self, request: web.Request) -> web.Response:
        """Several Set-Cookie headers, which must stay several."""
        denied = self._check(request)
        if denied is not None:
            return denied
        response = web.Response(text="cookies")
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        return response

    async def open(self, request: web.Request) -> web.Response:
        """No authentication needed; counts the request."""
        self.requests += 1
        return web.Response(text="open")

    async def method(self, request: web.Request) -> web.Response:
        """Name the request's method in `X-Method` (readable even in a HEAD answer)."""
        denied = self._check(request)
        if denied is not None:
            return denied
        return web.Response(text=request.method, headers={"X-Method": request.method})

    async def broken(self, request: web.Request) -> web.StreamResponse:
        """Start a chunked answer, then drop the connection before it is complete."""
        denied = self._check(request)
        if denied is not None:
            return denied
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"partial body")
        assert request.transport is not None
        request.transport.close()
        return response

    async def endless(self, request: web.Request) -> web.StreamResponse:
        """Stream 64 KiB blocks until the reader goes away, then set `endless_aborted`."""
        denied = self._check(request)
        if denied is not None:
            return denied
        response = web.StreamResponse()
        await response.prepare(request)
        block = b"z" * 65536
        finished = False
        try:
            for _ in range(100_000):  # bounded: about 6.5 GB, far more than any test reads
                await response.write(block)
            finished = True
        except ConnectionError:
            pass
        finally:
            if not finished:
                self.endless_aborted.set()
        return response

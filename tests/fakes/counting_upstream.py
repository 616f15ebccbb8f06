"""An upstream on 127.0.0.1 that counts its connections and requests and echoes each request.

The security, malformed-request and fuzz tests use it to prove what did, or
did not, reach the upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Self

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from yarl import URL

WAIT_BOUND = 10.0  # seconds any wait on this server may take before the test fails


class _CountingServer(web.Server):
    """aiohttp's low-level server, telling its owner about every connection opened and lost."""

    def __init__(self, handler: Any, owner: CountingUpstream) -> None:
        super().__init__(handler, auto_decompress=False)  # bodies are opaque bytes, as for the proxy
        self._owner = owner

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._owner.connections_changed(+1)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._owner.connections_changed(-1)


class CountingUpstream:
    """An upstream on 127.0.0.1 that counts connections and requests and echoes every request.

    Any path echoes method, raw path and headers as JSON, except: a path
    ending in `/redirect` answers 302 with the `to` query as Location;
    `/upload` reads the body (`upload_started` on the first bytes,
    `upload_aborted` when it breaks off); `/endless` streams until the
    reader goes (`endless_aborted`).
    """

    def __init__(self) -> None:
        self.url = ""
        self.requests = 0
        self.hosts: list[str] = []  # the Host header of every request, in order
        self.open = 0  # connections open now
        self._changed: list[asyncio.Future[None]] = []
        self.upload_started = asyncio.Event()
        self.upload_aborted = asyncio.Event()
        self.endless_aborted = asyncio.Event()
        self._runner: web.ServerRunner | None = None

    @property
    def authority(self) -> str:
        """host:port, as the proxy must name it in Host."""
        return f"{URL(self.url).host}:{URL(self.url).port}"

    async def __aenter__(self) -> Self:
        """Listen on a free port of 127.0.0.1."""
        self._runner = web.ServerRunner(_CountingServer(self._handle, self))
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the listener and every connection."""
        assert self._runner is not None
        await self._runner.cleanup()

    def connections_changed(self, delta: int) -> None:
        """Count a connection opened (+1) or lost (-1) and wake whoever waits for a change."""
        self.open += delta
        for waiter in self._changed:
            if not waiter.done():
                waiter.set_result(None)
        self._changed.clear()

    async def wait_open(self, predicate: Callable[[int], bool], bound: float = WAIT_BOUND) -> int:
        """Wait until the number of open connections satisfies `predicate`; return it."""

        async def until() -> int:
            for _ in range(10_000):  # bounded: every pass waits for one change
                if predicate(self.open):
                    return self.open
                waiter = asyncio.get_running_loop().create_future()
                self._changed.append(waiter)
                await waiter
            raise AssertionError("connection count never settled")

        return await asyncio.wait_for(until(), bound)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests += 1
        self.hosts.append(request.headers.get("Host", ""))
        path = request.raw_path.partition("?")[0]
        if path.endswith("/redirect"):
            return web.Response(status=302, headers={"Location": request.query["to"]})
        if path == "/upload":
            return await self._upload(request)
        if path == "/endless":
            return await self._endless(request)
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "host": request.headers.get("Host"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
                "body_len": len(body),
            }
        )

    async def _upload(self, request: web.BaseRequest) -> web.Response:
        total = 0
        try:
            for _ in range(1_000_000):  # bounded; each pass reads one chunk
                chunk = await request.content.readany()
                if not chunk:
                    break
                total += len(chunk)
                self.upload_started.set()
        except ConnectionError:
            self.upload_aborted.set()
        return web.json_response({"length": total})

    async def _endless(self, request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(100_000):  # bounded: about 6.5 GB, far more than any test reads
                await response.write(b"z" * 65536)
        except ConnectionError:
            self.endless_aborted.set()
        return response

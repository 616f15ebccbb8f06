"""The floor: about the least a Python proxy can do per request. NOT A PRODUCT: a yardstick for the bench.

`python -m bench.floor_proxy --port P --upstream http://127.0.0.1:U --token T`

Raw asyncio protocols (uvloop when installed) on llhttp through httptools.
Each client connection gets one kept-alive upstream connection of its own.
A request's head is rebuilt with the token (hop-by-hop headers, Host and
Authorization dropped, the upstream's Host and `Authorization: Bearer T`
added), its body passed on as it arrives (a chunked body re-chunked), and
the upstream's answer relayed byte for byte as it comes, with flow control
both ways so a large transfer keeps memory flat.

Missing on purpose, as everything a real proxy needs: no token refresh or
resend, no limits or timeouts, no JSON errors (a malformed request just
closes the connection), no pipelining (one request at a time per client),
no TLS, no access log, no metrics. It measures what the interpreter, the
event loop and the parser cost, so that tokenproxy's cost is told against it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from urllib.parse import urlsplit

import httptools

_DROP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"authorization",
    ]
)


class _Upstream(asyncio.Protocol):
    """The client's own connection to the upstream: what comes back goes to the client as it is."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.client.upstream_lost()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class _Client(asyncio.Protocol):
    """One client connection: parses its requests and writes each, rebuilt, to its upstream connection."""

    def __init__(self, proxy: FloorProxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []  # written before the upstream connection is up
        self.connecting = False
        self.url = b""
        self.head: list[bytes] = []
        self.chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    # httptools' callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.head = []
        self.chunked = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower in _DROP:
            if lower == b"transfer-encoding":
                self.chunked = True
            return
        self.head += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        method = self.parser.get_method()
        framing = b"Transfer-Encoding: chunked\r\n" if self.chunked else b""
        self._send(b"".join((method, b" ", self.url, b" HTTP/1.1\r\n", *self.head, self.proxy.extra, framing, b"\r\n")))

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            self._send(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self._send(body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self._send(b"0\r\n\r\n")

    def _send(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(data)
            return
        self.pending.append(data)
        if not self.connecting:
            self.connecting = True
            self.proxy.tasks.add(asyncio.ensure_future(self._connect()))

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: _Upstream(self), self.proxy.host, self.proxy.port)
        except OSError:
            self.transport.close()
            return
        finally:
            self.proxy.tasks.discard(asyncio.current_task())
        if self.transport.is_closing():
            assert upstream.transport is not None
            upstream.transport.close()
            return
        self.upstream = upstream
        assert upstream.transport is not None
        upstream.transport.writelines(self.pending)
        self.pending = []

    def upstream_lost(self) -> None:
        self.upstream = None
        self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()


class FloorProxy:
    """Where to forward, and the header bytes added to every request (built once)."""

    def __init__(self, upstream: str, token: str) -> None:
        parts = urlsplit(upstream)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.extra = f"Host: {parts.netloc}\r\nAuthorization: Bearer {token}\r\n".encode("latin-1")
        self.tasks: set[asyncio.Future[None]] = set()


async def serve(port: int, upstream: str, token: str) -> None:
    """Serve on 127.0.0.1:`port` until cancelled."""
    proxy = FloorProxy(upstream, token)
    server = await asyncio.get_running_loop().create_server(lambda: _Client(proxy), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Serve until terminated (uvloop when it is installed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.port, args.upstream.rstrip("/"), args.token))


if __name__ == "__main__":
    main()

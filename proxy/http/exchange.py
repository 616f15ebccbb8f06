"""One exchange on the proxy port: the request as the parser gave it, its body as a stream, and the answer's writer.

Owns: `Request` (method, raw target, version, raw headers as llhttp gave
them, and the few values the path needs, pulled out while the head was
parsed), `BodyStream` (the request body, fed by the connection as it
arrives) and the writing of the answer with the framing HTTP/1.x asks for:
Content-Length when known, chunked when not and the client speaks 1.1,
close-delimited for 1.0, no body for HEAD, 1xx, 204 and 304; keep-alive by
the HTTP/1.0 and 1.1 rules. Knows nothing of tokens, routes or upstreams;
the connection (server.py) is reached through the small `Link` protocol.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from typing import Protocol

from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from ..core.errors import ProxyError
from .render import error_head

_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_FIELD_JOIN = b": ".join
# Status lines written before, by status and reason phrase; at most this many are kept.
_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}
_STATUS_LINES_KEPT = 64


# Content-Length lines written before, by length; at most this many are kept.
_LENGTH_LINES: dict[int, bytes] = {}
_LENGTH_LINES_KEPT = 1024


def _status_line(status: int, reason: bytes) -> bytes:
    line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    if len(_STATUS_LINES) < _STATUS_LINES_KEPT:  # the reason is the upstream's word: keep only a few
        _STATUS_LINES[(status, reason)] = line
    return line


def _length_line(length: int) -> bytes:
    line = b"Content-Length: %d\r\n" % length
    if len(_LENGTH_LINES) < _LENGTH_LINES_KEPT:
        _LENGTH_LINES[length] = line
    return line


class Link(Protocol):
    """What an exchange needs of its connection (server.py's ClientConnection)."""

    def write(self, data: bytes) -> None:
        """Write bytes to the client (nothing once the connection is gone)."""

    async def drain(self) -> None:
        """Wait while the client is slow to take what was written; ConnectionResetError once it is gone."""

    def body_taken(self, size: int) -> None:
        """`size` bytes of a body were read out of its buffer: reading may resume."""

    def close(self) -> None:
        """Close the connection once what was written is sent."""

    def abort(self) -> None:
        """Cut the connection at once."""

    def sockname(self) -> object:
        """The local address the client connected to."""

    def served(self, request: Request) -> None:
        """`request`, taken on in callbacks (`Request.pending`), is answered: the next one may be served."""

    def resume(self, request: Request) -> None:
        """`request`, taken on in callbacks, needs the connection's coroutine: it awaits `request.pending.resume()`."""


class Pending(Protocol):
    """A request under way in callbacks rather than in the connection's coroutine (forward.py's quick path)."""

    def resume(self) -> Awaitable[None]:
        """The rest of its handling, for the connection's coroutine to await."""

    def abandon(self) -> None:
        """The client left before it was answered: end it, releasing what it holds."""


class BodyStream:
    """A request body as it arrives: fed by the connection's parser, read by the one coroutine serving it.

    Owned by the event loop: `feed*`/`fail` run in the protocol's callbacks,
    reads in the connection's serving coroutine. Bytes not yet read count
    against the connection's read buffer (server.READ_BUFFER).
    """

    __slots__ = ("_chunks", "_error", "_link", "_waiter", "complete", "discard", "size")

    def __init__(self, link: Link) -> None:
        self._link = link
        self._chunks: deque[bytes] = deque()
        self.size = 0  # bytes buffered and not read
        self.complete = False  # every byte of the body has been received
        self.discard = False  # nobody will read it: bytes are dropped as they come
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        """Bytes of the body from the parser."""
        if self.discard:
            return
        self._chunks.append(data)
        self.size += len(data)
        self._wake()

    def feed_eof(self) -> None:
        """The body is whole."""
        self.complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        """The body will never end well (malformed, or the client left): pending and later reads raise `error`."""
        if self._error is None and not self.complete:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def at_eof(self) -> bool:
        """True once the whole body has been received and read."""
        return self.complete and not self._chunks

    async def _wait(self) -> None:
        while not self._chunks and not self.complete:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    async def readany(self) -> bytes:
        """The next bytes that arrived (as they came); b"" at the end."""
        if not self._chunks:
            await self._wait()
            if not self._chunks:
                return b""
        chunk = self._chunks.popleft()
        self.size -= len(chunk)
        self._link.body_taken(len(chunk))
        return chunk

    async def read(self, limit: int) -> bytes:
        """Up to `limit` bytes; b"" at the end."""
        if not self._chunks:
            await self._wait()
            if not self._chunks:
                return b""
        chunk = self._chunks[0]
        if len(chunk) <= limit:
            self._chunks.popleft()
        else:
            self._chunks[0] = chunk[limit:]
            chunk = chunk[:limit]
        self.size -= len(chunk)
        self._link.body_taken(len(chunk))
        return chunk

    async def skip(self) -> None:
        """Drop what is buffered and wait until the rest has arrived (dropped as it comes)."""
        self.drop()
        while not self.complete:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def drop(self) -> None:
        """Nobody will read the rest: what is buffered is freed and what comes is dropped."""
        self.discard = True
        if self.size:
            size, self.size = self.size, 0
            self._chunks.clear()
            self._link.body_taken(size)


def malformed_body() -> RequestPayloadError:
    """The failure a body's reads raise when the parser refused its bytes (the upstream clients know it)."""
    return RequestPayloadError("the request body is malformed")


class Request:
    """One request on the proxy port, and the writing of its answer.

    Made by the connection when the parser has the head; served by the
    connection's one coroutine. The answer is written with `start`/`write`/
    `finish` (a relayed answer) or `answer_error` (tokenproxy's own).
    """

    __slots__ = (
        "_chunked_out",
        "_headers",
        "_host",
        "body",
        "body_timed_out",
        "close",
        "content_length",
        "expect",
        "forwarded",
        "keep_alive",
        "link",
        "method",
        "pending",
        "raw_headers",
        "remote",
        "scheme",
        "sent_status",
        "started",
        "target",
        "transfer_encoding",
        "tunnel",
        "version",
    )

    def __init__(
        self,
        link: Link,
        method: str,
        target: str,
        version: tuple[int, int],
        raw_headers: list[tuple[bytes, bytes]],
        forwarded: list[tuple[bytes, bytes]] | None = None,
        keep_alive: bool = True,
        remote: str | None = None,
        scheme: str = "http",
        tunnel: str | None = None,
        host: bytes | None = None,
    ) -> None:
        self.link = link
        self.method = method
        self.target = target  # as the client sent it (decoded byte for byte)
        self.version = version
        self.raw_headers = raw_headers  # as llhttp gave them, in order
        # The headers that go upstream unless a route leaves out more (headers.forwarded_header_bytes); None
        # when a Connection header names some to leave out.
        self.forwarded = forwarded
        self.keep_alive = keep_alive  # what the client asked for (HTTP/1.0 and 1.1 rules, Connection)
        self.remote = remote
        self.scheme = scheme
        self.tunnel = tunnel  # inside an intercepted CONNECT tunnel: its `host:port`
        self._host = host  # the Host header's value, as sent
        self.content_length: int | None = None
        self.transfer_encoding: str | None = None
        self.expect: str | None = None
        self.body: BodyStream | None = None  # None: the request has no body
        self.close = False  # the connection ends after this answer
        self.started = False  # the head of the final answer has been written
        self.sent_status: int | None = None
        self.body_timed_out = False
        self._chunked_out = False
        self._headers: CIMultiDictProxy[str] | None = None
        self.pending: Pending | None = None  # under way in callbacks, not (yet) in the connection's coroutine

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The headers by name (built on first use: only a rare path needs them)."""
        if self._headers is None:
            self._headers = CIMultiDictProxy(
                CIMultiDict((name.decode("latin-1"), value.decode("latin-1")) for name, value in self.raw_headers)
            )
        return self._headers

    @property
    def host(self) -> str:
        """The Host header's value ("" without one); made on use: a request of the one route that takes
        everything never needs it."""
        host = self._host
        return "" if host is None else host.strip().decode("latin-1")

    @property
    def body_exists(self) -> bool:
        """Whether the request has a body (a Content-Length over 0, or chunked)."""
        return self.body is not None

    # --- the answer ----------------------------------------------------------------------------

    def write_continue(self) -> None:
        """`100 Continue`: the client may send the body it held back."""
        self.link.write(_CONTINUE)

    def _framing(self, status: int, length: int | None) -> tuple[bytes, bool]:
        """The framing header lines, and whether a body is sent chunked; decides keep-alive."""
        if self.close or not self.keep_alive:
            self.close = True
        lines = b""
        chunked = False
        if status < 200 or status in (204, 304) or self.method == "HEAD":
            if length is not None and status not in (204,) and status >= 200:
                lines = b"Content-Length: %d\r\n" % length
        elif length is not None:
            lines = _LENGTH_LINES.get(length) or _length_line(length)
        elif self.version >= (1, 1):
            lines = _CHUNKED
            chunked = True
        else:
            self.close = True  # the body ends when the connection does
        if self.close:
            lines += _CLOSE
        elif self.version < (1, 1):
            lines += _KEEP_ALIVE
        return lines, chunked

    def start(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None, body: bytes = b""
    ) -> None:
        """Write the answer's head (`headers` without framing ones), and `body` with it when given."""
        framing, chunked = self._framing(status, length)
        self._chunked_out = chunked
        self.started = True
        self.sent_status = status
        line = _STATUS_LINES.get((status, reason)) or _status_line(status, reason)
        if not body or status < 200 or status == 204 or status == 304 or self.method == "HEAD":
            body = b""
        elif chunked:
            body = b"%x\r\n%s\r\n" % (len(body), body)
        if headers:
            self.link.write(b"".join((line, b"\r\n".join(map(_FIELD_JOIN, headers)), b"\r\n", framing, b"\r\n", body)))
        else:
            self.link.write(b"".join((line, framing, b"\r\n", body)))

    async def write(self, chunk: bytes) -> None:
        """Write body bytes, waiting while the client is slow to take them."""
        if not chunk:
            return
        if self._chunked_out:
            self.link.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self.link.write(chunk)
        await self.link.drain()

    def finish(self) -> None:
        """The answer is whole: the last chunk when chunked; the connection closes when it must."""
        if self._chunked_out:
            self.link.write(_LAST_CHUNK)
        if self.close:
            self.link.close()

    def answer_whole(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A complete answer with a body known in full: one write."""
        if (
            self.close
            or not self.keep_alive
            or self.version < (1, 1)
            or status < 200
            or status == 204
            or status == 304
            or self.method == "HEAD"
        ):
            self.start(status, reason, headers, len(body), body)
            self.finish()
            return
        # start() and finish() for the usual case: a kept-alive HTTP/1.1 answer with a body.
        self.started = True
        self.sent_status = status
        line = _STATUS_LINES.get((status, reason)) or _status_line(status, reason)
        size = len(body)
        length = _LENGTH_LINES.get(size) or _length_line(size)
        if headers:
            self.link.write(b"".join((line, b"\r\n".join(map(_FIELD_JOIN, headers)), b"\r\n", length, b"\r\n", body)))
        else:
            self.link.write(b"".join((line, length, b"\r\n", body)))

    def answer_error(self, error: ProxyError, *, close: bool = False, extra: bytes = b"") -> None:
        """tokenproxy's JSON answer for `error`; `close` ends the connection after it."""
        if close:
            self.close = True
        head, body = error_head(error)
        self.started = True
        self.sent_status = error.status
        framing, _ = self._framing(error.status, len(body))
        self.link.write(b"".join([head, extra, framing, b"\r\n", body if self.method != "HEAD" else b""]))
        if self.close:
            self.link.close()

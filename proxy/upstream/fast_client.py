"""Reaching the upstream through a lean keep-alive pool (`upstream.client = "fast"`, the default).

Owns: plain asyncio connections to the upstream (at most
`upstream.max_connections`, reused most-recent first, closed after
`IDLE_TIMEOUT` unused), the request head written as prepared bytes, and the
answer read by aiohttp's own C HTTP parser into the same StreamReader the
session path reads. What ClientSession does per request and a proxy does not
need (URL objects, cookies, tracing, middlewares, a task per request) is
skipped. A request whose kept-alive connection turns out closed before any
answer byte is sent again once on a new one, when it is idempotent and its
body replayable, as aiohttp does. Every error leaves as ProxyError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator

from aiohttp import ClientError, ClientPayloadError
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpResponseParser, RawResponseMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from ..core.causes import cause_in_words
from ..core.errors import BadRequest, ProxyError, UpstreamTimeout, UpstreamUnreachable
from .model import BODYLESS_METHODS, Outgoing, RawHeaders, Upstream

# Pool events (a connection opened, closed and why) at debug, behind a level check at each event, never per request.
logger = logging.getLogger("tokenproxy.upstream")


class _Details:
    """What the client is told when one origin fails, worded once per pool: the origin named, the cause in words."""

    __slots__ = (
        "broke_off",
        "closed_unanswered",
        "connect_timeout",
        "kept_closing",
        "malformed",
        "origin",
        "read_timeout",
    )

    def __init__(self, upstream: Upstream, *, connect_timeout: float, read_timeout: float) -> None:
        self.origin = origin = upstream.origin
        self.connect_timeout = (
            f"the upstream {origin} could not be reached: timed out after {connect_timeout:g} s "
            "(upstream.connect_timeout)"
        )
        self.read_timeout = (
            f"the upstream {origin} did not answer: timed out after {read_timeout:g} s (upstream.read_timeout)"
        )
        self.broke_off = f"the upstream {origin} closed the connection before its answer was complete"
        self.malformed = f"the upstream {origin} sent an answer that is not valid HTTP"
        self.closed_unanswered = f"the upstream {origin} closed the connection without answering"
        self.kept_closing = f"the upstream {origin} kept closing its connections before a request could be sent"

    def unreachable(self, exc: BaseException, host: str) -> str:
        """Why a connection could not be opened, in words."""
        cause = cause_in_words(exc, host=host) or f"the connection failed ({type(exc).__name__})"
        return f"the upstream {self.origin} could not be reached: {cause}"


# The answer's StreamReader pauses the socket above twice this many buffered bytes (aiohttp's own default).
READ_LIMIT = 2**16

# Seconds an unused kept-alive connection stays open (aiohttp's connector keeps them 15 s too).
IDLE_TIMEOUT = 15.0

# Connections one request may be tried on: closing ones skipped, one resend after a silent close.
_MAX_ATTEMPTS = 4


class _ClosedUnanswered(Exception):
    """The connection closed before any byte of the answer: the request may be sent again."""


class _NotSent(Exception):
    """The connection was already closing when the request was to be written: nothing was sent."""


class _Connection(BaseProtocol):
    """One connection to the upstream: writes requests, parses answers, times out a silent upstream."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: _Pool) -> None:
        super().__init__(loop)
        self._pool = pool
        self.close_reason: str | None = None  # why it was closed on our side, for the debug line; first one wins
        self.counted = True  # holds one of the pool's places until it is lost
        self.reusable = True
        self.lost = False
        self.idle_since = 0.0
        self._answer: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._payload: StreamReader | None = None
        self._received = False
        self._writer: asyncio.Task[None] | None = None
        self._body_sent = False
        self._timer: asyncio.TimerHandle | None = None
        self._timing = False  # an exchange is waiting on the upstream
        self._read_timeout = pool.read_timeout
        self._last_read = 0.0

    @property
    def usable(self) -> bool:
        """Open, and not already closing (the upstream's FIN may be in, its loss not yet reported)."""
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    # --- asyncio.Protocol -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Feed the parser; hand over the answer's head once it is complete."""
        parser = self._parser
        if parser is None:
            # Bytes while no request is under way: nothing on this connection can be trusted.
            if data:
                self._drop("the upstream sent bytes while no request was under way")
            return
        if data:
            payload = self._payload
            if payload is not None and payload.is_eof():
                self._drop("the upstream sent bytes after the whole answer")
                return
            self._received = True
            self._last_read = self._loop.time()
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except (HttpProcessingError, ValueError):
            self._fail(UpstreamUnreachable(self._pool.details.malformed))
            return
        for message, payload in messages:
            if 100 <= message.code < 200 and message.code != 101:
                continue  # informational (100 Continue, 103 Early Hints): the final answer follows
            answer = self._answer
            if answer is None or answer.done() or self._payload is not None:
                self._drop("the upstream sent a second answer to one request")
                return
            if message.should_close:
                self.reusable = False
                self.close_because("the upstream's answer said Connection: close")
            self._payload = payload
            answer.set_result((message, payload))
            if not self._timing:
                self._start_timer()  # answered while the upload goes on: the upstream is now timed
        if upgraded or tail:
            self.reusable = False

    def eof_received(self) -> bool | None:
        """The upstream closed its side: let the transport close, which ends a body read until close."""
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        """End whatever is under way, then give the place back to the pool."""
        self.lost = True
        self.reusable = False
        self._stop_timer()
        parser, payload = self._parser, self._payload
        if parser is not None and exc is not None and payload is not None and not payload.is_eof():
            # Reset, not closed: a body that runs until the close broke off rather than ended.
            self._fail(UpstreamUnreachable(self._pool.details.broke_off))
        elif parser is not None:
            try:
                parser.feed_eof()  # completes a body that runs until the connection closes
            except (HttpProcessingError, ValueError):
                self._fail(UpstreamUnreachable(self._pool.details.broke_off))
            if payload is not None and not payload.is_eof() and not self._reading_paused:
                self._fail(UpstreamUnreachable(self._pool.details.broke_off))
            if payload is None:
                self._parser = None
        answer = self._answer
        if answer is not None and not answer.done():
            if self._received:
                answer.set_exception(UpstreamUnreachable(self._pool.details.broke_off))
            else:
                answer.set_exception(_ClosedUnanswered())
        super().connection_lost(exc)
        self._pool.forget(self)
        if logger.isEnabledFor(logging.DEBUG):
            why = self.close_reason
            if why is None:
                why = "the upstream closed it" if exc is None else f"lost: {getattr(exc, 'strerror', None) or 'reset'}"
            logger.debug("upstream connection to %s closed: %s", self._pool.label, why)

    def resume_reading(self, resume_parser: bool = True) -> None:
        """The reader caught up: time the upstream from now, not from before the pause."""
        self._last_read = self._loop.time()
        super().resume_reading(resume_parser)

    # --- one exchange -------------------------------------------------------------------------

    async def exchange(self, head: bytes, request: Outgoing) -> tuple[RawResponseMessage, StreamReader]:
        """Send one request and wait for its answer's head."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise _NotSent()
        loop = self._loop
        self._parser = HttpResponseParser(
            self,
            loop,
            READ_LIMIT,
            payload_exception=ClientPayloadError,
            response_with_body=request.method != "HEAD",
            read_until_eof=True,
            auto_decompress=False,
        )
        answer: asyncio.Future[tuple[RawResponseMessage, StreamReader]] = loop.create_future()
        self._answer = answer
        self._payload = None
        self._received = False
        self._body_sent = False
        body = request.body
        if body.stream is None:
            transport.write(head + body.data if body.data else head)
            self._body_sent = True
            self._start_timer()
        else:
            transport.write(head)
            self._writer = loop.create_task(self._send_stream(body.stream, chunked=body.length is None))
        return await answer

    async def _send_stream(self, stream: AsyncIterator[bytes], *, chunked: bool) -> None:
        """Send a body that is not held in memory, at the pace the upstream takes it."""
        try:
            async for chunk in stream:
                transport = self.transport
                if transport is None:
                    return  # lost: connection_lost has told the reader
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    await self._drain_helper()
            if self.transport is not None:
                if chunked:
                    self.transport.write(b"0\r\n\r\n")
                self._body_sent = True
                self._start_timer()
        except RequestPayloadError:
            # The client's body broke off malformed: the upstream must not take it as complete.
            self._fail(BadRequest("the request body was malformed"))
        except (ConnectionError, ClientError):
            pass  # the upstream closed while taking the body; connection_lost has ended the exchange
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def finish(self) -> bool:
        """End the exchange; True when the connection can carry another request."""
        self._timing = False
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            self.reusable = False
            self.close_because("the answer ended before the upload")
            writer.cancel()  # the answer is over; the rest of the upload goes nowhere
        payload = self._payload
        complete = payload is not None and payload.at_eof()
        self._parser = None
        self._payload = None
        self._answer = None
        return complete and self._body_sent and self.reusable and not self.lost

    # --- failures and timing ------------------------------------------------------------------

    def _fail(self, error: ProxyError) -> None:
        """Hand `error` to whoever waits on this exchange, and close the connection."""
        answer, payload = self._answer, self._payload
        if answer is not None and not answer.done():
            answer.set_exception(error)
        elif payload is not None and not payload.is_eof():
            payload.set_exception(error)
        self._drop(error.detail)

    def close_because(self, reason: str) -> None:
        """Note why this connection is (about to be) closed on our side, unless a reason is noted already."""
        if self.close_reason is None:
            self.close_reason = reason

    def _drop(self, reason: str) -> None:
        self.reusable = False
        self.close_because(reason)
        _shut(self.transport)

    def _start_timer(self) -> None:
        self._timing = True
        self._last_read = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._last_read + self._read_timeout, self._on_timer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        # One timer per connection, moved on lazily: an exchange and data_received only
        # note the time, so a busy connection costs one timer per read_timeout, not per request.
        self._timer = None
        payload = self._payload
        if not self._timing or (payload is not None and payload.is_eof()):
            return  # idle, or the whole answer is in: the next exchange re-arms it
        now = self._loop.time()
        if self._reading_paused:
            self._last_read = now  # our reader is slow, not the upstream
        due = self._last_read + self._read_timeout
        if now < due:
            self._timer = self._loop.call_at(due, self._on_timer)
            return
        self._fail(UpstreamTimeout(self._pool.details.read_timeout))


class _Pool:
    """At most `limit` connections to one origin; idle ones reused newest first; waiters served in order."""

    def __init__(
        self, upstream: Upstream, *, limit: int, connect_timeout: float, read_timeout: float, tls: ssl.SSLContext | None
    ) -> None:
        self.read_timeout = read_timeout
        self.label = f"{upstream.host}:{upstream.port}"  # for log lines
        self.details = _Details(upstream, connect_timeout=connect_timeout, read_timeout=read_timeout)
        self._host = upstream.host
        self._port = upstream.port
        self.host_line = f"Host: {upstream.authority}\r\n".encode("latin-1")  # built once: every head has it
        self._tls = tls
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._open = 0
        self._idle: deque[_Connection] = deque()
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    async def acquire(self) -> tuple[_Connection, bool]:
        """A connection to send on, and whether it was kept alive from an earlier request."""
        while True:
            if not self._waiters:
                while self._idle:
                    connection = self._idle.pop()
                    if connection.usable:
                        return connection, True
                if self._open < self._limit:
                    self._open += 1
                    return await self._connect(), False
            handed = await self._wait_turn()
            if handed is None:  # a free place, already counted for us
                return await self._connect(), False
            if handed.usable:
                return handed, True
            handed.finish()
            self.release(handed, reusable=False)

    async def _wait_turn(self) -> _Connection | None:
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()  # handed over just as we were cancelled: pass it on
                if handed is None:
                    self._open -= 1
                    self._place_freed()
                else:
                    self.release(handed, reusable=True)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    async def _connect(self) -> _Connection:
        """Open a connection on a place already counted in `_open`."""
        loop = asyncio.get_running_loop()
        connection = _Connection(loop, self)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(
                    lambda: connection,
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                )
        except BaseException as exc:
            # Also when cancelled just after connection_made: the place is given back exactly once.
            _shut(connection.transport)
            self.forget(connection)
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(self.details.connect_timeout) from None
            if isinstance(exc, OSError):
                raise UpstreamUnreachable(self.details.unreachable(exc, self._host)) from None
            raise
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("upstream connection to %s opened (%d of %d in use)", self.label, self._open, self._limit)
        return connection

    def release(self, connection: _Connection, *, reusable: bool) -> None:
        """Take a connection back after an exchange: to the next waiter, to the idle stack, or closed."""
        if not reusable or not connection.usable or self._closed:
            if self._closed:
                connection.close_because("the pool is closed (shutting down, or a reload changed the upstream)")
            elif connection.usable:
                connection.close_because("its answer was not read to the end (the client left, or an error)")
            connection.reusable = False
            _shut(connection.transport)
            # Its place is free now, not when the loss is reported: a close may wait on an upstream
            # that neither reads nor closes.
            self.forget(connection)
            return
        if self._hand(connection):
            return
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.append(connection)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._close_stale)

    def forget(self, connection: _Connection) -> None:
        """A connection is gone or going: drop it from the idle stack and free its place (once)."""
        if not connection.counted:
            return
        connection.counted = False
        with contextlib.suppress(ValueError):
            self._idle.remove(connection)
        self._open -= 1
        self._place_freed()

    def _place_freed(self) -> None:
        # Also once closed: a request already waiting here finishes with the upstream it started with.
        if self._waiters and self._open < self._limit:
            self._open += 1
            if not self._hand(None):
                self._open -= 1

    def _hand(self, item: _Connection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return True
        return False

    def _close_stale(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        while self._idle and self._idle[0].idle_since + IDLE_TIMEOUT <= now:
            stale = self._idle.popleft()
            stale.close_because(f"idle for {IDLE_TIMEOUT:g}s")
            if stale.transport is not None:
                stale.transport.close()
        if self._idle:
            self._sweep = asyncio.get_running_loop().call_at(self._idle[0].idle_since + IDLE_TIMEOUT, self._close_stale)

    def close(self) -> None:
        """Close the idle connections now and every other one when its exchange ends."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._idle:
            connection = self._idle.pop()
            connection.close_because("the pool is closed (shutting down, or a reload changed the upstream)")
            if connection.transport is not None:
                connection.transport.close()

    def reopen(self) -> None:
        """Keep connections alive again (the upstream is current once more)."""
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once close() was called: no connection is kept alive any more."""
        return self._closed

    @property
    def busy(self) -> bool:
        """True while any connection is open or being opened."""
        return self._open > 0


class FastAnswer:
    """An UpstreamAnswer read straight from the parser's StreamReader."""

    __slots__ = ("_connection", "_done", "_message", "_payload", "_pool")

    def __init__(self, message: RawResponseMessage, payload: StreamReader, connection: _Connection, pool: _Pool):
        self._message = message
        self._payload = payload
        self._connection = connection
        self._pool = pool
        self._done = False

    @property
    def status(self) -> int:
        """The status code."""
        return self._message.code

    @property
    def reason(self) -> str:
        """The reason phrase."""
        return self._message.reason

    @property
    def raw_headers(self) -> RawHeaders:
        """The headers as received."""
        return self._message.raw_headers

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The headers by name."""
        return self._message.headers

    @property
    def content_length(self) -> int | None:
        """The announced body length (the parser has checked it is a number)."""
        value = self._message.headers.get("Content-Length")
        return int(value) if value is not None else None

    def at_eof(self) -> bool:
        """True once the whole body has been read."""
        return self._payload.at_eof()

    async def read(self, limit: int) -> bytes:
        """Up to `limit` body bytes; b"" at the end."""
        try:
            return await self._payload.read(limit)
        except (ClientError, HttpProcessingError, OSError):
            raise UpstreamUnreachable(self._pool.details.broke_off) from None

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives."""
        payload = self._payload
        try:
            while True:
                chunk = await payload.readany()
                if not chunk:
                    return
                yield chunk
        except (ClientError, HttpProcessingError, OSError):
            raise UpstreamUnreachable(self._pool.details.broke_off) from None

    def release(self) -> None:
        """Done: the connection goes back to the pool if the answer was read to its end."""
        if not self._done:
            self._done = True
            self._pool.release(self._connection, reusable=self._connection.finish())

    def close(self) -> None:
        """Done early: the connection is closed."""
        if not self._done:
            self._done = True
            self._connection.finish()
            self._pool.release(self._connection, reusable=False)


def _request_head(request: Outgoing, authorization: str, host_line: bytes) -> bytes:
    body = request.body
    parts = [
        f"{request.method} {request.upstream.base_path}{request.target} HTTP/1.1\r\n".encode("latin-1"),
        host_line,
    ]
    for name, value in request.headers:
        parts += (name, b": ", value, b"\r\n")
    if body.length is not None:
        framing = f"Content-Length: {body.length}\r\n"
    elif body.stream is not None:
        framing = "Transfer-Encoding: chunked\r\n"
    elif request.method not in BODYLESS_METHODS:
        framing = "Content-Length: 0\r\n"
    else:
        framing = ""
    parts.append(f"Authorization: {authorization}\r\n{framing}\r\n".encode("latin-1"))
    return b"".join(parts)


def _shut(transport: asyncio.BaseTransport | None) -> None:
    """Close a transport; at once (reset) if it still holds unsent bytes the upstream is not taking."""
    if transport is None or transport.is_closing():
        return
    if isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()


def _origin(upstream: Upstream) -> tuple[str, str, int]:
    return (upstream.scheme, upstream.host, upstream.port)


def _unverified_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class FastClient:
    """An UpstreamClient on a pool of plain asyncio connections, one pool per upstream origin."""

    def __init__(
        self, *, max_connections: int, connect_timeout: float, read_timeout: float, tls: ssl.SSLContext | bool
    ) -> None:
        self._limit = max_connections
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._tls = tls
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._current: tuple[str, str, int] | None = None

    def use(self, upstream: Upstream) -> None:
        """New requests go to `upstream`; every other origin's connections close as their requests end."""
        origin = _origin(upstream)
        self._current = origin
        for other, pool in list(self._pools.items()):
            if other != origin:
                pool.close()
                if not pool.busy:
                    del self._pools[other]

    def _pool_for(self, upstream: Upstream) -> _Pool:
        origin = _origin(upstream)
        pool = self._pools.get(origin)
        if pool is not None and pool.closed and origin == self._current:
            pool.reopen()  # a reload moved away and back: keep its count, so the bound holds
        if pool is None:
            tls: ssl.SSLContext | None = None
            if upstream.scheme == "https":
                if isinstance(self._tls, ssl.SSLContext):
                    tls = self._tls
                else:
                    tls = ssl.create_default_context() if self._tls else _unverified_tls()
            pool = _Pool(
                upstream,
                limit=self._limit,
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
                tls=tls,
            )
            if origin != self._current:
                pool.close()  # a request that started before a reload: served, nothing kept alive
            self._pools[origin] = pool
        return pool

    async def send(self, request: Outgoing, authorization: str) -> FastAnswer:
        """Send `request`; its errors come back as ProxyError."""
        pool = self._pool_for(request.upstream)
        head = _request_head(request, authorization, pool.host_line)
        resent = False
        for _ in range(_MAX_ATTEMPTS):
            connection, reused = await pool.acquire()
            try:
                message, payload = await connection.exchange(head, request)
            except _NotSent:
                # Closing before a byte was written: any request may go out on another connection.
                connection.finish()
                pool.release(connection, reusable=False)
                continue
            except _ClosedUnanswered:
                connection.finish()
                pool.release(connection, reusable=False)
                if reused and not resent and request.may_resend:
                    resent = True
                    continue
                raise UpstreamUnreachable(pool.details.closed_unanswered) from None
            except BaseException:
                connection.finish()
                pool.release(connection, reusable=False)
                raise
            return FastAnswer(message, payload, connection, pool)
        raise UpstreamUnreachable(pool.details.kept_closing)

    async def close(self) -> None:
        """Close every pooled connection."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

"""Reaching the upstream through a lean keep-alive pool (`upstream.client = "fast"`, the default).

Owns: the pools of connections to each upstream origin (at most
`upstream.max_connections`, reused most-recent first, closed after
`IDLE_TIMEOUT` unused, waiters served in order), the request head written as
prepared bytes (what every head shares built once per pool), and the rule
that a request whose kept-alive connection turns out closed before any
answer byte is sent again once on a new one, when it is idempotent and its
body replayable, as aiohttp does. One connection and its parsing (llhttp
through httptools, straight into a FastAnswer) is fast_connection.py. What
ClientSession does per request and a proxy does not need (URL objects,
cookies, tracing, middlewares, a task per request) is skipped. Every error
leaves as ProxyError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque

from ..core.errors import UpstreamTimeout, UpstreamUnreachable
from .fast_answer import FastAnswer
from .fast_connection import ClosedUnanswered, Connection, Details, NotSent, shut
from .model import BODYLESS_METHODS, AnswerSink, Outgoing, Upstream

# Pool events (a connection opened, closed and why) at debug, behind a level check at each event, never per request.
logger = logging.getLogger("tokenproxy.upstream")

# Seconds an unused kept-alive connection stays open (aiohttp's connector keeps them 15 s too).
IDLE_TIMEOUT = 15.0

# Request-line starts kept per base path: the common methods, never an unbounded set of made-up ones.
_CACHED_METHODS = 16

# Connections one request may be tried on: closing ones skipped, one resend after a silent close.
_MAX_ATTEMPTS = 4


class _Pool:
    """At most `limit` connections to one origin; idle ones reused newest first; waiters served in order."""

    def __init__(
        self, upstream: Upstream, *, limit: int, connect_timeout: float, read_timeout: float, tls: ssl.SSLContext | None
    ) -> None:
        self._loop = asyncio.get_running_loop()  # pools are made by FastClient.send, on the loop they serve
        self.read_timeout = read_timeout
        self.label = f"{upstream.host}:{upstream.port}"  # for log lines
        self.details = Details(upstream, connect_timeout=connect_timeout, read_timeout=read_timeout)
        self._host = upstream.host
        self._port = upstream.port
        # Built once: the end of every request line and the Host line that follows it.
        self._line_end = f" HTTP/1.1\r\nHost: {upstream.authority}\r\n".encode("latin-1")
        # "METHOD /base" per base path (routes may share an origin) and method; the event loop owns both caches.
        self._line_starts: dict[str, dict[str, bytes]] = {}
        self._authorization = ("", b"")  # the last Authorization value and its line as bytes: one per token
        self._tls = tls
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._open = 0
        self._idle: deque[Connection] = deque()
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False  # close() was called: no connection is kept alive any more

    def take_idle(self) -> Connection | None:
        """The newest usable kept-alive connection, when no request is waiting its turn before us."""
        if not self._waiters:
            idle = self._idle
            while idle:
                connection = idle.pop()
                transport = connection.transport  # Connection.usable, without a call
                if not connection.lost and transport is not None and not transport.is_closing():
                    return connection
        return None

    async def acquire(self) -> tuple[Connection, bool]:
        """A connection to send on, and whether it was kept alive from an earlier request."""
        while True:
            if not self._waiters:
                kept = self.take_idle()
                if kept is not None:
                    return kept, True
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

    async def _wait_turn(self) -> Connection | None:
        waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
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

    async def _connect(self) -> Connection:
        """Open a connection on a place already counted in `_open`."""
        loop = asyncio.get_running_loop()
        connection = Connection(loop, self)
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
            shut(connection.transport)
            self.forget(connection)
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(self.details.connect_timeout) from None
            if isinstance(exc, OSError):
                raise UpstreamUnreachable(self.details.unreachable(exc, self._host)) from None
            raise
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("upstream connection to %s opened (%d of %d in use)", self.label, self._open, self._limit)
        return connection

    def release(self, connection: Connection, *, reusable: bool) -> None:
        """Take a connection back after an exchange: to the next waiter, to the idle stack, or closed."""
        transport = connection.transport  # Connection.usable, without a call
        if not reusable or connection.lost or transport is None or transport.is_closing() or self.closed:
            if self.closed:
                connection.close_because("the pool is closed (shutting down, or a reload changed the upstream)")
            elif connection.usable:
                connection.close_because("its answer was not read to the end (the client left, or an error)")
            connection.reusable = False
            shut(connection.transport)
            # Its place is free now, not when the loss is reported: a close may wait on an upstream
            # that neither reads nor closes.
            self.forget(connection)
            return
        if self._waiters and self._hand(connection):
            return
        loop = self._loop
        connection.idle_since = loop.time()
        self._idle.append(connection)
        if self._sweep is None:
            self._sweep = loop.call_later(IDLE_TIMEOUT, self._close_stale)

    def head(self, request: Outgoing, authorization: str) -> bytes:
        """The request's head as bytes, followed by its body when that is held whole."""
        body = request.body
        base = request.upstream.base_path
        starts = self._line_starts.get(base)
        if starts is None:
            starts = self._line_starts[base] = {}
        start = starts.get(request.method)
        if start is None:
            start = f"{request.method} {base}".encode("latin-1")
            if len(starts) < _CACHED_METHODS:  # the method is the client's word: keep only a few
                starts[request.method] = start
        parts = [start, request.target.encode("latin-1"), self._line_end]
        for name, value in request.headers:
            parts += (name, b": ", value, b"\r\n")
        text, line = self._authorization
        if authorization is not text and authorization != text:
            line = f"Authorization: {authorization}\r\n".encode("latin-1")
            self._authorization = (authorization, line)
        parts.append(line)
        if body.length is not None:
            parts.append(b"Content-Length: %d\r\n\r\n" % body.length)
        elif body.stream is not None:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        elif request.method not in BODYLESS_METHODS:
            parts.append(b"Content-Length: 0\r\n\r\n")
        else:
            parts.append(b"\r\n")
        if body.data:
            parts.append(body.data)
        return b"".join(parts)

    def forget(self, connection: Connection) -> None:
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

    def _hand(self, item: Connection | None) -> bool:
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
        self.closed = True
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
        self.closed = False

    @property
    def busy(self) -> bool:
        """True while any connection is open or being opened."""
        return self._open > 0


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
        self._last: tuple[Upstream, _Pool] | None = None  # the pool found last, and for which upstream

    def use(self, upstream: Upstream) -> None:
        """New requests go to `upstream`; every other origin's connections close as their requests end."""
        origin = _origin(upstream)
        self._current = origin
        self._last = None
        for other, pool in list(self._pools.items()):
            if other != origin:
                pool.close()
                if not pool.busy:
                    del self._pools[other]

    def _pool_for(self, upstream: Upstream) -> _Pool:
        last = self._last
        if last is not None and last[0] is upstream and not last[1].closed:
            return last[1]
        pool = self._find_pool(upstream)
        self._last = (upstream, pool)
        return pool

    def _find_pool(self, upstream: Upstream) -> _Pool:
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

    def start(self, request: Outgoing, authorization: str, sink: AnswerSink) -> Connection | None:
        """Send `request` on a kept-alive connection now, `sink` told of its answer; None when none is idle."""
        last = self._last  # _pool_for's usual case, without a call
        if last is not None and last[0] is request.upstream and not last[1].closed:
            pool = last[1]
        else:
            pool = self._pool_for(request.upstream)
        connection = pool.take_idle()
        if connection is None:
            return None
        try:
            connection.exchange_quickly(pool.head(request, authorization), request, sink)
        except NotSent:
            connection.finish()
            pool.release(connection, reusable=False)
            return None
        return connection

    async def send(self, request: Outgoing, authorization: str) -> FastAnswer:
        """Send `request`; its errors come back as ProxyError."""
        pool = self._pool_for(request.upstream)
        head = pool.head(request, authorization)
        resent = False
        for _ in range(_MAX_ATTEMPTS):
            connection = pool.take_idle()  # the usual case, without a coroutine
            reused = connection is not None
            if connection is None:
                connection, reused = await pool.acquire()
            try:
                answer = await connection.exchange(head, request)
            except NotSent:
                # Closing before a byte was written: any request may go out on another connection.
                connection.finish()
                pool.release(connection, reusable=False)
                continue
            except ClosedUnanswered:
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
            return answer
        raise UpstreamUnreachable(pool.details.kept_closing)

    async def close(self) -> None:
        """Close every pooled connection."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

"""The admin port's server: aiohttp's, held to the proxy port's limits.

Owns: how the admin port (and the workers' group admin port) meets hostile
or broken clients. aiohttp gives the header count and size limits and the
idle keep-alive timeout; this module adds the header and body time limits,
`max_connections` (503, the proxy port's `Refusal`) and the parser's
refusals as tokenproxy's JSON error. The proxy port has its own server on
httptools (server.py); the admin port keeps aiohttp's web app for its few
routes. It subclasses aiohttp's `AppRunner`, `Server` and `RequestHandler`,
and reads a few of their private attributes (`_kwargs`, `_waiter`,
`_messages`, `_current_request`, `_reading_paused`, and the writer's
`_headers_written`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import StreamReader, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from ..core.errors import BadRequest, ProxyError
from .render import error_response
from .server import (
    READ_BUFFER,
    Admission,
    HeadersTooLarge,
    Refusal,
    ServerLimits,
    TargetTooLong,
)

logger = logging.getLogger("tokenproxy.server")


def handler_kwargs(limits: ServerLimits) -> dict[str, Any]:
    """The limits aiohttp's RequestHandler enforces itself."""
    return {
        "read_bufsize": READ_BUFFER,
        "keepalive_timeout": limits.keepalive_timeout,
        "max_headers": limits.max_headers,
        "max_field_size": limits.max_header_size,
        "max_line_size": limits.max_request_line,
    }


def parser_refusal(exc: HttpProcessingError, limits: ServerLimits) -> ProxyError:
    """The answer to a request aiohttp's parser refused; the detail never quotes the request's bytes."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        start = exc.args[0] if exc.args and isinstance(exc.args[0], (bytes, bytearray)) else b""
        # The parser raises the same exception for both limits; tell them apart
        # by which limit was hit, or (when both are equal) by what the line
        # looks like: a request target (C parser) or request line (pure-Python
        # parser), never `Name: value`.
        is_target = limit == limits.max_request_line and (
            limits.max_request_line != limits.max_header_size or _REQUEST_START.match(bytes(start)) is not None
        )
        if is_target:
            return TargetTooLong(f"the request line is longer than {limits.max_request_line} bytes")
        return HeadersTooLarge(f"a request header is longer than {limits.max_header_size} bytes")
    # These carry the offending bytes in their message: say what is wrong without them.
    for kind, what in _QUOTING_ERRORS:
        if isinstance(exc, kind):
            return BadRequest(f"malformed request: {what}")
    # The rest start with a fixed description (llhttp's, or aiohttp's own sentence).
    reason = (exc.message or type(exc).__name__).split("\n", 1)[0].split(":", 1)[0].strip()
    if reason == "Too many headers received":
        return HeadersTooLarge(f"the request has more than {limits.max_headers} headers")
    return BadRequest(f"malformed request: {reason[:100]}")


# A request target (`/…`, `*`, `scheme://…`) or a request line (`METHOD SP …`).
_REQUEST_START = re.compile(rb"[/*]|[A-Za-z][A-Za-z0-9+.-]*://|[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")

_QUOTING_ERRORS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (InvalidURLError, "the request target is not a valid URL"),
    (BadHttpMethod, "the request method is not valid"),
    (BadStatusLine, "the request line is not valid HTTP/1.x"),
    (InvalidHeader, "a request header is not valid"),
)


class _Handler(RequestHandler):
    """aiohttp's RequestHandler plus the header and body time limits, JSON refusals and connection counting."""

    __slots__ = (
        "_body",
        "_body_last",
        "_body_timer",
        "_counted",
        "_head_timer",
        "_heads_seen",
        "_server",
        "_tls",
        "tunnel",
    )

    def __init__(self, server: AdminServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._server = server
        self._head_timer: asyncio.TimerHandle | None = None  # armed while a request's headers arrive
        self._heads_seen = False  # whether any request head has been complete on this connection
        self._counted = True  # this connection holds one of server.max_connections
        # Inside an intercepted CONNECT tunnel: its `host:port` (lower-case), which every request must name.
        self.tunnel: str | None = None
        self._tls: ssl.SSLContext | None = None
        # The request whose body is timed (from its handler's start until the body is complete),
        # the loop time its last body bytes arrived, and the timer, armed while the proxy reads.
        self._body: web.BaseRequest | None = None
        self._body_last = 0.0
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Note the connection's TLS context once (aiohttp asks the transport again for every request)."""
        self._tls = transport.get_extra_info("sslcontext")
        super().connection_made(transport)

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of this connection, if any."""
        return self._tls if self.transport is not None else None

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        if self._body is not None:
            self._body_arrived()
        if len(self._messages) > queued:
            # A request head is complete (or refused): its time limit is met.
            self._heads_seen = True
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            if self._current_request is not None:
                self._fail_running_body()
        elif self._head_timer is None:
            # Bytes that did not complete a head while the connection waits for a request,
            # or before its first head: its first bytes. The rest of the head has
            # header_timeout. (A new connection's first packet can arrive before its request
            # loop has started waiting, and must be timed all the same.)
            waiter = self._waiter
            if not self._heads_seen or (waiter is not None and not waiter.done()):
                self._head_timer = self._loop.call_later(self._server.limits.header_timeout, self._head_timed_out)

    # --- the body time limit ------------------------------------------------------------------
    # Counted only while the proxy takes the client's bytes: from the handler's start (a request
    # queued behind another, or one whose client waits for `100 Continue`, is not yet owed), and
    # not while flow control holds the socket because the proxy itself is slow to pass the body on.

    def time_body(self, request: web.BaseRequest) -> None:
        """Start the body time limit for `request`, whose handler starts now, unless its body is complete."""
        self._stop_body_timer()
        if not request.content.is_eof():
            self._body = request
            self._body_last = self._loop.time()
            if not self._reading_paused:
                self._arm_body_timer(self._body_last)

    def _body_arrived(self) -> None:
        body = self._body
        assert body is not None
        if body.content.is_eof():
            self._stop_body_timer()
        else:
            self._body_last = self._loop.time()

    def _arm_body_timer(self, since: float) -> None:
        self._body_timer = self._loop.call_at(since + self._server.limits.body_timeout, self._body_deadline)

    def _stop_body_timer(self) -> None:
        self._body = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def pause_reading(self) -> None:
        """Flow control holds the socket: the client cannot send, so its body is not timed meanwhile."""
        super().pause_reading()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def resume_reading(self, resume_parser: bool = True) -> None:
        """The socket is read again: the client's body has its full time limit from now."""
        super().resume_reading(resume_parser)
        if self._body is not None and self._body_timer is None and not self._reading_paused:
            self._body_last = self._loop.time()
            self._arm_body_timer(self._body_last)

    def _body_deadline(self) -> None:
        self._body_timer = None
        request = self._body
        if request is None or self.transport is None:
            return
        if request.content.is_eof():
            self._body = None
            return
        if self._loop.time() < self._body_last + self._server.limits.body_timeout:
            self._arm_body_timer(self._body_last)  # bytes arrived since this timer was armed
            return
        self._body = None
        answered = _answer_begun(request.writer)
        logger.info(
            "closed a connection from %s: its request body stalled for %gs (server.body_timeout)%s",
            _peer(self.transport),
            self._server.limits.body_timeout,
            "" if answered else "; answered 408",
        )
        if answered:
            self.transport.abort()  # the answer is cut short anyway: nothing left to flush
        else:
            self.transport.write(self._server.body_timeout_answer)
        if self._current_request is None:
            # The handler is done and aiohttp reads the unread rest to discard it: that ends here.
            request.content.feed_eof()
        # A handler still reading the body gets the connection's loss (and is cancelled).
        self.force_close()

    def _fail_running_body(self) -> None:
        # The parser refused bytes while a request is being handled: they were
        # that request's body (a bad chunk size mid-upload), which will now never
        # end. Fail its reads rather than let the handler wait for the client.
        message = self._messages[-1][0]
        request = self._current_request
        if not isinstance(message, RawRequestMessage) and request is not None and not request.content.is_eof():
            request.content.set_exception(RequestPayloadError("the request body is malformed"))

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiter = self._waiter
        if self.transport is None or self._messages or waiter is None or waiter.done():
            return
        logger.info(
            "closed a connection from %s: its request headers were not complete within %gs (server.header_timeout)",
            _peer(self.transport),
            self._server.limits.header_timeout,
        )
        self.transport.write(self._server.timeout_answer)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._stop_body_timer()
        if self._counted:
            self._counted = False
            self._server.connection_closed()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """tokenproxy's JSON answer instead of aiohttp's text page; parser refusals logged in one line."""
        if request.writer.output_size > 0:
            # Part of an answer is out already; aiohttp closes the connection.
            return super().handle_error(request, status, exc, message)
        error: ProxyError
        if status == 400 and isinstance(exc, HttpProcessingError):
            error = parser_refusal(exc, self._server.limits)
            logger.info("refused a request from %s: %s (%d)", request.remote, error.detail, error.status)
        elif isinstance(exc, RequestPayloadError):
            error = BadRequest("the request body is malformed or incomplete")
            logger.info("refused a request from %s: %s", request.remote, error.detail)
        else:
            super().handle_error(request, status, exc, message)  # logs it, with its traceback
            error = ProxyError("tokenproxy failed to handle the request")
            error.status = status
        response = error_response(error)
        response.force_close()
        return response


def _answer_begun(writer: AbstractStreamWriter) -> bool:
    """Whether the head of the final answer has gone out (a `100 Continue` before it does not count)."""
    written = getattr(writer, "_headers_written", None)
    return writer.output_size > 0 if written is None else bool(written)


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "a client"


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class AdminServer(web.Server, Admission):
    """aiohttp's low-level server with a connection limit; makes `_Handler`s.

    State owned by the event loop (only touched in its callbacks): the count
    of open connections and the transports being refused.
    """

    def __init__(self, handler: Handler, *, limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        # Each request is made just before its handler starts: its body is timed from then.
        # (A plain call around aiohttp's factory, rather than a coroutine around every handler.)
        make_request = self.request_factory

        def timed_request(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            request = make_request(message, payload, protocol, writer, task)
            cast(_Handler, protocol).time_body(request)
            return request

        self.request_factory = timed_request
        self.start_admission(limits)

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        """The protocol for one new connection: a request handler, or a refusal when full."""
        if not self.admit():
            return Refusal(self)
        return _Handler(self, loop=self._loop, **self._kwargs)

    def pre_shutdown(self) -> None:
        """Close connections being refused along with the idle ones."""
        self.stop_refusing()
        super().pre_shutdown()


class AdminRunner(web.AppRunner):
    """An AppRunner whose server is an `AdminServer` with the given limits."""

    def __init__(self, app: web.Application, *, limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(app, **handler_kwargs(limits), **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return AdminServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            limits=self._limits,
            **plain._kwargs,
        )

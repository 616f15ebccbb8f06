"""The proxy port's HTTP/1.x server: llhttp (httptools) on raw asyncio protocols.

Owns: one `ClientConnection` per client connection, which parses what the
client sends, serves its requests one at a time in order with one coroutine,
and meets hostile or broken clients before any request reaches the entry
handler:

- a time limit for receiving a request's headers, counted from the read
  that brought its first byte (slowloris): 408 with the JSON error, then the
  connection is closed;
- a time limit between two arrivals of a request body's bytes while the
  proxy is taking them (a stalled upload): 408 when no answer has begun,
  then the connection is closed; not counted while flow control holds the
  socket;
- the idle keep-alive timeout; read flow control (the socket is not read
  while more than READ_BUFFER body bytes wait unread) and write flow
  control (a writer waits while the client is slow to take its answer);
- `max_connections`: one more connection gets 503 with the JSON error and
  is closed, while the connections already open keep working;
- the parser's refusals (and the header limits llhttp does not have) as
  tokenproxy's JSON error (400, or 414/431 for a request line or header over
  the limit), logged as one line without a traceback; a request body that
  turns out malformed after its handling started fails that body's reads.

Knows nothing of tokens, upstreams or the config file: `ServerLimits` is
built by the composition root, and each request goes to one handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httptools
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from ..core.errors import BadRequest, ProxyError
from ..upstream.model import PLAIN_CONNECTION, Discard
from .exchange import BodyStream, Request, malformed_body
from .headers import REQUEST_DROP_BYTES, REQUEST_DROP_SIZES
from .methods import MethodRecovery
from .render import raw_answer

logger = logging.getLogger("tokenproxy.server")

# An over-the-limit or refused connection is kept this long after its answer (reading and
# discarding what the client still sends, so the answer is not lost to a reset), and at most
# this many over-the-limit connections are kept at a time.
REFUSAL_LINGER = 2.0
MAX_REFUSING = 64

# Bytes of request bodies received on one connection and not yet read by the proxy before it stops
# reading the socket; it reads again once they fall under half of this.
READ_BUFFER = 64 * 1024

# Where the headers to forward go once a Connection header names more to leave out: nowhere.
_DISCARD = Discard()

# Pipelined requests whose heads are parsed while they wait for the ones before them; past this
# the socket is not read until they are served.
MAX_QUEUED = 16


class RequestTimeout(ProxyError):
    """A request's headers took longer than `server.header_timeout`, or its body stalled for `server.body_timeout`."""

    status = 408
    code = "request_timeout"


class TooManyConnections(ProxyError):
    """`server.max_connections` connections are already open."""

    status = 503
    code = "too_many_connections"


class HeadersTooLarge(ProxyError):
    """More headers than `server.max_headers`, or one longer than `server.max_header_size`."""

    status = 431
    code = "headers_too_large"


class TargetTooLong(ProxyError):
    """A request line longer than `server.max_request_line`."""

    status = 414
    code = "target_too_long"


@dataclass(frozen=True, kw_only=True)
class ServerLimits:
    """What one client may send and hold.

    Every value comes from `[server]` (the composition root builds it); there
    are no defaults here, so the config's are the only ones.
    """

    max_connections: int
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float
    max_headers: int
    max_header_size: int
    max_request_line: int


class Admission:
    """`server.max_connections` for a listener (the proxy port's and the admin port's): the count of admitted
    connections, the refusals when full, and the answers written when there is no request to answer.

    State owned by the event loop (only touched in its callbacks).
    """

    def start_admission(self, limits: ServerLimits) -> None:
        """Set up for `limits` (a method, not `__init__`: aiohttp's `web.Server` has its own)."""
        self.limits = limits
        self.open_connections = 0  # admitted and not yet lost
        self.refusing: set[asyncio.Transport] = set()
        self._full_logged = False
        self.timeout_answer = raw_answer(
            RequestTimeout(f"the request headers did not arrive within {limits.header_timeout:g}s")
        )
        self.body_timeout_answer = raw_answer(
            RequestTimeout(f"no bytes of the request body arrived for {limits.body_timeout:g}s")
        )
        self.busy_answer = raw_answer(
            TooManyConnections(
                f"the proxy already has {limits.max_connections} open connections (server.max_connections)",
                retry_after=1,
            )
        )

    def admit(self) -> bool:
        """Count one more connection, or False when `max_connections` are open (said once until some close)."""
        if self.open_connections >= self.limits.max_connections:
            if not self._full_logged:
                self._full_logged = True
                logger.warning(
                    "server.max_connections (%d) reached: new connections get 503 until some close",
                    self.limits.max_connections,
                )
            return False
        self.open_connections += 1
        return True

    def connection_closed(self) -> None:
        """One admitted connection is gone."""
        self.open_connections -= 1
        if self.open_connections < self.limits.max_connections:
            self._full_logged = False

    def stop_refusing(self) -> None:
        """Close the connections being refused (at shutdown)."""
        for transport in list(self.refusing):
            transport.abort()
        self.refusing.clear()


class Refusal(asyncio.Protocol):
    """A connection over `max_connections`: answered 503 at once, drained briefly, closed."""

    def __init__(self, server: Admission) -> None:
        self._manager = server
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport subclass (uvloop's TCPTransport is not).
        transport = cast(asyncio.Transport, transport)
        refusing = self._manager.refusing
        if len(refusing) >= MAX_REFUSING:
            transport.abort()
            return
        self._transport = transport
        refusing.add(transport)
        transport.write(self._manager.busy_answer)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        """Whatever the client sends is discarded."""

    def eof_received(self) -> bool:
        return False  # the client is done too: close

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._manager.refusing.discard(self._transport)


class Handler(Protocol):
    """What serves the proxy port's requests (entry.py's Entry)."""

    async def handle(self, request: Request) -> None:
        """Serve `request` to its end in the connection's coroutine, writing its answer."""

    def start(self, request: Request) -> bool:
        """Take `request` on in callbacks (`request.pending` set; the connection told `served` or `resume`);
        False, with nothing answered, when `handle` must serve it."""


class FirstProtocol(Protocol):
    """What makes the protocol a new connection starts with (connect.py's Tunnels), and ends its own work."""

    def protocol(self, server: ProxyServer) -> asyncio.Protocol:
        """The protocol for one new, admitted connection."""

    def close(self) -> None:
        """Stop what it started that is not a connection of the server yet (TLS handshakes, tunnel connects)."""


def _parser_refusal(exc: httptools.HttpParserError) -> ProxyError:
    """The answer to bytes llhttp refused; the detail never quotes them (llhttp's reasons are fixed sentences)."""
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return BadRequest("malformed request: the request method is not valid")
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return BadRequest("malformed request: the request target is not a valid URL")
    reason = (str(exc) or type(exc).__name__).split("\n", 1)[0].split(":", 1)[0].strip()
    return BadRequest(f"malformed request: {reason[:100]}")


class ClientConnection(asyncio.Protocol):
    """One client connection of the proxy port: its parser, its limits, and the coroutine serving its requests.

    Everything here runs on the event loop: the protocol callbacks feed the
    parser, which queues requests (heads complete) and feeds their bodies;
    one coroutine per connection takes the requests in order and awaits the
    handler for each. The connection's loss cancels that coroutine (the
    request under way sees CancelledError), and nothing it started outlives it.
    """

    __slots__ = (
        "_body_last",
        "_body_timer",
        "_connection",
        "_content_length",
        "_current",
        "_drain",
        "_expect",
        "_forwarded",
        "_handler",
        "_head_bytes",
        "_head_limit",
        "_head_timer",
        "_headers",
        "_host",
        "_hosts",
        "_idle_since",
        "_idle_timer",
        "_in_head",
        "_input_done",
        "_limits",
        "_linger",
        "_loop",
        "_manager",
        "_max_header_size",
        "_max_headers",
        "_methods",
        "_parser",
        "_parsing",
        "_queue",
        "_quick_over",
        "_reading_paused",
        "_refusal",
        "_remote",
        "_resumed",
        "_scheme",
        "_start",
        "_task",
        "_transfer_encoding",
        "_transport",
        "_unread",
        "_url",
        "_waiter",
        "_write_paused",
        "counted",
        "shutting_down",
        "tunnel",
    )

    def __init__(self, server: ProxyServer, tunnel: str | None = None) -> None:
        self._manager = server
        self._limits = server.limits
        self._head_limit = server.head_limit
        self._max_headers = self._limits.max_headers
        self._max_header_size = self._limits.max_header_size
        self._loop = server.loop
        self._handler = server.handler.handle
        self._start = server.handler.start
        self.tunnel = tunnel  # inside an intercepted CONNECT tunnel: its `host:port`, which every request must name
        self.counted = True  # this connection holds one of server.max_connections
        self.shutting_down = False
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._methods = MethodRecovery(self._limits.max_request_line)
        self._remote: str | None = None
        self._scheme = "http"
        # Requests with complete heads waiting to be served (or a refusal, answered in its turn).
        self._queue: deque[Request | ProxyError] = deque()
        self._current: Request | None = None  # the request being served
        self._resumed: Request | None = None  # the current request, taken on in callbacks, awaits the coroutine
        self._quick_over: asyncio.Future[None] | None = None  # a shutdown waits here for a request in callbacks
        self._parsing: Request | None = None  # the request whose body the parser is reading
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None  # the serving coroutine waits here for a request
        self._input_done = False  # the parser takes no more bytes (refused, or the rest is not HTTP)
        self._refusal: ProxyError | None = None  # what a parser callback refused
        # The head being parsed.
        self._in_head = False
        self._head_bytes = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        # The headers that go upstream, while that is simple (_DISCARD: a Connection header names more).
        self._forwarded: list[tuple[bytes, bytes]] = []
        self._host: bytes | None = None
        self._hosts = 0
        self._connection = False  # a Connection header came
        self._content_length: bytes | None = None
        self._transfer_encoding: bytes | None = None
        self._expect: bytes | None = None
        # Flow control.
        self._unread = 0  # body bytes received and not yet read, all requests together
        self._reading_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        # Timers.
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_last = 0.0
        self._linger: asyncio.TimerHandle | None = None

    # --- the connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if transport.get_extra_info("sslcontext") is not None:
            self._scheme = "https"
        self._manager.connections.add(self)
        self._go_idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._transport = None
        for timer in (self._head_timer, self._idle_timer, self._body_timer, self._linger):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._body_timer = self._linger = None
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("the client closed the connection"))
            drain.exception()  # retrieved: nobody may be waiting on it any more
        self._drain = None
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the request under way ends (499); nothing is left waiting
        current = self._current
        if current is not None and current.pending is not None:
            pending, current.pending = current.pending, None
            self._current = self._resumed = None
            pending.abandon()  # under way in callbacks, or handed on to a coroutine that will not run it now
            self._quick_ended()
        self._manager.connections.discard(self)
        if self.counted:
            self.counted = False
            self._manager.connection_closed()

    def eof_received(self) -> bool:
        # TCP cannot tell a half-close from a client that left: as nginx does, the client is gone.
        return False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)

    # --- what exchanges use (exchange.Link) ------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write to the client; nothing once it is gone."""
        if self._transport is not None:
            self._transport.write(data)

    async def drain(self) -> None:
        """Wait while the client is slow to take what was written."""
        if self._transport is None:
            raise ConnectionResetError("the client closed the connection")
        if not self._write_paused:
            return
        if self._drain is None:
            self._drain = self._loop.create_future()
        await self._drain

    def close(self) -> None:
        """Close once what was written is sent."""
        self._input_done = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Cut the connection at once."""
        self._input_done = True
        if self._transport is not None:
            self._transport.abort()

    def sockname(self) -> object:
        """The local address the client connected to."""
        return None if self._transport is None else self._transport.get_extra_info("sockname")

    def served(self, request: Request) -> None:
        """A request taken on in callbacks is answered: the next one is served, or the connection idles."""
        if self._current is not request:
            return
        self._current = None
        if self._quick_over is not None:
            self._quick_ended()
        if self._transport is None:
            return
        if request.close or self.shutting_down:
            self.close()
        elif self._queue:
            self._wake()
        elif self._in_head:
            self._go_idle()
        else:
            # _go_idle(), written out for the usual case: no next head begun.
            self._idle_since = self._loop.time()
            if self._idle_timer is None:
                self._idle_timer = self._loop.call_at(self._idle_since + self._limits.keepalive_timeout, self._idle_end)

    def resume(self, request: Request) -> None:
        """A request taken on in callbacks goes on in the serving coroutine."""
        if self._current is request and self._transport is not None:
            self._resumed = request
            self._quick_ended()  # a shutdown waits for the coroutine now
            self._wake()

    def _quick_ended(self) -> None:
        over, self._quick_over = self._quick_over, None
        if over is not None and not over.done():
            over.set_result(None)

    def body_taken(self, size: int) -> None:
        """Body bytes were read out of their buffer."""
        self._unread -= size
        if self._reading_paused and self._unread <= READ_BUFFER // 2 and len(self._queue) <= MAX_QUEUED:
            self._resume_reading()

    # --- reading -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._input_done:
            return  # refused or closing: what the client still sends is discarded
        self._feed(data)
        if self._in_head and not self._input_done:
            self._head_bytes += len(data)
            if self._head_bytes > self._head_limit:
                self._refuse_head(HeadersTooLarge("the request head is larger than the header limits allow"))
            elif self._head_timer is None and self._current is None and not self._queue:
                self._arm_head_timer()

    def _feed(self, data: bytes, idle: bool | None = None) -> None:
        methods = self._methods
        if idle is None:
            idle = not self._in_head and self._parsing is None
        fed = methods.prepare(data, idle)
        try:
            self._parser.feed_data(fed)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(fed, int(upgrade.args[0]))
        except httptools.HttpParserInvalidMethodError as exc:
            # Perhaps a method token llhttp does not know (methods.py): resumed with a fresh parser, or refused.
            resumed = methods.recover() if self._refusal is None else None
            if resumed is None:
                self._parse_failed(exc)
                return
            self._parser = httptools.HttpRequestParser(self)
            self._parsing = None
            self._in_head = bool(methods.pending)
            if resumed:
                self._feed(resumed, True)
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
        else:
            if (self._in_head and not self._url) or methods.carry:
                methods.fed(self._in_head and not self._url)

    def _upgraded(self, data: bytes, offset: int) -> None:
        """llhttp stopped after a CONNECT's head, or after a request asking to `Upgrade`: neither changes protocol."""
        request = self._queue[-1] if self._queue else None
        self._parsing = None
        if not isinstance(request, Request):
            self._input_done = True
            return
        if request.body is not None:
            # llhttp skips the body of a request asking to Upgrade: its bytes would be read as the next request.
            self._queue.pop()
            self._refuse_head(BadRequest("malformed request: a request asking to Upgrade may not have a body"))
            return
        if request.method == "CONNECT":
            request.close = True  # a later CONNECT: the forwarder answers 400, and the connection ends
            self._input_done = True
            return
        # The Upgrade header is hop-by-hop: the request goes on as an ordinary one, and so does the connection.
        self._parser = httptools.HttpRequestParser(self)
        rest = data[offset:]
        if rest:
            self._feed(rest, True)

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        refusal, self._refusal = self._refusal, None
        parsing = self._parsing
        if refusal is None and parsing is not None and parsing.body is not None and not parsing.body.complete:
            # Bytes of a request body were refused (a bad chunk size mid-upload): its reads fail, nothing more
            # is read from this connection.
            self._parsing = None
            parsing.close = True
            parsing.body.fail(malformed_body())
            self._input_done = True
            return
        self._refuse_head(refusal or _parser_refusal(exc))

    def _refuse_head(self, error: ProxyError) -> None:
        """A head was refused: answered in its turn (after the requests before it), then the connection closes."""
        self._input_done = True
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if not isinstance(error, RequestTimeout):
            logger.info("refused a request from %s: %s (%d)", self._remote or "a client", error.detail, error.status)
        self._queue.append(error)
        self._wake()

    # --- llhttp's callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        """A request's first byte."""
        self._in_head = True
        self._head_bytes = 0
        self._url = b""
        self._headers = []
        self._forwarded = []
        self._host = self._content_length = self._transfer_encoding = self._expect = None
        self._hosts = 0
        self._connection = False

    def on_url(self, url: bytes) -> None:
        """(Part of) the request target."""
        self._url += url
        if len(self._url) > self._limits.max_request_line:
            self._refusal = TargetTooLong(f"the request line is longer than {self._limits.max_request_line} bytes")
            raise self._refusal

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header, whole (its length is checked when the head is)."""
        pair = (name, value)
        headers = self._headers
        headers.append(pair)
        if len(headers) > self._max_headers:
            self._check_headers()  # refused at once: a flood of small headers holds no memory
        if len(name) in REQUEST_DROP_SIZES and (key := name.lower()) in REQUEST_DROP_BYTES:
            if key == b"host":  # in every request: noted here, without a call
                self._host = value
                self._hosts += 1
            else:
                self._not_forwarded(key, value)
        else:
            self._forwarded.append(pair)

    def _not_forwarded(self, key: bytes, value: bytes) -> None:
        """A header the proxy never forwards other than Host (lower-case `key`): the ones the request's handling
        needs noted."""
        if key == b"content-length":
            self._content_length = value
        elif key == b"transfer-encoding":
            self._transfer_encoding = value
        elif key == b"expect":
            self._expect = value
        elif key == b"connection":
            self._connection = True
            if value.lower() not in PLAIN_CONNECTION:
                self._forwarded = _DISCARD  # it names more headers to leave out: the forwarder sorts them

    def _check_headers(self) -> None:
        """Refuse a head with more than `max_headers` headers, or one longer than `max_header_size`."""
        limits = self._limits
        if len(self._headers) > limits.max_headers:
            self._refusal = HeadersTooLarge(f"the request has more than {limits.max_headers} headers")
            raise self._refusal
        for name, value in self._headers:
            if len(name) + len(value) + 2 > limits.max_header_size:
                self._refusal = HeadersTooLarge(f"a request header is longer than {limits.max_header_size} bytes")
                raise self._refusal

    def on_headers_complete(self) -> None:
        """The head is whole: the request is queued, its body (if any) to follow."""
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._head_bytes + len(self._methods.fed_data) > self._max_header_size:
            self._check_headers()  # else no header is over the limit: the head holds fewer bytes
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        if self._connection:
            version = (1, 1) if parser.get_http_version() == "1.1" else (1, 0)
        else:
            # Without a Connection header llhttp keeps alive exactly the HTTP/1.1 requests (its version
            # string is made anew for each call).
            version = (1, 1) if keep_alive else (1, 0)
        if self._hosts != 1:
            if self._hosts > 1:
                self._refusal = BadRequest("malformed request: more than one Host header")
                raise self._refusal
            if version >= (1, 1):
                self._refusal = BadRequest("malformed request: an HTTP/1.1 request needs a Host header")
                raise self._refusal
        method = self._methods.method_of(parser)
        forwarded = self._forwarded
        request = Request(
            self,
            method,
            self._url.decode("latin-1"),
            version,
            self._headers,
            None if forwarded is _DISCARD else forwarded,
            keep_alive,
            self._remote,
            self._scheme,
            self.tunnel,
            self._host,
        )
        if self._expect is not None:
            request.expect = self._expect.decode("latin-1").strip()
        if self._transfer_encoding is not None:
            request.transfer_encoding = self._transfer_encoding.decode("latin-1")
            request.body = BodyStream(self)
        elif self._content_length is not None:
            request.content_length = length = int(self._content_length)
            if length > 0:
                request.body = BodyStream(self)
        self._parsing = request
        if request.body is None and self._current is None and not self._queue and not self.shutting_down:
            # Nothing ahead of it: perhaps served in callbacks, without waking the coroutine.
            self._current = request
            if self._start(request):
                return
            self._current = None
        self._queue.append(request)
        if len(self._queue) > MAX_QUEUED:
            self._pause_reading()
        self._wake()

    def on_body(self, body: bytes) -> None:
        """Bytes of the body of the request being parsed."""
        parsing = self._parsing
        if parsing is None or parsing.body is None:
            return
        stream = parsing.body
        if self._body_timer is not None:
            self._body_last = self._loop.time()
        if stream.discard:
            return
        stream.feed(body)
        self._unread += len(body)
        if self._unread > READ_BUFFER and not self._reading_paused:
            self._pause_reading()

    def on_message_complete(self) -> None:
        """The request (with its body) is whole."""
        self._methods.completions += 1
        parsing, self._parsing = self._parsing, None
        if parsing is not None and parsing.body is not None:
            parsing.body.feed_eof()
            if parsing is self._current:
                self._stop_body_timer()

    # --- flow control --------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
            # The client cannot send: its body is not timed meanwhile.
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

    def _resume_reading(self) -> None:
        if self._transport is not None and self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()
            current = self._current
            if current is not None and current.body is not None and not current.body.complete:
                self._time_body()

    # --- timers --------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._limits.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._transport is None or not self._in_head or self._current is not None or self._queue:
            return
        logger.info(
            "closed a connection from %s: its request headers were not complete within %gs (server.header_timeout)",
            self._remote or "a client",
            self._limits.header_timeout,
        )
        self._refuse_head(RequestTimeout(f"the request headers did not arrive within {self._limits.header_timeout:g}s"))

    def _go_idle(self) -> None:
        """No request under way: the keep-alive time limit runs (or the header one, for a head begun)."""
        if self._in_head:
            if self._head_timer is None:
                self._arm_head_timer()
            return
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_at(self._idle_since + self._limits.keepalive_timeout, self._idle_end)

    def _idle_end(self) -> None:
        # One timer for the connection's idle spells: armed when it goes idle without one, it looks at the
        # state when it fires, rather than being cancelled and made again for every request.
        self._idle_timer = None
        if self._transport is None or self._current is not None or self._queue or self._in_head:
            return  # busy: the next idle spell arms it again
        deadline = self._idle_since + self._limits.keepalive_timeout
        if self._loop.time() < deadline:
            self._idle_timer = self._loop.call_at(deadline, self._idle_end)
            return
        self.close()

    def _time_body(self) -> None:
        """The body of the request being served is owed: its time limit runs while the proxy reads."""
        self._body_last = self._loop.time()
        if not self._reading_paused and self._body_timer is None:
            self._body_timer = self._loop.call_at(self._body_last + self._limits.body_timeout, self._body_deadline)

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_deadline(self) -> None:
        self._body_timer = None
        request = self._current
        if request is None or request.body is None or request.body.complete or self._transport is None:
            return
        deadline = self._body_last + self._limits.body_timeout
        if self._loop.time() < deadline:
            self._body_timer = self._loop.call_at(deadline, self._body_deadline)  # bytes arrived since
            return
        logger.info(
            "closed a connection from %s: its request body stalled for %gs (server.body_timeout)%s",
            self._remote or "a client",
            self._limits.body_timeout,
            "" if request.started else "; answered 408",
        )
        request.body_timed_out = True
        if request.started:
            self.abort()  # the answer is cut short anyway: nothing left to flush
        else:
            self.write(self._manager.body_timeout_answer)
            self.close()
        if self._task is not None:
            self._task.cancel()  # the handler still reading the body ends now (its access line says 408)

    # --- serving -------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._serve())
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _serve(self) -> None:
        """Serve the connection's requests in order until it closes."""
        queue = self._queue
        while self._transport is not None:
            resumed = self._resumed
            if resumed is not None and resumed.pending is not None:
                # A request taken on in callbacks needs waiting for something: it goes on here.
                self._resumed = None
                item, pending, resumed.pending = resumed, resumed.pending, None
                work = pending.resume()
            elif self._current is not None or not queue:
                if self._current is None:  # else a request is under way in callbacks: wait for it
                    if self.shutting_down or self._input_done:
                        self.close()
                        return
                    self._go_idle()
                self._waiter = self._loop.create_future()
                await self._waiter
                continue
            else:
                queued = queue.popleft()
                if self._reading_paused and len(queue) <= MAX_QUEUED and self._unread <= READ_BUFFER // 2:
                    self._resume_reading()
                if isinstance(queued, ProxyError):
                    self._answer_refusal(queued)
                    return
                item = queued
                work = self._handler(item)
            self._current = item
            body = item.body
            if body is not None and not body.complete:
                self._time_body()
            try:
                await work
            except ProxyError:
                self.abort()  # an answer under way that cannot be completed honestly
                return
            except Exception:
                logger.exception("tokenproxy failed to handle a request from %s", self._remote or "a client")
                if item.started:
                    self.abort()
                else:
                    item.answer_error(ProxyError("tokenproxy failed to handle the request"), close=True)
                return
            finally:
                self._current = None
                self._stop_body_timer()
            if body is not None and not body.at_eof() and not item.close:
                # The rest of a body nobody read (an upstream that answered early, a refusal): read and
                # dropped, so the connection can carry the next request; a stall has body_timeout.
                self._current = item
                self._time_body()
                try:
                    await body.skip()
                except RequestPayloadError:
                    item.close = True
                finally:
                    self._current = None
                    self._stop_body_timer()
            if item.close or self.shutting_down:
                self.close()
                return

    def _answer_refusal(self, error: ProxyError) -> None:
        """Answer a refused head and close: what the client still sends is read and discarded briefly."""
        transport = self._transport
        if transport is None:
            return
        self._input_done = True
        transport.write(self._manager.timeout_answer if isinstance(error, RequestTimeout) else raw_answer(error))
        if transport.can_write_eof():
            transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._linger = self._loop.call_later(REFUSAL_LINGER, transport.abort)

    # --- shutdown ------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Whether no request is under way or waiting."""
        return self._current is None and not self._queue

    async def finish(self, timeout: float) -> None:
        """Let the request under way finish (for up to `timeout` seconds), then close."""
        self.shutting_down = True
        current = self._current
        if (
            current is not None
            and current.pending is not None
            and self._resumed is None
            and self._transport is not None
        ):
            over = self._quick_over = self._loop.create_future()
            done, _ = await asyncio.wait((over,), timeout=timeout)
            if not done:
                self.abort()  # connection_lost abandons it
                return
        task = self._task
        if task is not None and not task.done():
            if self._waiter is not None:
                self._wake()
            done, _ = await asyncio.wait((task,), timeout=timeout)
            if not done:
                task.cancel()
                await asyncio.wait((task,))
        self.close()


class ProxyServer(Admission):
    """The proxy port's protocol factory: a `ClientConnection` per admitted connection, a refusal when full.

    State owned by the event loop (only touched in its callbacks): the open
    connections and their count, and the transports being refused.
    """

    def __init__(self, handler: Handler, *, limits: ServerLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.handler = handler
        self.start_admission(limits)
        self.loop = loop
        self.connections: set[ClientConnection] = set()
        # The most a head may take before it is refused whole (llhttp has no limit of its own).
        self.head_limit = limits.max_request_line + 64 + limits.max_headers * (limits.max_header_size + 4)
        # What a new connection starts with when it is not a request handler at once (CONNECT: connect.py).
        self.first_protocol: FirstProtocol | None = None

    def __call__(self) -> asyncio.Protocol:
        """The protocol for one new connection: a client connection, or a refusal when full."""
        if not self.admit():
            return Refusal(self)
        if self.first_protocol is not None:
            return self.first_protocol.protocol(self)
        return ClientConnection(self)

    def make_connection(self, tunnel: str | None = None) -> ClientConnection:
        """A client connection for a connection admitted already (it gives the place back when lost)."""
        return ClientConnection(self, tunnel)

    def pre_shutdown(self) -> None:
        """Stop what is idle: connections being refused, tunnels being opened, kept-alive connections."""
        self.stop_refusing()
        if self.first_protocol is not None:
            self.first_protocol.close()
        for connection in list(self.connections):
            if connection.idle:
                connection.shutting_down = True
                connection.close()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Let the requests under way finish for up to `timeout` seconds, then close every connection."""
        connections = list(self.connections)
        if connections:
            await asyncio.gather(*(connection.finish(timeout or 0.0) for connection in connections))
        self.connections.clear()


class ProxyRunner(web.AppRunner):
    """An AppRunner for the proxy port: the app owns the lifecycle (cleanup contexts, shutdown hooks); every
    request goes to the handler `handler` returns once the app has started, through a `ProxyServer`."""

    def __init__(
        self,
        app: web.Application,
        *,
        limits: ServerLimits,
        handler: Callable[[], Handler],
        first_protocol: Callable[[], FirstProtocol] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits
        self._handler = handler
        self._first_protocol = first_protocol

    async def _make_server(self) -> web.Server:
        await super()._make_server()  # starts the app; aiohttp's own server is not used
        server = ProxyServer(self._handler(), limits=self._limits, loop=asyncio.get_running_loop())
        if self._first_protocol is not None:
            server.first_protocol = self._first_protocol()
        return cast(web.Server, server)

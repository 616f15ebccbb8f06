"""One connection of the fast upstream client: a request written, its answer parsed by llhttp as it arrives.

Owns: `Connection`, the asyncio protocol on one socket to the upstream, with
the state of the one exchange under way (the answer's head being parsed, its
body being fed to a FastAnswer, the read timer, the upload's flow control),
and what httptools leaves to a client: an answer to HEAD ends with its head,
interim 1xx answers are skipped, a body without length or chunking ends
with a clean close, any byte after the whole answer drops the connection.
It knows its pool only as a `Home` (the pool, in fast_client.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Protocol, cast

from aiohttp.web_protocol import RequestPayloadError
from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from ..core.causes import cause_in_words
from ..core.errors import BadRequest, ProxyError, UpstreamTimeout, UpstreamUnreachable
from .fast_answer import FastAnswer
from .model import HOP_BY_HOP, PLAIN_CONNECTION, AnswerSink, Discard, Outgoing, Upstream

# Connection events (closed, and why) at debug, behind a level check at each event, never per request.
logger = logging.getLogger("tokenproxy.upstream")


class Details:
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


# Limits on the upstream's answer head, as aiohttp's client parser set them: a status line or one header
# (name and value) at most this long, at most this many headers, and so at most this many head bytes.
MAX_LINE = 8190
MAX_HEADERS = 128
MAX_HEAD_BYTES = (MAX_HEADERS + 1) * (MAX_LINE + 4)

# Where a connection's exchange is.
_IDLE = 0  # no request under way: any byte from the upstream is a fault
_HEAD = 1  # a request sent (or being sent), its answer's head not yet complete (1xx interim ones skipped)
_BODY = 2  # the answer handed over, its body arriving
_DONE = 3  # the whole answer is in: any further byte is a fault
_BROKEN = 4  # failed: the error is delivered, the connection is closing

# The answer headers never relayed to the client (the proxy writes the framing ones itself), and their lengths.
_NOT_RELAYED = frozenset(name.encode() for name in HOP_BY_HOP | {"content-length"})
_NOT_RELAYED_SIZES = frozenset(len(name) for name in _NOT_RELAYED)

# The usual Connection values as sent, and whether each says close.
_PLAIN_CLOSE = {
    spelling: value == b"close"
    for value in PLAIN_CONNECTION
    for spelling in (value, value.capitalize(), value.title(), value.upper())
}

# A head this short cannot hold more than MAX_HEADERS headers ("a:" and CRLF at least) nor a line over MAX_LINE.
_SMALL_HEAD = min(4 * MAX_HEADERS, MAX_LINE)

# Where the headers of a trailer section go: nowhere.
_DISCARD = Discard()

# The answers whose head ends them: no body follows whatever their framing headers say (RFC 9112 §6.3).
_NO_BODY = frozenset({204, 304})


class Home(Protocol):
    """What a connection needs from the pool it belongs to."""

    read_timeout: float
    details: Details
    label: str

    def forget(self, connection: Connection) -> None:
        """The connection is gone or going: free its place."""

    def release(self, connection: Connection, *, reusable: bool) -> None:
        """The exchange is over: keep the connection for the next request, or close it."""


class ClosedUnanswered(Exception):
    """The connection closed before any byte of the answer: the request may be sent again."""


class NotSent(Exception):
    """The connection was already closing when the request was to be written: nothing was sent."""


class _Halt(Exception):
    """Raised from a parser callback to stop llhttp: the callback has already dealt with the connection."""


class _TooLarge(Exception):
    """The answer's head is over the limits: taken as not valid HTTP."""


class Connection(asyncio.Protocol):
    """One connection to the upstream: writes requests, parses answers with llhttp, times out a silent upstream.

    Its state is owned by the event loop's callbacks (data_received,
    connection_lost, the timer) and the one exchange under way at a time;
    `_phase` says which part of the exchange the bytes belong to.
    """

    __slots__ = (
        "_answer",
        "_body_sent",
        "_chunked",
        "_close",
        "_drain_waiter",
        "_dropped",
        "_halted",
        "_head_bytes",
        "_head_parts",
        "_head_request",
        "_last_read",
        "_length",
        "_lenient",
        "_loop",
        "_names_more",
        "_parser",
        "_phase",
        "_pool",
        "_read_timeout",
        "_reading_paused",
        "_reason",
        "_received",
        "_relayed",
        "_sink",
        "_timer",
        "_timing",
        "_waiter",
        "_writer",
        "_writing_paused",
        "close_reason",
        "counted",
        "idle_since",
        "lost",
        "reusable",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: Home) -> None:
        self._loop = loop
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.close_reason: str | None = None  # why it was closed on our side, for the debug line; first one wins
        self.counted = True  # holds one of the pool's places until it is lost
        self.reusable = True
        self.lost = False
        self.idle_since = 0.0
        self._parser: HttpResponseParser | None = None  # one per connection; a fresh one after a HEAD
        self._phase = _IDLE
        self._head_request = False  # the request under way is a HEAD: its answer ends with its head
        self._waiter: asyncio.Future[FastAnswer] | None = None
        self._sink: AnswerSink | None = None  # instead of the waiter: told in callbacks (the forwarder's quick path)
        self._answer: FastAnswer | None = None
        # The answer's head as llhttp hands it over: the reason phrase, the headers to relay and the others, its
        # Content-Length, Transfer-Encoding: chunked, Connection: close, and a Connection header naming more.
        self._reason = b""
        self._relayed: list[tuple[bytes, bytes]] = []
        self._dropped: list[tuple[bytes, bytes]] = []
        self._length: int | None = None
        self._chunked = False
        self._close = False
        self._names_more = False
        self._head_bytes = 0
        self._head_parts: list[bytes] = []  # the bytes of the answer until its head is complete
        self._lenient = False  # control characters in header values are let through (see _refused)
        self._halted = False
        self._received = False
        self._writer: asyncio.Task[None] | None = None
        self._body_sent = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timing = False  # an exchange is waiting on the upstream
        self._read_timeout = pool.read_timeout
        self._last_read = 0.0

    @property
    def usable(self) -> bool:
        """Open, and not already closing (the upstream's FIN may be in, its loss not yet reported)."""
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport; small heads leave at once (no Nagle delay)."""
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        """Feed llhttp; the callbacks below hand the answer over and feed its body."""
        phase = self._phase
        if phase != _HEAD and phase != _BODY:
            if phase == _IDLE:
                self._drop("the upstream sent bytes while no request was under way")
            elif phase == _DONE:
                self._drop("the upstream sent bytes after the whole answer")
            return
        self._received = True
        self._last_read = self._loop.time()
        if phase == _HEAD:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(UpstreamUnreachable(self._pool.details.malformed))
                return
            self._head_parts.append(data)
        parser = self._parser
        assert parser is not None
        try:
            parser.feed_data(data)
        except HttpParserUpgrade:
            pass  # after a 101 (not expected from an upstream): its head was the answer, the connection is not reused
        except HttpParserError:
            if not self._halted:
                self._refused()
        if self._sink is not None and self._answer is not None:
            # Told once per read, not per callback: an answer that came whole in this read is complete now.
            sink, self._sink = self._sink, None
            sink.answered(self._answer)

    def _refused(self) -> None:
        """llhttp refused the answer: perhaps only for a control character in a header value, when the head so
        far is read again leniently (the forwarder names the header, and a refresh status is still renewed)."""
        if self._phase == _HEAD and not self._lenient:
            self._lenient = True  # from now on, for this connection
            parser = self._parser = _new_parser(self, lenient_headers=True)
            self._new_head()
            try:
                parser.feed_data(b"".join(self._head_parts))
                return
            except HttpParserUpgrade:
                return
            except HttpParserError:
                if self._halted:
                    return
        self._fail(UpstreamUnreachable(self._pool.details.malformed))

    def eof_received(self) -> bool | None:
        """The upstream closed its side: let the transport close, which ends a body read until close."""
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        """End whatever is under way, then give the place back to the pool."""
        self.lost = True
        self.reusable = False
        self._stop_timer()
        phase = self._phase
        if phase == _HEAD:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                if self._received:
                    waiter.set_exception(UpstreamUnreachable(self._pool.details.broke_off))
                else:
                    waiter.set_exception(ClosedUnanswered())
            self._phase = _BROKEN
        elif phase == _BODY:
            answer = self._answer
            assert answer is not None
            if exc is None and answer.close_delimited:
                self._phase = _DONE
                answer.end()  # a body that runs until the connection closes, ended by a clean close
            else:
                # Cut short; or reset, not closed, which breaks off even a body that runs until the close.
                self._phase = _BROKEN
                answer.fail(UpstreamUnreachable(self._pool.details.broke_off))
        self.transport = None
        drain = self._drain_waiter
        if drain is not None:
            self._drain_waiter = None
            if not drain.done():
                drain.set_exception(ConnectionResetError("the upstream connection was lost"))
        self._pool.forget(self)
        if self._sink is not None:
            if self._answer is not None:
                sink, self._sink = self._sink, None
                sink.answered(self._answer)
            else:
                self._sink_failed(
                    UpstreamUnreachable(self._pool.details.broke_off) if self._received else ClosedUnanswered()
                )
        if logger.isEnabledFor(logging.DEBUG):
            why = self.close_reason
            if why is None:
                why = "the upstream closed it" if exc is None else f"lost: {getattr(exc, 'strerror', None) or 'reset'}"
            logger.debug("upstream connection to %s closed: %s", self._pool.label, why)

    def pause_writing(self) -> None:
        """The upstream is not taking the upload as fast as it comes: `_drain` waits."""
        self._writing_paused = True

    def resume_writing(self) -> None:
        """The upstream caught up with the upload."""
        self._writing_paused = False
        drain = self._drain_waiter
        if drain is not None:
            self._drain_waiter = None
            if not drain.done():
                drain.set_result(None)

    async def _drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("the upstream connection was lost")
        if self._writing_paused:
            drain = self._drain_waiter = self._loop.create_future()
            await drain

    # --- llhttp's callbacks -------------------------------------------------------------------

    def _new_head(self) -> None:
        """Ready for an answer's head: the request's, or the final one after an interim answer."""
        self._reason = b""
        self._relayed = []
        self._dropped = []
        self._length = None
        self._chunked = False
        self._close = False
        self._names_more = False

    def on_message_begin(self) -> None:
        """A message begins: an interim one or the answer; after the answer, a second one is a fault (even one
        that is not whole yet: the connection must not be reused with it half-parsed)."""
        if self._phase != _HEAD:
            self._halt("the upstream sent a second answer to one request")

    def on_status(self, reason: bytes) -> None:
        """The reason phrase (or a piece of it)."""
        self._reason += reason
        if len(self._reason) > MAX_LINE:
            raise _TooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header, whole (httptools joins the pieces); llhttp keeps whitespace after a value (it is relayed)."""
        if len(name) in _NOT_RELAYED_SIZES and (lower := name.lower()) in _NOT_RELAYED:
            if lower == b"content-length":  # in most answers: noted here, without a call
                self._dropped.append((name, value))
                self._length = int(value)  # llhttp has checked it is a number, and the only one
            else:
                self._not_relayed(lower, name, value)
        else:
            self._relayed.append((name, value))

    def _not_relayed(self, lower: bytes, name: bytes, value: bytes) -> None:
        """A header other than Content-Length that never goes to the client (`lower`: its name in lower case): the
        framing ones noted."""
        self._dropped.append((name, value))
        if lower == b"connection":
            close = _PLAIN_CLOSE.get(value)
            if close is None:
                lowered = value.rstrip(b" \t").lower()
                close = any(token.strip(b" \t") == b"close" for token in lowered.split(b","))
                if lowered not in PLAIN_CONNECTION:
                    self._names_more = True  # it names more headers to leave out: the forwarder sorts them
            self._close = close
        elif lower == b"transfer-encoding":
            final = value.rpartition(b",")[2].lstrip(b" \t").lower()  # the last coding decides the framing
            # As llhttp reads it, which decides where the body ends: spaces after the coding are ignored, a tab
            # is not. RFC 9110 takes a tab for whitespace too: an answer chunked by its reading and not by
            # llhttp's would be read until the close, so it is refused rather than relayed wrong.
            self._chunked = final.rstrip(b" ") == b"chunked"
            if not self._chunked and final.rstrip(b" \t") == b"chunked":
                self._halted = True
                self._fail(UpstreamUnreachable(self._pool.details.malformed))
                raise _Halt()

    def _check_head(self) -> None:
        """Raise _TooLarge when the head has too many headers, or one over MAX_LINE."""
        if len(self._relayed) + len(self._dropped) > MAX_HEADERS:
            raise _TooLarge()
        for headers in (self._relayed, self._dropped):
            for name, value in headers:
                if len(name) + len(value) > MAX_LINE:
                    raise _TooLarge()

    def on_headers_complete(self) -> None:
        """The answer's head is complete: hand it over (an interim 1xx one is skipped)."""
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if status < 200 and status != 101:
            self._new_head()
            return  # 100 Continue, 103 Early Hints: the final answer follows; llhttp completes this one itself
        if self._head_bytes > _SMALL_HEAD:
            self._check_head()
        length = self._length
        chunked = self._chunked
        self._head_parts.clear()
        answer = FastAnswer(
            status, self._reason, self._relayed, self._dropped, length, self, self._names_more, not self._lenient
        )
        self._relayed = self._dropped = _DISCARD  # trailers after a chunked body: not relayed
        self._answer = answer
        keep_alive = parser.should_keep_alive()
        if self._head_request or status in _NO_BODY or status == 101:
            if self._head_request:
                # llhttp would wait for the body the head announces: a fresh parser for the next exchange,
                # and any byte after this head is a fault. llhttp reads a HEAD answer without framing as a
                # body until close, so the answer's own words decide whether the connection stays.
                self._parser = None
                if length is None and not chunked:
                    keep_alive = parser.get_http_version() == "1.1" and not self._close
            self._phase = _DONE
            answer.end()
        else:
            self._phase = _BODY
            answer.close_delimited = length is None and not chunked
        if status == 101 or not keep_alive:
            self.reusable = False
            self.close_because("the upstream's answer said Connection: close, or its body runs until the close")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)
        if not self._timing:
            self._start_timer()  # answered while the upload goes on: the upstream is now timed

    def on_body(self, body: bytes) -> None:
        """A piece of the body, handed on as llhttp gives it."""
        if self._phase != _BODY:
            self._halt("the upstream sent a body with its answer to a HEAD request")
        answer = self._answer
        assert answer is not None
        answer.feed(body)

    def on_message_complete(self) -> None:
        """The message is complete: an interim one (skipped), or the answer's body."""
        if self._phase == _BODY:
            self._phase = _DONE
            answer = self._answer
            assert answer is not None
            answer.end()

    def _halt(self, reason: str) -> None:
        self._halted = True
        self._drop(reason)
        raise _Halt()

    # --- flow control of the answer (FastAnswer's _Source) ---------------------------------------

    def pause_body(self) -> None:
        """The reader is behind: stop reading from the upstream (and stop timing it)."""
        self._reading_paused = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_body(self) -> None:
        """The reader caught up: read again, and time the upstream from now, not from before the pause."""
        self._reading_paused = False
        self._last_read = self._loop.time()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def hand_back(self, answer: FastAnswer, *, whole: bool) -> None:
        """The answer is done with: the connection goes back to the pool, reused when `whole` and clean."""
        if whole and self._phase == _DONE and self._writer is None and not self._reading_paused:
            # finish()'s usual case, without a call: the whole answer read, the body sent, nothing paused.
            self._timing = False
            self._phase = _IDLE
            self._answer = self._waiter = self._sink = None
            self._pool.release(self, reusable=self._body_sent and self.reusable and not self.lost)
            return
        reusable = self.finish() and whole
        if reusable and self._reading_paused:
            self.resume_body()
        self._pool.release(self, reusable=reusable)

    # --- one exchange -------------------------------------------------------------------------

    def exchange(self, head: bytes, request: Outgoing) -> asyncio.Future[FastAnswer]:
        """Send one request (its head, with the body when it is held whole); the future of its answer's head.

        Raises NotSent, before writing anything, when the connection is already closing.
        """
        waiter: asyncio.Future[FastAnswer] = self._loop.create_future()
        self._begin(head, request)
        self._waiter = waiter
        return waiter

    def exchange_quickly(self, head: bytes, request: Outgoing, sink: AnswerSink) -> None:
        """Send one request whose body is held whole (or absent); `sink` is told of its answer in callbacks.

        After the read that completes the answer's head, `sink.answered` gets
        the answer (whole, when it came with its head); or `sink.failed` the
        error before it, the connection already given back. Raises NotSent,
        before writing anything, when the connection is already closing.
        """
        self._begin(head, request)
        self._sink = sink

    def abandon(self) -> None:
        """The quick exchange's requester left before its answer: the connection is not reused."""
        if self._sink is not None:
            self._sink = None
            self.reusable = False
            self.close_because("the client left before the answer")
            self.finish()
            self._pool.release(self, reusable=False)

    def _begin(self, head: bytes, request: Outgoing) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise NotSent()
        if self._parser is None:
            self._parser = _new_parser(self, lenient_headers=self._lenient)
        self._phase = _HEAD
        # _new_head() and, below, _start_timer(), written out: this runs for every request.
        self._reason = b""
        self._relayed = []
        self._dropped = []
        self._length = None
        self._chunked = self._close = self._names_more = False
        self._head_request = request.method == "HEAD"
        self._head_bytes = 0
        self._received = False
        body = request.body
        transport.write(head)
        if body.stream is None:
            self._body_sent = self._timing = True
            self._last_read = now = self._loop.time()
            if self._timer is None:
                self._timer = self._loop.call_at(now + self._read_timeout, self._on_timer)
        else:
            self._body_sent = False
            self._writer = self._loop.create_task(self._send_stream(body.stream, chunked=body.length is None))

    async def _send_stream(self, stream: AsyncIterator[bytes], *, chunked: bool) -> None:
        """Send a body that is not held in memory, at the pace the upstream takes it."""
        try:
            async for chunk in stream:
                transport = self.transport
                if transport is None:
                    return  # lost: connection_lost has told the reader
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    await self._drain()
            if self.transport is not None:
                if chunked:
                    self.transport.write(b"0\r\n\r\n")
                self._body_sent = True
                self._start_timer()
        except RequestPayloadError:
            # The client's body broke off malformed: the upstream must not take it as complete.
            self._fail(BadRequest("the request body was malformed"))
        except ProxyError as error:
            self._fail(error)  # the client's body failed in the proxy's own words (a limit, a timeout)
        except ConnectionError:
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
        complete = self._phase == _DONE
        if self._phase != _BROKEN:
            self._phase = _IDLE
        self._answer = None
        self._waiter = None
        self._sink = None
        return complete and self._body_sent and self.reusable and not self.lost

    # --- failures and timing ------------------------------------------------------------------

    def _fail(self, error: ProxyError) -> None:
        """Hand `error` to whoever waits on this exchange, and close the connection."""
        phase = self._phase
        if phase == _HEAD:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
            self._phase = _BROKEN
        elif phase == _BODY:
            answer = self._answer
            assert answer is not None
            answer.fail(error)
            self._phase = _BROKEN
        self._drop(error.detail)
        if self._sink is not None and self._answer is None:
            self._sink_failed(error)

    def _sink_failed(self, error: Exception) -> None:
        """The quick exchange failed before its answer: the connection goes, then its sink is told why."""
        sink, self._sink = self._sink, None
        assert sink is not None
        self.finish()
        self._pool.release(self, reusable=False)
        if isinstance(error, ClosedUnanswered):
            sink.failed(UpstreamUnreachable(self._pool.details.closed_unanswered), resendable=True)
        else:
            sink.failed(error if isinstance(error, ProxyError) else UpstreamUnreachable(self._pool.details.broke_off))

    def close_because(self, reason: str) -> None:
        """Note why this connection is (about to be) closed on our side, unless a reason is noted already."""
        if self.close_reason is None:
            self.close_reason = reason

    def _drop(self, reason: str) -> None:
        self.reusable = False
        self.close_because(reason)
        shut(self.transport)

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
        if not self._timing or self._phase not in (_HEAD, _BODY):
            return  # idle, or the whole answer is in: the next exchange re-arms it
        now = self._loop.time()
        if self._reading_paused:
            self._last_read = now  # our reader is slow, not the upstream
        due = self._last_read + self._read_timeout
        if now < due:
            self._timer = self._loop.call_at(due, self._on_timer)
            return
        self._fail(UpstreamTimeout(self._pool.details.read_timeout))


def _new_parser(connection: Connection, *, lenient_headers: bool) -> HttpResponseParser:
    parser = HttpResponseParser(connection)
    # The leniencies aiohttp's client parser has always had, so the same upstreams are understood: a bare
    # LF ends a line, spaces may follow a chunk size, and (`lenient_headers`, after a head was refused
    # without it) control characters in header values reach the forwarder, which refuses to relay them,
    # naming where. Without it, llhttp refuses them itself: the forwarder has nothing to look for.
    parser.set_dangerous_leniencies(
        lenient_headers=lenient_headers, lenient_optional_cr_before_lf=True, lenient_spaces_after_chunk_size=True
    )
    return parser


def shut(transport: asyncio.BaseTransport | None) -> None:
    """Close a transport; at once (reset) if it still holds unsent bytes the upstream is not taking."""
    if transport is None or transport.is_closing():
        return
    if isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()

"""Reaching the upstream through aiohttp's ClientSession (`upstream.client = "session"`).

Owns: the one boundary where aiohttp's client errors become UpstreamUnreachable
/ UpstreamTimeout / BadRequest, the session options a proxy needs (no
cookie jar, no automatic headers, no decompression, no redirects followed),
and a connection that drops itself when bytes arrive that no request asked
for (aiohttp's pool would hand them to the next request as its answer).
The fallback for `fast_client.py`, and the reference it is tested against.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import AsyncGenerator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
from aiohttp import hdrs
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import RawResponseMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from ..core.causes import cause_in_words
from ..core.errors import BadRequest, UpstreamTimeout, UpstreamUnreachable
from .model import AnswerSink, Outgoing, RawHeaders, Upstream, as_text


@contextmanager
def upstream_errors(upstream: Upstream, *, connect_timeout: float, read_timeout: float) -> Iterator[None]:
    """The one place where aiohttp's client errors become our answers, naming the origin and the cause."""
    try:
        yield
    except asyncio.TimeoutError as exc:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            raise UpstreamTimeout(
                f"the upstream {upstream.origin} could not be reached: timed out after {connect_timeout:g} s "
                "(upstream.connect_timeout)"
            ) from None
        raise UpstreamTimeout(
            f"the upstream {upstream.origin} did not answer: timed out after {read_timeout:g} s (upstream.read_timeout)"
        ) from None
    except aiohttp.ClientError as exc:
        if _caused_by(exc, RequestPayloadError):
            # The client's streamed body broke off malformed while it was being sent on.
            raise BadRequest("the request body was malformed") from None
        raise UpstreamUnreachable(f"the upstream {upstream.origin} {_what_failed(exc, upstream.host)}") from None


def _what_failed(exc: aiohttp.ClientError, host: str) -> str:
    """What went wrong with the upstream, in words that follow its name."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "closed the connection without answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "closed the connection before its answer was complete"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "sent an answer that is not valid HTTP"
    cause = cause_in_words(exc, host=host) or f"the connection failed ({type(exc).__name__})"
    return f"could not be reached: {cause}"


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # a short, bounded walk up the cause chain
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def _fail_body_when_closed(upstream: aiohttp.ClientResponse) -> Iterator[None]:
    """Fail the body's reads if the upstream connection closes before the body ended.

    aiohttp 3.14's client (C parser) closes the connection on a malformed
    chunk but never ends the body's reader, which would hang the relay.
    """
    connection = upstream.connection
    protocol = connection.protocol if connection is not None else None
    closed = protocol.closed if protocol is not None else None
    if closed is None:
        yield
        return

    def lost(future: asyncio.Future[None]) -> None:
        if not future.cancelled():
            future.exception()
        if not upstream.content.is_eof():
            upstream.content.set_exception(aiohttp.ClientPayloadError("the upstream connection closed mid-body"))

    closed.add_done_callback(lost)
    try:
        yield
    finally:
        closed.remove_done_callback(lost)


# Headers aiohttp's client would add on its own; a proxy sends only what the client sent.
_NO_AUTO_HEADERS: CIMultiDict[None] = CIMultiDict(
    (name, None) for name in sorted(("Accept", "Accept-Encoding", "Content-Type", "User-Agent"))
)


class PassThroughRequest(aiohttp.ClientRequest):
    """A client request that adds none of aiohttp's default headers (Accept, User-Agent, ...).

    Same effect as `skip_auto_headers`, without building that set per request.
    """

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        """Add nothing; remember what payloads must not add either."""
        self._skip_auto_headers = _NO_AUTO_HEADERS


class _InStepHandler(ResponseHandler):
    """aiohttp's connection protocol, closing its connection when bytes arrive that no request asked for.

    aiohttp's pool reuses an idle connection whatever arrived on it meanwhile:
    a stray answer sent after a complete one would be read as the next
    request's answer, and every later request on that connection would get the
    answer to the one before. Here a connection is awaiting an answer from the
    moment a request is set up on it (`set_response_params`, called by the
    client before it writes the request) until the final answer's body is
    complete; a byte that arrives at any other time closes it, unparsed, so the
    pool opens a new one (as the fast client does). A second answer parsed
    from the same read as the end of the first closes it too, never queued;
    a partial one is discarded with its parser (each request gets a fresh one).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._awaiting = False  # a request has been set up and its final answer's body is not complete
        self._final: StreamReader | None = None  # the body of the final answer to that request, once its head is in

    def set_response_params(self, **params: Any) -> None:
        """A request is about to be written: its answer is awaited from now on."""
        self._awaiting = True
        self._final = None
        super().set_response_params(**params)

    def feed_data(self, data: tuple[RawResponseMessage, StreamReader], size: int = 0) -> None:
        """An answer's head was parsed: note the final one (not 1xx), and refuse any answer after it."""
        if self._final is not None:
            # Parsed from the same read as the end of the final answer: never queued for the next request.
            self._drop()
            return
        code = data[0].code
        if not (100 <= code < 200 and code != 101):
            self._final = data[1]
        super().feed_data(data, size)

    def data_received(self, data: bytes) -> None:
        """Parse bytes that belong to the awaited answer; close the connection on any other."""
        if data and not self._in_step():
            self._drop()
            return
        super().data_received(data)

    def _drop(self) -> None:
        self.force_close()
        self.close()

    def _in_step(self) -> bool:
        if not self._awaiting:
            return False
        final = self._final
        if final is not None and final.is_eof():
            self._awaiting = False
            return False
        return True


class _InStepConnector(aiohttp.TCPConnector):
    """aiohttp's TCP connector, whose connections are `_InStepHandler`s."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not isinstance(getattr(self, "_factory", None), functools.partial):
            # The one private name this relies on; the tests pin the behaviour too.
            raise RuntimeError("aiohttp's TCPConnector no longer has the protocol factory tokenproxy replaces")
        handler: type[ResponseHandler] = _InStepHandler
        self._factory = functools.partial(handler, loop=asyncio.get_running_loop())


class SessionAnswer:
    """An UpstreamAnswer over aiohttp's ClientResponse."""

    __slots__ = ("_client", "_response", "_upstream")

    def __init__(self, response: aiohttp.ClientResponse, upstream: Upstream, client: SessionClient) -> None:
        self._response = response
        self._upstream = upstream
        self._client = client

    @property
    def status(self) -> int:
        """The status code."""
        return self._response.status

    @property
    def reason(self) -> str:
        """The reason phrase."""
        return self._response.reason or ""

    @property
    def reason_bytes(self) -> bytes:
        """The reason phrase as the upstream sent it."""
        return self.reason.encode("utf-8", "surrogateescape")

    @property
    def values_checked(self) -> bool:
        """Not known: the forwarder looks for control characters itself."""
        return False

    @property
    def relayed_headers(self) -> None:
        """Not sorted out while parsing: the forwarder works them out from `raw_headers`."""
        return None

    @property
    def raw_headers(self) -> RawHeaders:
        """The headers as received."""
        return self._response.raw_headers

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The headers by name."""
        return self._response.headers

    @property
    def content_length(self) -> int | None:
        """The announced body length, if any."""
        return self._response.content_length

    def at_eof(self) -> bool:
        """True once the whole body has been read."""
        return self._response.content.at_eof()

    async def read(self, limit: int) -> bytes:
        """Up to `limit` body bytes; b"" at the end."""
        with self._client.errors(self._upstream), _fail_body_when_closed(self._response):
            return await self._response.content.read(limit)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives."""
        with self._client.errors(self._upstream), _fail_body_when_closed(self._response):
            async for chunk in self._response.content.iter_any():
                yield chunk

    def release(self) -> None:
        """Back to the pool (aiohttp closes it instead if the body was not read to the end)."""
        if not self._response.closed and not self._response.content.at_eof():
            self._response.close()
        self._response.release()

    def close(self) -> None:
        """Drop the connection."""
        self._response.close()


class SessionClient:
    """An UpstreamClient on one shared aiohttp ClientSession with a keep-alive pool."""

    def __init__(
        self, *, max_connections: int, connect_timeout: float, read_timeout: float, tls: ssl.SSLContext | bool
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._session = aiohttp.ClientSession(
            connector=_InStepConnector(limit=max_connections, limit_per_host=max_connections, ssl=tls),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            request_class=PassThroughRequest,
        )

    def use(self, upstream: Upstream) -> None:
        """Nothing to do: aiohttp pools per host, and closes idle connections on its own."""

    def start(self, request: Outgoing, authorization: str, sink: AnswerSink) -> None:
        """Never: every request through the session is awaited (`send`)."""
        return None

    async def send(self, request: Outgoing, authorization: str) -> SessionAnswer:
        """Send `request`; its errors come back as ProxyError."""
        headers = CIMultiDict(as_text(request.headers))
        headers[hdrs.AUTHORIZATION] = authorization
        body = request.body
        if body.length is not None:
            headers[hdrs.CONTENT_LENGTH] = str(body.length)
        data = body.data if body.data else body.stream
        url = request.upstream.url_for(request.target)
        with self.errors(request.upstream):
            response = await self._session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False
            )
        return SessionAnswer(response, request.upstream, self)

    def errors(self, upstream: Upstream) -> contextlib.AbstractContextManager[None]:
        """`upstream_errors` for `upstream`, with this client's timeouts."""
        return upstream_errors(upstream, connect_timeout=self._connect_timeout, read_timeout=self._read_timeout)

    async def close(self) -> None:
        """Close the session and its pool."""
        await self._session.close()

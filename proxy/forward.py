"""One request's journey: to the upstream with a bearer, 401 → renew → resend, the answer streamed back.

Owns: building the upstream request, the single boundary where aiohttp's
client errors become UpstreamUnreachable / UpstreamTimeout, the resend after
a refresh status, and relaying the response chunk by chunk. Knows nothing
of which grant is used; asks the TokenManager for tokens.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict
from yarl import URL

from .body import RequestBody, read_body
from .errors import BadRequest, ProxyError, UpstreamTimeout, UpstreamUnreachable, error_response
from .headers import challenge_error, request_drop_set, request_headers, response_headers
from .log import access_line
from .metrics import Metrics
from .tokens import Token, TokenManager

logger = logging.getLogger("tokenproxy.forward")

# Our own answers that count as queue rejections in the metrics.
_QUEUE_CODES = frozenset({"queue_full", "queue_timeout", "shutting_down"})

# The access-log status of a request whose client disconnected before its answer.
CLIENT_CLOSED = 499

# Answers with a Content-Length up to this size send their head together with their body.
SMALL_BODY = 64 * 1024

# A refresh-status answer is kept (to hand back if the refresh fails) only up to this size.
REJECTION_BODY_LIMIT = 64 * 1024

# A Host header that can name the proxy in a rewritten Location: host or [v6], optional port.
_AUTHORITY = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class Upstream:
    """The upstream's origin and base path, split once at start-up."""

    scheme: str
    host: str
    port: int
    base_path: str  # without a trailing slash

    @classmethod
    def parse(cls, url: str) -> Upstream:
        """Split a validated `upstream.url`."""
        parsed = URL(url)
        assert parsed.host is not None and parsed.port is not None
        return cls(parsed.scheme, parsed.raw_host or parsed.host, parsed.port, parsed.raw_path.rstrip("/"))

    def origin_form_of(self, target: str) -> str | None:
        """The path and query of an absolute-form target naming this upstream's host (RFC 9112 §3.2.2).

        `http://` and `https://` both count, so a tool that can only be given an
        HTTP proxy works; any other host, or an explicit other port, gives None.
        """
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            return None
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=len(rest))
        authority, remainder = rest[:cut], rest[cut:]
        if "@" in authority:
            return None
        host, _, port = authority.rpartition(":") if not authority.endswith("]") else (authority, "", "")
        if not host:
            host, port = authority, ""
        if host.lower().strip("[]") != self.host.lower().strip("[]"):
            return None
        if port and port != str(self.port) and port != ("443" if scheme.lower() == "https" else "80"):
            return None
        return remainder if remainder.startswith("/") else "/" + remainder

    def client_location(self, location: str, client_origin: str) -> str | None:
        """`location` re-pointed at `client_origin`, when it names this upstream's origin and base path.

        For `upstream.rewrite_redirects`. Any other Location (another host,
        another scheme or port, userinfo, outside the base path, or relative,
        which already resolves against the proxy) gives None: left as it is.
        """
        scheme, sep, rest = location.partition("://")
        if not sep or scheme.lower() != self.scheme:
            return None
        cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i != -1), default=len(rest))
        authority, remainder = rest[:cut].lower(), rest[cut:]
        host = (f"[{self.host}]" if ":" in self.host else self.host).lower()
        default_port = 443 if self.scheme == "https" else 80
        if authority != f"{host}:{self.port}" and not (authority == host and self.port == default_port):
            return None
        if not remainder.startswith(self.base_path):
            return None
        remainder = remainder[len(self.base_path) :]
        if remainder[:1] not in ("", "/", "?", "#"):
            return None  # /v1 is the base, /v10 is not under it
        return client_origin + (remainder if remainder.startswith("/") else "/" + remainder)

    def url_for(self, target: str) -> URL:
        """The upstream URL for an origin-form request target, path and query byte for byte."""
        path, mark, query = target.partition("?")
        if mark and not query:
            # yarl cannot hold an empty query; an encoded path may end in the bare `?`.
            path += "?"
        return URL.build(
            scheme=self.scheme,
            host=self.host,
            port=self.port,
            path=self.base_path + path,
            query_string=query,
            encoded=True,
        )


def rewritten_location(upstream: Upstream, location: str, request: web.BaseRequest) -> str | None:
    """For `upstream.rewrite_redirects`: a Location naming the upstream's own origin, re-pointed at the proxy.

    The proxy's address is the one the client used (its Host header), so a
    client that follows the redirect stays behind the proxy. Without a usable
    Host header, or for any other Location, None: leave it alone.
    """
    if not _AUTHORITY.fullmatch(request.host):
        return None
    return upstream.client_location(location, f"{request.scheme}://{request.host}")


@contextmanager
def upstream_errors() -> Iterator[None]:
    """The one place where aiohttp's client errors become our answers."""
    try:
        yield
    except asyncio.TimeoutError:
        raise UpstreamTimeout("the upstream did not answer within upstream.read_timeout") from None
    except aiohttp.ClientError as exc:
        if _caused_by(exc, RequestPayloadError):
            # The client's streamed body broke off malformed while it was being sent on.
            raise BadRequest("the request body was malformed") from None
        raise UpstreamUnreachable(f"the upstream could not be reached ({type(exc).__name__})") from None


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


class _RelayedResponse(web.StreamResponse):
    """A StreamResponse that adds no Content-Type or Server header the upstream did not send."""

    async def _prepare_headers(self) -> None:
        had_type = hdrs.CONTENT_TYPE in self.headers
        had_server = hdrs.SERVER in self.headers
        await super()._prepare_headers()
        if not had_type:
            self.headers.popall(hdrs.CONTENT_TYPE, None)
        if not had_server:
            self.headers.popall(hdrs.SERVER, None)


class _SizedRelayedResponse(_RelayedResponse):
    """For an answer of known, small length: the head waits for the first body bytes.

    Head and body then leave in one write instead of two; an open-ended
    stream (SSE, no length) keeps its head going out at once.
    """

    _send_headers_immediately = False


class Forwarder:
    """The proxy's request handler. Safe for any number of concurrent requests; holds no per-request state."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: Upstream,
        tokens: TokenManager,
        *,
        refresh_on: frozenset[int],
        replay_limit: int,
        drop_headers: tuple[str, ...] = (),
        rewrite_redirects: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._rewrite_redirects = rewrite_redirects
        self._drop = request_drop_set(drop_headers)
        self._session = session
        self._upstream = upstream
        self._tokens = tokens
        self._refresh_on = refresh_on
        self._replay_limit = replay_limit

    def reconfigure(
        self,
        upstream: Upstream,
        *,
        refresh_on: frozenset[int],
        replay_limit: int,
        drop_headers: tuple[str, ...],
        rewrite_redirects: bool,
    ) -> None:
        """Take reloaded settings; requests already under way finish with what they started with."""
        self._rewrite_redirects = rewrite_redirects
        self._upstream = upstream
        self._refresh_on = refresh_on
        self._replay_limit = replay_limit
        self._drop = request_drop_set(drop_headers)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Forward one client request and relay the answer; never raises for the client to see."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        state = _Journey()
        status = 500
        try:
            response = await self._journey(request, state)
            status = response.status
            return response
        except ProxyError as error:
            status = error.status
            if self._metrics is not None and error.code in _QUEUE_CODES:
                self._metrics.queue_rejected(error.code)
            if state.started_relay:
                raise
            answer = error_response(error)
            if isinstance(error, BadRequest):
                # After a request we refused, its framing can't be trusted: don't read another on this connection.
                answer.force_close()
            return answer
        except asyncio.CancelledError:
            # The client went away (its handler is cancelled): nginx's 499 says so in the log.
            status = CLIENT_CLOSED
            raise
        finally:
            # Once the answer has begun, its status is what the client got, even if it then hung up.
            if state.sent_status is not None:
                status = state.sent_status
            if self._metrics is not None:
                self._metrics.request_done(status)
            access_line(
                request.method,
                request.raw_path.partition("?")[0],
                status,
                loop.time() - started,
                state.resent,
                state.generation,
            )

    async def _journey(self, request: web.BaseRequest, state: _Journey) -> web.StreamResponse:
        if request.method == hdrs.METH_CONNECT:
            raise BadRequest("CONNECT is not supported: tokenproxy is a reverse proxy")
        target = request.raw_path
        if not target.isascii():
            raise BadRequest("the request target must be ASCII; percent-encode other bytes")
        if not target.startswith("/"):
            origin_form = self._upstream.origin_form_of(target)
            if origin_form is None:
                raise BadRequest("the request names another host than the upstream; tokenproxy forwards only there")
            target = origin_form
        url = self._upstream.url_for(target)
        headers = CIMultiDict(request_headers(request.raw_headers, self._drop))
        body = await read_body(request, self._replay_limit)

        token = await self._tokens.get()
        state.generation = token.generation
        upstream = await self._send(request.method, url, headers, body, token)
        prefix = b""
        if upstream.status in self._refresh_on:
            challenge = challenge_error(upstream.headers.getall(hdrs.WWW_AUTHENTICATE, []))
            kept = await self._keep_rejection(upstream) if body.replayable else None
            if isinstance(kept, web.Response):
                renewed = await self._tokens.renew(token, challenge)
                if renewed is None:
                    if self._metrics is not None:
                        self._metrics.rejection_passed_through()
                    return kept
                if self._metrics is not None:
                    self._metrics.resent()
                state.resent = True
                state.generation = renewed.generation
                upstream = await self._send(request.method, url, headers, body, renewed)
            else:
                # Not replayable: the client gets this answer, and its own retry a new token.
                self._tokens.renew_later(token, challenge)
                if self._metrics is not None:
                    self._metrics.rejection_passed_through()
                prefix = kept or b""
        return await self._relay(request, upstream, state, prefix)

    async def _send(
        self, method: str, url: URL, headers: CIMultiDict[str], body: RequestBody, token: Token
    ) -> aiohttp.ClientResponse:
        headers[hdrs.AUTHORIZATION] = token.header
        if body.length is not None:
            headers[hdrs.CONTENT_LENGTH] = str(body.length)
        data = body.data if body.data else body.stream
        with upstream_errors():
            if self._metrics is None:
                return await self._session.request(method, url, headers=headers, data=data, allow_redirects=False)
            started = time.perf_counter()
            response = await self._session.request(method, url, headers=headers, data=data, allow_redirects=False)
            self._metrics.upstream_answered(time.perf_counter() - started)
            return response

    async def _keep_rejection(self, upstream: aiohttp.ClientResponse) -> web.Response | bytes | None:
        """Read and release a small refresh-status answer so it can be handed back unchanged.

        Too large to keep: None when that is known from Content-Length, else
        the bytes already read, to be relayed ahead of the rest.
        """
        if upstream.content_length is not None and upstream.content_length > REJECTION_BODY_LIMIT:
            return None
        buffer = bytearray()
        try:
            with upstream_errors():
                while len(buffer) <= REJECTION_BODY_LIMIT:
                    chunk = await upstream.content.read(REJECTION_BODY_LIMIT + 1 - len(buffer))
                    if not chunk:
                        break
                    buffer += chunk
        except ProxyError:
            upstream.close()
            raise
        if len(buffer) > REJECTION_BODY_LIMIT:
            return bytes(buffer)
        upstream.release()
        headers = CIMultiDict(response_headers(upstream.raw_headers))
        headers.popall(hdrs.CONTENT_LENGTH, None)
        return web.Response(status=upstream.status, reason=upstream.reason, body=bytes(buffer), headers=headers)

    async def _relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, state: _Journey, prefix: bytes = b""
    ) -> web.StreamResponse:
        """Send the upstream's status, headers and body to the client as they arrive."""
        try:
            length = upstream.content_length
            relayed = _SizedRelayedResponse if length is not None and length <= SMALL_BODY else _RelayedResponse
            out = relayed(status=upstream.status, reason=upstream.reason)
            out.headers.extend(response_headers(upstream.raw_headers))
            if self._rewrite_redirects and hdrs.LOCATION in out.headers:
                location = rewritten_location(self._upstream, out.headers[hdrs.LOCATION], request)
                if location is not None:
                    out.headers[hdrs.LOCATION] = location
            state.started_relay = True
            await out.prepare(request)
            state.sent_status = out.status
            if prefix:
                await out.write(prefix)
            try:
                with upstream_errors(), _fail_body_when_closed(upstream):
                    async for chunk in upstream.content.iter_any():
                        await out.write(chunk)
            except ProxyError as error:
                # The answer has begun and cannot be completed honestly: cut the connection.
                logger.warning(
                    "upstream broke off the answer to %s %s: %s",
                    request.method,
                    request.raw_path.partition("?")[0],
                    error.detail,
                )
                upstream.close()
                if request.transport is not None:
                    request.transport.close()
                return out
            await out.write_eof()
            upstream.release()
            return out
        finally:
            # Cancelled (client gone) or failed: drop the connection rather than pool it half-read.
            if not upstream.closed and not upstream.content.at_eof():
                upstream.close()
            upstream.release()


class _Journey:
    """What the access line reports about one request."""

    __slots__ = ("generation", "resent", "sent_status", "started_relay")

    def __init__(self) -> None:
        self.resent = False
        self.generation: int | None = None
        self.started_relay = False
        self.sent_status: int | None = None  # the status line the client received, once sent

"""One request's journey: to the upstream with a bearer, 401 → renew → resend, the answer streamed back.

Owns: turning the client's request into an `Outgoing` one, the resend after
a refresh status, and relaying the answer chunk by chunk. Knows nothing of
which grant is used (asks the TokenManager for tokens) nor of how the
upstream is reached (an UpstreamClient: the fast pool or aiohttp's session).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Awaitable

from yarl import URL

from ..core.errors import BadRequest, ProxyError, UpstreamTimeout, UpstreamUnreachable
from ..core.token import Token
from ..observe import log
from ..observe.metrics import NULL_METRICS, Recorder
from ..observe.ratelimit import LogLimiter
from ..upstream.model import ArrivedAnswer, Outgoing, QuickExchange, Upstream, UpstreamAnswer, UpstreamClient
from .body import NO_BODY, ReplayMemory, bodiless, read_body
from .exchange import Request
from .headers import (
    REQUEST_DROP,
    challenge_error,
    control_character_in_raw,
    forwarded_header_bytes,
    has_control_character,
    response_header_bytes,
)
from .route import Route
from .server import RequestTimeout

# A CONNECT after the first request of its connection (a first one never reaches the server: connect.py).
# curl, requests and httpx all open a new connection for a CONNECT.
CONNECT_LATER = "CONNECT must open its connection: send it on a new connection"

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


def rewritten_location(upstream: Upstream, location: str, request: Request, prefix: str = "") -> str | None:
    """For `upstream.rewrite_redirects`: a Location naming the upstream's own origin, re-pointed at the proxy.

    The proxy's address is the one the client used (its Host header), so a
    client that follows the redirect stays behind the proxy; `prefix` is the
    path a route with strip_prefix took off (put back in front). Without a
    usable Host header, or for any other Location, None: leave it alone.
    """
    if not _AUTHORITY.fullmatch(request.host):
        return None
    return upstream.client_location(location, f"{request.scheme}://{request.host}", prefix)


def refuse_unwritable(request: Request, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """Raise UpstreamUnreachable (502) when the upstream's head holds what no HTTP head may carry.

    A control character in a header value or the reason phrase passes the
    parsers but must not be written into a head (a header injection): the
    upstream's fault, told as such before anything reaches the client. The
    log line names the header, never its value.
    """
    where = control_character_in_raw(reason, headers)
    if where is None:
        return
    logger.warning(
        "upstream answer to %s %s refused: a control character in %s",
        request.method,
        request.target.partition("?")[0],
        where,
    )
    raise UpstreamUnreachable(f"the upstream's answer cannot be relayed: a control character in {where}")


def _log_not_resent(request: Request, status: int, why: str, route: str) -> None:
    """The debug line for a refresh status handed to the client as it is."""
    path = request.target.partition("?")[0]
    logger.debug("not resending %s %s (route %s): %s; the %d is passed on", request.method, path, route, why, status)


# The likely fix when a client sends an absolute-form target (it treats tokenproxy as its HTTP proxy).
_PROXY_HINT = (
    "if the client uses the proxy as HTTP_PROXY, give it the upstream's URL as its base URL, "
    "or point the base URL at the proxy without HTTP_PROXY"
)


def another_host_detail(request: Request, target: str) -> str:
    """The 400's detail for an absolute-form target naming another host than the upstream, with the likely cause.

    A target naming the proxy's own address means the client has the proxy
    both as its HTTP_PROXY and as its base URL. Called on that failure only.
    """
    if _names_this_proxy(request, target):
        return (
            "the request names the proxy itself as its host (an absolute-form target): the client likely has "
            f"the proxy both as its HTTP_PROXY and as its base URL; {_PROXY_HINT}"
        )
    return f"the request names another host than the upstream; tokenproxy forwards only there; {_PROXY_HINT}"


def _names_this_proxy(request: Request, target: str) -> bool:
    """True when an absolute-form `target` names the address the request came in on."""
    sockname = request.link.sockname()
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return False
    try:
        url = URL(target)
    except ValueError:
        return False
    host = (url.host or "").lower()
    local = str(sockname[0]).lower()
    same_host = host == local or (host == "localhost" and local in ("127.0.0.1", "::1"))
    return same_host and url.port == sockname[1]


class _Kept:
    """A small refresh-status answer read whole, to hand back unchanged if no resend happens."""

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body


class Forwarder:
    """Carries requests along their routes. Safe for any number of concurrent requests; holds no per-request state.

    Owns what all routes share: the upstream client, the memory for bodies
    kept to be resent, and the metrics recorder. Each request brings its
    `Route`, read once by the entry handler, and is served with it to the end.
    """

    def __init__(
        self,
        client: UpstreamClient,
        *,
        replay_memory: int,
        replay_wait: float = 0.0,
        metrics: Recorder = NULL_METRICS,
    ) -> None:
        self._metrics = metrics
        self._client = client
        self._memory = ReplayMemory(replay_memory)  # the bodies held for a resend, all requests together
        self._replay_wait = replay_wait  # how long a body may wait for room there before it streams
        self._failures = LogLimiter()  # one warning per distinct upstream failure per 10 s, not a flood

    def _upstream_failed(self, error: ProxyError) -> None:
        """Log why the upstream failed (at warning), at most once per reason per window."""
        line = self._failures.line(error.detail)
        if line is not None:
            logger.warning("%s", line)

    def reconfigure(self, *, upstream: Upstream, replay_memory: int) -> None:
        """Take reloaded settings shared by all requests; requests already under way keep their route."""
        self._client.use(upstream)
        self._memory.limit = replay_memory

    def start(self, request: Request, route: Route) -> bool:
        """Forward `request` without a coroutine when nothing needs waiting for: False, with nothing sent or
        answered, when `handle` must serve it.

        Taken on: a request without a body, in origin form, with a token at
        hand and a kept-alive upstream connection idle. Its answer, when it
        comes whole and is not a refresh status, is relayed in the upstream's
        read callback; anything else (a refresh status, a body still
        arriving, a failure) goes on in the connection's coroutine through
        `handle`, from where the request is.
        """
        started = time.perf_counter()
        target = request.target
        body = NO_BODY if request.body is None and request.content_length is None else bodiless(request)
        if body is None or not target.startswith("/") or not target.isascii() or request.method == "CONNECT":
            return False
        token = route.tokens.token_now()
        if token is None:
            return False
        if route.strip_prefix:
            target = route.forwarded_target(target)
        headers = request.forwarded
        if headers is None or route.drop is not REQUEST_DROP:  # forwarded_header_bytes' usual case first
            headers = forwarded_header_bytes(request.raw_headers, headers, route.drop)
        outgoing = Outgoing(route.upstream, request.method, target, headers, body)
        quick = _Quick(self, request, route, outgoing, token, started)
        exchange = self._client.start(outgoing, token.header, quick)
        if exchange is None:
            return False
        quick.exchange = exchange
        request.pending = quick
        return True

    async def handle(self, request: Request, route: Route, quick: _Quick | None = None) -> None:
        """Forward one client request along `route` and relay the answer; raises only once the answer has begun.

        With `quick`: the request `start` sent, going on from its answer (or its failure).
        """
        # Not loop.time(): uvloop's clock ticks in whole milliseconds, too coarse for the access line.
        started = time.perf_counter() if quick is None else quick.started
        state = _Journey() if quick is None else quick
        status = 500
        try:
            status = await self._journey(request, route, state)
        except ProxyError as error:
            status = error.status
            if error.code in _QUEUE_CODES:
                self._metrics.queue_rejected(error.code)
            if request.started:
                raise
            # After a request we refused, its framing can't be trusted: don't read another on this connection.
            request.answer_error(error, close=isinstance(error, BadRequest))
        except asyncio.CancelledError:
            # The client went away (its handling is cancelled): nginx's 499 says so in the log;
            # or its body stalled, and the server answered 408 and closed the connection.
            status = RequestTimeout.status if request.body_timed_out else CLIENT_CLOSED
            raise
        finally:
            self.done(request, route, state, started, status)

    def done(self, request: Request, route: Route, state: _Journey, started: float, status: int) -> None:
        """A request is over: its body memory given back, its metrics and its access line."""
        if state.held:
            self._memory.give_back(state.held)
        # Once the answer has begun, its status is what the client got, even if it then hung up.
        if request.sent_status is not None:
            status = request.sent_status
        route.metrics.request_done(status)
        if log.access_lines_wanted:
            log.access_line(
                request.method,
                request.target,
                status,
                time.perf_counter() - started,
                state.resent,
                state.generation,
                route.name,
            )

    async def _journey(self, request: Request, route: Route, state: _Journey) -> int:
        if isinstance(state, _Quick):
            outgoing, token = state.outgoing, state.token
            upstream = await self._first_answer(state)
        else:
            outgoing = await self._outgoing(request, route, state)
            token = await route.tokens.get()
            state.generation = token.generation
            upstream = await self._send(outgoing, token)
        return await self._answered(request, route, state, outgoing, token, upstream)

    async def _outgoing(self, request: Request, route: Route, state: _Journey) -> Outgoing:
        """The request as it goes upstream; its body read as far as the replay decision needs."""
        if request.method == "CONNECT":
            raise BadRequest(CONNECT_LATER)
        target = request.target
        if not target.isascii():
            raise BadRequest("the request target must be ASCII; percent-encode other bytes")
        if not target.startswith("/"):
            origin_form = route.origin_form_of(target)
            if origin_form is None:
                raise BadRequest(another_host_detail(request, target))
            target = origin_form
        if route.strip_prefix:
            target = route.forwarded_target(target)
        headers = forwarded_header_bytes(request.raw_headers, request.forwarded, route.drop)
        body = bodiless(request) or await read_body(request, route.replay_limit, self._memory, self._replay_wait)
        state.held = body.held
        return Outgoing(route.upstream, request.method, target, headers, body)

    async def _first_answer(self, quick: _Quick) -> UpstreamAnswer:
        """The answer to the request `start` sent; a failure raised, or the request sent again when it may be."""
        if quick.answer is not None:
            return quick.answer
        error = quick.error
        assert error is not None
        if quick.resendable and quick.outgoing.may_resend:
            # The one more try: if its connection too closes unanswered, the client gets the 502.
            return await self._send(dataclasses.replace(quick.outgoing, resend_left=False), quick.token)
        if isinstance(error, (UpstreamUnreachable, UpstreamTimeout)):
            self._upstream_failed(error)
        raise error

    async def _answered(
        self,
        request: Request,
        route: Route,
        state: _Journey,
        outgoing: Outgoing,
        token: Token,
        upstream: UpstreamAnswer,
    ) -> int:
        """From the upstream's first answer on: a refresh status renewed and resent when it can be, then relayed."""
        tokens = route.tokens
        prefix = b""
        if upstream.status in route.refresh_on:
            challenge = challenge_error(upstream.headers.getall("WWW-Authenticate", []))
            kept = await self._keep_rejection(upstream) if outgoing.body.replayable else None
            if isinstance(kept, _Kept):
                renewed = await tokens.renew(token, challenge)
                if renewed is None:
                    if logger.isEnabledFor(logging.DEBUG):
                        _log_not_resent(request, kept.status, "no new token to resend with", route.name)
                    refuse_unwritable(request, kept.reason, kept.headers)
                    self._metrics.rejection_passed_through()
                    request.answer_whole(kept.status, kept.reason, kept.headers, kept.body)
                    return kept.status
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug(
                        "resending %s %s (route %s) with token %s generation %d after %d to generation %d",
                        request.method,
                        request.target.partition("?")[0],
                        route.name,
                        renewed.fingerprint,
                        renewed.generation,
                        kept.status,
                        token.generation,
                    )
                self._metrics.resent()
                state.resent = True
                state.generation = renewed.generation
                upstream = await self._send(outgoing, renewed)
            else:
                # Not replayable: the client gets this answer, and its own retry a new token.
                if logger.isEnabledFor(logging.DEBUG):
                    why = (
                        "the answer is too large to hold"
                        if outgoing.body.replayable
                        else "the request body was streamed"
                    )
                    _log_not_resent(request, upstream.status, why, route.name)
                tokens.renew_later(token, challenge)
                self._metrics.rejection_passed_through()
                prefix = kept or b""
        await self._relay(request, route, upstream, prefix)
        return upstream.status

    async def _send(self, outgoing: Outgoing, token: Token) -> UpstreamAnswer:
        started = time.perf_counter()
        try:
            answer = await self._client.send(outgoing, token.header)
        except (UpstreamUnreachable, UpstreamTimeout) as error:
            self._upstream_failed(error)
            raise
        self._metrics.upstream_answered(time.perf_counter() - started)
        return answer

    async def _keep_rejection(self, upstream: UpstreamAnswer) -> _Kept | bytes | None:
        """Read and release a small refresh-status answer so it can be handed back unchanged.

        Too large to keep: None when that is known from Content-Length, else
        the bytes already read, to be relayed ahead of the rest.
        """
        if upstream.content_length is not None and upstream.content_length > REJECTION_BODY_LIMIT:
            return None
        buffer = bytearray()
        try:
            while len(buffer) <= REJECTION_BODY_LIMIT:
                chunk = await upstream.read(REJECTION_BODY_LIMIT + 1 - len(buffer))
                if not chunk:
                    break
                buffer += chunk
        except BaseException as error:
            # Failed, or cancelled (the client left): the half-read connection must not be held or pooled.
            upstream.close()
            if isinstance(error, (UpstreamUnreachable, UpstreamTimeout)):
                self._upstream_failed(error)
            raise
        if len(buffer) > REJECTION_BODY_LIMIT:
            return bytes(buffer)
        upstream.release()
        return _Kept(
            upstream.status,
            upstream.reason_bytes,
            response_header_bytes(upstream.raw_headers),
            bytes(buffer),
        )

    async def _relay(self, request: Request, route: Route, upstream: UpstreamAnswer, prefix: bytes = b"") -> None:
        """Send the upstream's status, headers and body to the client as they arrive."""
        try:
            reason, headers = _answer_head(request, route, upstream)
            length = upstream.content_length
            if length is not None and length <= SMALL_BODY and not prefix:
                # Small and sized: when the first read is the whole body (the usual case), head and
                # body leave in one write and no streaming is set up; a body still arriving streams
                # on from there.
                prefix = await upstream.read(SMALL_BODY + 1)
                if upstream.at_eof():
                    request.start(upstream.status, reason, headers, length, prefix)
                    request.finish()
                    return
            request.start(upstream.status, reason, headers, length, prefix)
            try:
                async with contextlib.aclosing(upstream.chunks()) as chunks:
                    async for chunk in chunks:
                        await request.write(chunk)
            except ProxyError as error:
                # The answer has begun and cannot be completed honestly: cut the connection.
                logger.warning(
                    "upstream broke off the answer to %s %s: %s",
                    request.method,
                    request.target.partition("?")[0],
                    error.detail,
                )
                request.link.close()
                return
            except ConnectionResetError:
                return  # the client went away between two writes, before its handling was cancelled
            request.finish()
        finally:
            # Read to the end: the connection may carry another request. Cancelled (client
            # gone) or failed: drop it rather than pool it half-read.
            if upstream.at_eof():
                upstream.release()
            else:
                upstream.close()


def _answer_head(request: Request, route: Route, upstream: UpstreamAnswer) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The reason phrase and headers of the upstream's answer as they go to the client; UpstreamUnreachable
    when they cannot be written."""
    headers = upstream.relayed_headers
    if headers is None:
        headers = response_header_bytes(upstream.raw_headers)
    reason = upstream.reason_bytes
    if has_control_character(reason, headers, upstream.values_checked):
        refuse_unwritable(request, reason, headers)
    if route.rewrite_redirects:
        _rewrite_location(headers, route, request)
    return reason, headers


def _rewrite_location(headers: list[tuple[bytes, bytes]], route: Route, request: Request) -> None:
    """Re-point a Location naming the upstream at the proxy (`upstream.rewrite_redirects`), in place."""
    prefix = route.path_prefix if route.strip_prefix else ""
    for index, (name, value) in enumerate(headers):
        if len(name) == 8 and name.lower() == b"location":
            location = rewritten_location(route.upstream, value.decode("latin-1"), request, prefix)
            if location is not None:
                headers[index] = (name, location.encode("latin-1"))


class _Journey:
    """What the access line reports about one request, and the body memory it holds until done."""

    __slots__ = ("generation", "held", "resent")

    def __init__(self) -> None:
        self.held = 0  # bytes of the body taken from the ReplayMemory
        self.resent = False
        self.generation: int | None = None


class _Quick(_Journey):
    """A request `Forwarder.start` sent without a coroutine: told of its answer in the upstream's callbacks.

    Owned by the event loop. It ends in one of three ways: relayed whole in
    `answered` (the connection is told `served`); handed to the connection's
    coroutine (`resume`, through `Forwarder.handle`) for anything that needs
    waiting; or `abandon`ed when the client leaves first.
    """

    __slots__ = (
        "answer",
        "error",
        "exchange",
        "forwarder",
        "outgoing",
        "request",
        "resendable",
        "route",
        "started",
        "token",
    )

    def __init__(
        self, forwarder: Forwarder, request: Request, route: Route, outgoing: Outgoing, token: Token, started: float
    ) -> None:
        self.held = 0
        self.resent = False
        self.forwarder = forwarder
        self.request = request
        self.route = route
        self.outgoing = outgoing
        self.token = token
        self.started = started
        self.generation = token.generation
        self.exchange: QuickExchange | None = None  # the upstream exchange until it answers or fails
        self.answer: ArrivedAnswer | None = None  # the answer, when handed on to the coroutine
        self.error: ProxyError | None = None  # why no answer came, when handed on to the coroutine
        self.resendable = False

    def answered(self, answer: ArrivedAnswer) -> None:
        """The upstream's answer head is in: relayed here when whole and final, else handed on."""
        self.exchange = None
        forwarder = self.forwarder
        forwarder._metrics.upstream_answered(time.perf_counter() - self.started)
        request = self.request
        if not answer.complete or answer.status in self.route.refresh_on:
            self.answer = answer
            request.link.resume(request)
            return
        status = answer.status
        route = self.route
        try:
            # _answer_head's usual case first, without a call.
            reason = answer.reason_bytes
            headers = answer.relayed_headers
            if (
                headers is None
                or route.rewrite_redirects
                # has_control_character's usual case first: the values checked by llhttp, a reason of letters
                or (
                    not (answer.values_checked and reason.isalpha())
                    and has_control_character(reason, headers, answer.values_checked)
                )
            ):
                reason, headers = _answer_head(request, route, answer)
            body = answer.take_body()
            if answer.content_length == len(body):
                request.answer_whole(status, reason, headers, body)
            else:
                request.start(status, reason, headers, answer.content_length, body)
                request.finish()
        except ProxyError as error:
            status = error.status
            request.answer_error(error)
        except Exception:
            logger.exception("tokenproxy failed to handle a request from %s", request.remote or "a client")
            status = 500
            if request.started:
                request.link.abort()
            else:
                request.answer_error(ProxyError("tokenproxy failed to handle the request"), close=True)
        answer.release()
        request.pending = None
        # done(), written out: a quick request holds no body memory.
        if request.sent_status is not None:
            status = request.sent_status
        route.metrics.request_done(status)
        if log.access_lines_wanted:
            log.access_line(
                request.method,
                request.target,
                status,
                time.perf_counter() - self.started,
                False,
                self.generation,
                route.name,
            )
        request.link.served(request)

    def failed(self, error: ProxyError, *, resendable: bool = False) -> None:
        """No answer came: handed on to the coroutine, which resends or answers the error."""
        self.exchange = None
        self.error = error
        self.resendable = resendable
        self.request.link.resume(self.request)

    def resume(self) -> Awaitable[None]:
        """Go on in the connection's coroutine from where the request is."""
        return self.forwarder.handle(self.request, self.route, self)

    def abandon(self) -> None:
        """The client left before the answer was relayed: the upstream exchange is dropped, 499 logged."""
        if self.exchange is not None:
            self.exchange.abandon()
            self.exchange = None
        if self.answer is not None:
            self.answer.close()
        self.forwarder.done(self.request, self.route, self, self.started, CLIENT_CLOSED)

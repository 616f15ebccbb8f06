"""Broken and hostile input costs nothing: refused requests are never forwarded, broken transfers leak nothing.

Raw-socket clients send what no well-behaved client would; raw upstreams
answer what no well-behaved server would. Every wait is on an event, a read
or a task, bounded by RAW_BOUND.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, Self

import pytest

from tests.fakes.counting_upstream import CountingUpstream
from tests.helpers import (
    RAW_BOUND,
    assert_proxy_error,
    close_raw,
    no_tracebacks,
    open_raw,
    parse_response,
    raw_exchange,
    read_to_eof,
)

# --- requests aiohttp's parser refuses -------------------------------------------------------

H = b"Host: c\r\n"
REFUSED = {
    "content-length and transfer-encoding": b"POST /echo HTTP/1.1\r\n" + H
    + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding and content-length": b"POST /echo HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "two content-lengths": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "content-length list": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello",
    "negative content-length": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n",
    "plus-signed content-length": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
    "transfer-encoding not ending in chunked": b"POST /echo HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "gzip transfer coding before chunked": b"POST /echo HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding xchunked": b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "chunk size not hex": b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk size overflow": b"POST /echo HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "chunk size with bare LF": b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
    "chunk longer than its size": b"POST /echo HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
    "header name with a space": b"GET /echo HTTP/1.1\r\n" + H + b"Bad Name: x\r\n\r\n",
    "space before the colon": b"GET /echo HTTP/1.1\r\n" + H + b"Content-Length : 5\r\n\r\nhello",
    "control byte in a header name": b"GET /echo HTTP/1.1\r\n" + H + b"X-\x01Name: x\r\n\r\n",
    "NUL in a header value": b"GET /echo HTTP/1.1\r\n" + H + b"X-Name: a\x00b\r\n\r\n",
    "obsolete line folding": b"GET /echo HTTP/1.1\r\n" + H + b"X-Name: a\r\n b\r\n\r\n",
    "NUL in the path": b"GET /echo\x00/x HTTP/1.1\r\n" + H + b"\r\n",
    "space in the path": b"GET /echo /x HTTP/1.1\r\n" + H + b"\r\n",
    "no Host in HTTP/1.1": b"GET /echo HTTP/1.1\r\n\r\n",
    "two Host headers": b"GET /echo HTTP/1.1\r\n" + H + b"Host: d\r\n\r\n",
    "bare LF line ends": b"GET /echo HTTP/1.1\nHost: c\n\n",
    "garbage request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", list(REFUSED.values()), ids=list(REFUSED))
async def test_parser_refused_request_gets_400_json_and_is_never_forwarded(
    make_proxy: Any, upstream: CountingUpstream, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    """What aiohttp's parser refuses gets 400 bad_request as JSON, the connection closes, and the upstream sees nothing."""
    proxy = await make_proxy(upstream={"url": upstream.url})
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(request_bytes)
        data = await read_to_eof(reader)  # the proxy closes the connection after its answer
    finally:
        await close_raw(writer)
    resp = parse_response(data)
    assert_proxy_error(resp.status, resp.all, resp.body, 400, "bad_request")
    assert upstream.requests == 0
    assert upstream.open == 0  # not even a connection was made
    no_tracebacks(caplog)


async def test_parser_smuggled_request_behind_conflicting_framing_never_forwarded(
    make_proxy: Any, upstream: CountingUpstream
) -> None:
    """A second request hidden behind Content-Length/Transfer-Encoding disagreement reaches nobody."""
    proxy = await make_proxy(upstream={"url": upstream.url})
    smuggled = b"GET /echo/smuggled HTTP/1.1\r\nHost: c\r\n\r\n"
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(
            b"POST /echo/front HTTP/1.1\r\nHost: c\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
            % (5 + len(smuggled))
            + b"0\r\n\r\n"
            + smuggled
        )
        data = await read_to_eof(reader)
    finally:
        await close_raw(writer)
    resp = parse_response(data)
    assert_proxy_error(resp.status, resp.all, resp.body, 400, "bad_request")
    assert b"HTTP/1.1 200" not in resp.rest  # exactly one answer: the refusal
    assert upstream.requests == 0


# A request an upstream that ignores bodies on GET would find inside the body, and take for the
# next request on its kept-alive connection.
SMUGGLED = b"DELETE /echo/smuggled HTTP/1.1\r\nHost: c\r\n\r\n"
BODY_ON_GET = {
    "GET with Content-Length": b"GET /echo/front HTTP/1.1\r\n" + H
    + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
    "HEAD with Content-Length": b"HEAD /echo/front HTTP/1.1\r\n" + H
    + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
    "GET chunked": b"GET /echo/front HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
}


@pytest.mark.parametrize("request_bytes", list(BODY_ON_GET.values()), ids=list(BODY_ON_GET))
async def test_body_on_get_or_head_gets_400_and_is_never_forwarded(
    make_proxy: Any, upstream: CountingUpstream, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    """A GET or HEAD with a body gets 400 bad_request naming why, the connection closes, and the upstream sees nothing.

    Forwarded, the body could be taken for a request of its own by an
    upstream that ignores bodies on GET, on a connection the pool reuses.
    """
    proxy = await make_proxy(upstream={"url": upstream.url})
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(request_bytes)
        data = await read_to_eof(reader)
    finally:
        await close_raw(writer)
    resp = parse_response(data)
    assert resp.status == 400
    assert resp.all("X-Tokenproxy-Error") == ["bad_request"]
    if not request_bytes.startswith(b"HEAD"):  # an answer to HEAD has no body
        assert "with a body is not forwarded" in resp.json()["detail"]
    assert b"HTTP/1.1 200" not in resp.rest  # exactly one answer: the refusal
    assert upstream.requests == 0
    no_tracebacks(caplog)


async def test_get_with_content_length_zero_is_forwarded(make_proxy: Any, upstream: CountingUpstream) -> None:
    """`Content-Length: 0` on a GET is no body at all: forwarded as usual."""
    proxy = await make_proxy(upstream={"url": upstream.url})
    resp = await raw_exchange(
        proxy.url, b"GET /echo/empty HTTP/1.1\r\nHost: c\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert resp.status == 200
    assert resp.json()["body_len"] == 0
    assert upstream.requests == 1


async def test_parser_bad_chunk_mid_upload_gets_400_not_a_hang(make_proxy: Any, upstream: CountingUpstream) -> None:
    """A bad chunk size arriving after the handler began reading the body: 400 at once, nothing forwarded."""
    proxy = await make_proxy(upstream={"url": upstream.url})
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
        )
        # 100 Continue: the proxy is now reading the body, so the bad chunk arrives mid-upload.
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_BOUND)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"5\r\nhello\r\nzz\r\nmore\r\n")
        data = await read_to_eof(reader)
    finally:
        await close_raw(writer)
    resp = parse_response(data)
    assert_proxy_error(resp.status, resp.all, resp.body, 400, "bad_request")
    assert upstream.requests == 0


async def test_parser_refusal_logged_once_without_quoting_the_request(
    make_proxy: Any, upstream: CountingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused request is logged in one line that names the reason, not the request's bytes."""
    proxy = await make_proxy(upstream={"url": upstream.url})
    resp = await raw_exchange(proxy.url, b"GET /echo HTTP/1.1\r\nHost: c\r\nX-Name: secret-ish\x00value\r\n\r\n")
    assert resp.status == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenproxy.server"]
    assert len(lines) == 1
    assert "header" in lines[0].lower()  # llhttp's "Invalid header value char", or the pure-Python parser's own
    assert "secret-ish" not in lines[0] and "secret-ish" not in resp.body.decode()


# --- clients that go away ----------------------------------------------------------------------


def open_fds() -> int:
    """How many file descriptors this process (clients, proxy and upstream alike) has open."""
    return len(os.listdir("/proc/self/fd"))


async def settle_tasks(before: set[asyncio.Task[Any]]) -> None:
    """Wait for every task started since `before` to finish; a task that never does is a leak."""
    started = asyncio.all_tasks() - before - {asyncio.current_task()}
    if started:
        _, pending = await asyncio.wait(started, timeout=RAW_BOUND)
        assert not pending, f"tasks left running: {pending}"


async def _warm(proxy_url: str, upstream: CountingUpstream) -> None:
    """One request, so the token is fetched and one upstream connection sits in the pool."""
    resp = await raw_exchange(proxy_url, b"GET /echo/warm HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert resp.status == 200
    assert upstream.open == 1


async def _upload_then_vanish(proxy_url: str, upstream: CountingUpstream) -> None:
    _, writer = await open_raw(proxy_url)
    writer.write(b"PUT /upload HTTP/1.1\r\nHost: c\r\nContent-Length: 10000000\r\n\r\n" + b"u" * 65536)
    await writer.drain()
    await asyncio.wait_for(upstream.upload_started.wait(), RAW_BOUND)
    writer.transport.abort()


async def _download_then_vanish(proxy_url: str, upstream: CountingUpstream) -> None:
    reader, writer = await open_raw(proxy_url)
    writer.write(b"GET /endless HTTP/1.1\r\nHost: c\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_BOUND)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert await asyncio.wait_for(reader.read(65536), RAW_BOUND)
    writer.transport.abort()


VANISHING: dict[str, tuple[Callable[[str, CountingUpstream], Any], str]] = {
    "mid-upload": (_upload_then_vanish, "upload_aborted"),
    "mid-download": (_download_then_vanish, "endless_aborted"),
}


@pytest.mark.parametrize("when", list(VANISHING))
async def test_client_disconnect_cancels_upstream_request_and_leaks_nothing(
    make_proxy: Any, upstream: CountingUpstream, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    """A client gone mid-upload or mid-download: the upstream request is cancelled, its connection dropped, nothing left behind."""
    vanish, aborted = VANISHING[when]
    proxy = await make_proxy(upstream={"url": upstream.url}, retry={"replay_limit": 1024})
    await _warm(proxy.url, upstream)
    fds, tasks, level = open_fds(), asyncio.all_tasks(), upstream.open

    await vanish(proxy.url, upstream)
    await asyncio.wait_for(getattr(upstream, aborted).wait(), RAW_BOUND)  # the upstream saw its request end
    await upstream.wait_open(lambda n: n < level + 1)  # and its connection closed, not pooled
    await settle_tasks(tasks)
    assert proxy.runner.server.open_connections == 0

    resp = await raw_exchange(proxy.url, b"GET /echo/next HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert resp.status == 200 and resp.json()["raw_path"] == "/echo/next"
    assert upstream.open == level
    assert open_fds() == fds
    no_tracebacks(caplog)


# --- upstreams that misbehave ------------------------------------------------------------------

GOOD_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BEGUN = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"


class ScriptedUpstream:
    """A bare HTTP/1.1 server: the first requests get the scripted misbehaviour, later ones a good answer.

    Scripts: `reset` (answer begun, then the connection reset), `bad_chunk`
    (answer begun, then a chunk size that is not hex), `stall` (answer begun,
    then silence until the proxy gives up), `bad_head` (a status line that
    is not HTTP). A begun answer goes on only once `proceed` is set, so the
    client has seen its start first. Counts open connections.
    """

    def __init__(self, scripts: list[str]) -> None:
        self.scripts = scripts
        self.open = 0
        self.requests = 0
        self.url = ""
        self.proceed = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=RAW_BOUND)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.open += 1
        try:
            for _ in range(1000):  # bounded: requests on one connection
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests += 1
                script = self.scripts.pop(0) if self.scripts else "good"
                if script == "good":
                    writer.write(GOOD_ANSWER)
                    await writer.drain()
                    continue
                if script == "bad_head":
                    writer.write(b"HTTP/1.1 two hundred OK\r\n\r\n")
                else:
                    writer.write(BEGUN)
                await writer.drain()
                if script in ("reset", "bad_chunk"):
                    await self.proceed.wait()
                if script == "reset":
                    writer.transport.abort()
                    return
                if script == "bad_chunk":
                    writer.write(b"zz\r\nmore\r\n")
                    await writer.drain()
                # Wait for the proxy to drop the connection (it must).
                await reader.read()
                return
        except ConnectionError:
            return
        finally:
            self.open -= 1
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()


@pytest.fixture
async def scripted(request: pytest.FixtureRequest) -> AsyncIterator[ScriptedUpstream]:
    """A ScriptedUpstream with the script named by the test's `script` parameter."""
    async with ScriptedUpstream([request.param]) as server:
        yield server


# What the one log line gives as the reason (the session path's wording, or the fast path's).
BROKEN_OFF = {
    "reset": ("closed the connection before its answer was complete",),
    "bad_chunk": ("closed the connection before its answer was complete", "sent an answer that is not valid HTTP"),
    "stall": ("read_timeout",),
}


# "bad_chunk" covers an aiohttp 3.14 client bug (C parser): the connection is
# closed on a malformed chunk but the body's reader is never ended;
# forward._fail_body_when_closed ends it.
@pytest.mark.parametrize("scripted", list(BROKEN_OFF), indirect=True)
async def test_upstream_breaks_off_answer_client_connection_closed_logged_once_pool_recovers(
    make_proxy: Any, scripted: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Reset, malformed chunk or read timeout mid-body: the client's connection is cut, one log line says why, the next request works."""
    reason = BROKEN_OFF[scripted.scripts[0]]
    proxy = await make_proxy(upstream={"url": scripted.url, "read_timeout": 0.5})
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(b"GET /broken HTTP/1.1\r\nHost: c\r\n\r\n")
        begun = await asyncio.wait_for(reader.readuntil(b"hello\r\n"), RAW_BOUND)
        scripted.proceed.set()
        rest = await read_to_eof(reader)  # ends: the proxy closed the connection
    finally:
        await close_raw(writer)
    assert begun.startswith(b"HTTP/1.1 200 ")
    assert not rest.endswith(b"0\r\n\r\n")  # never completed as if whole

    lines = [r for r in caplog.records if r.name.startswith("tokenproxy") and r.levelno >= logging.WARNING]
    assert len(lines) == 1
    assert "/broken" in lines[0].getMessage() and any(text in lines[0].getMessage() for text in reason)
    no_tracebacks(caplog)

    resp = await raw_exchange(proxy.url, b"GET /next HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert resp.status == 200 and resp.body == b"ok"
    assert scripted.open == 1  # the broken connection is gone; one good one is pooled


async def test_upstream_malformed_status_line_gets_502_and_pool_recovers(
    make_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream answer that is not HTTP (nothing sent to the client yet): 502 JSON, then the next request works."""
    async with ScriptedUpstream(["bad_head"]) as scripted:
        proxy = await make_proxy(upstream={"url": scripted.url})
        resp = await raw_exchange(proxy.url, b"GET /x HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
        assert_proxy_error(resp.status, resp.all, resp.body, 502, "upstream_unreachable")
        resp = await raw_exchange(proxy.url, b"GET /y HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
        assert resp.status == 200 and resp.body == b"ok"
        assert scripted.requests == 2
    no_tracebacks(caplog)


async def test_parser_bad_chunk_mid_streamed_upload_gets_400_not_502(make_proxy: Any, upstream: CountingUpstream) -> None:
    """A body over replay_limit, already streaming upstream, that turns malformed: the client's fault, 400."""
    proxy = await make_proxy(upstream={"url": upstream.url}, retry={"replay_limit": 10})
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_BOUND)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"20\r\n" + b"x" * 32 + b"\r\nzz\r\nmore\r\n")
        data = await read_to_eof(reader)
    finally:
        await close_raw(writer)
    resp = parse_response(data)
    assert_proxy_error(resp.status, resp.all, resp.body, 400, "bad_request")


async def test_client_gone_while_waiting_logged_as_499(
    make_proxy: Any, token_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up while its request waits for a token is logged with status 499, not 500."""
    from tests.fakes.token_server import until

    token_server.gate = asyncio.Event()
    proxy = await make_proxy()
    reader, writer = await open_raw(proxy.url)
    writer.write(b"GET /echo/gone HTTP/1.1\r\nHost: c\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(token_server.entered.wait(), RAW_BOUND)
    await close_raw(writer)

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "tokenproxy.access"]

    await until(lambda: bool(logged()))
    assert '"GET /echo/gone" 499 ' in logged()[0]
    token_server.gate.set()

"""How the proxy reads the upstream's answers byte by byte: where an answer ends, and when its connection may carry the next.

The cases llhttp leaves to its caller on the client side: an answer to HEAD
(its head is all of it, whatever length it announces), a body that runs until
the connection closes, interim 1xx answers, and the ways an answer breaks off
or overruns. Every test runs with each `upstream.client` and on both event
loops; the upstream is a bare asyncio server writing exact bytes
(tests/fakes/raw_upstream.py), counting the connections it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.fakes.raw_upstream import Conn, RawUpstream, Request, answer
from tests.helpers import BOTH_LOOPS

pytestmark = pytest.mark.asyncio(loop_factories=BOTH_LOOPS)

# Bound for one raw exchange with the proxy; a hang fails the test instead of stalling the run.
RAW_BOUND = 10.0


async def echo_target(request: Request) -> bool:
    """A well-behaved keep-alive upstream: the body names the target it was asked for."""
    await request.conn.send(answer(request.target.encode()))
    return True


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    """GET `url`: the status and the whole body."""
    async with client.get(url) as resp:
        return resp.status, await resp.read()


async def open_raw(base_url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection to the proxy."""
    url = URL(base_url)
    return await asyncio.open_connection(url.host, url.port)


async def close_raw(writer: asyncio.StreamWriter) -> None:
    """Close a raw connection, tolerating one the other side already reset."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the proxy sends until it closes the connection (a reset counts as the close)."""
    data = bytearray()
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), RAW_BOUND):
            data += chunk
    return bytes(data)


async def closed_by_proxy(conn: Conn) -> None:
    """Wait until the proxy has closed this upstream connection; fail if it keeps it."""
    try:
        await asyncio.wait_for(conn.closed.wait(), RAW_BOUND)
    except TimeoutError:
        pytest.fail(f"the proxy kept upstream connection {conn.index} open")


# --- HEAD: the head is the whole answer ---------------------------------------------------------------


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 1000\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"",
        b"Connection: X-Close-Reason\r\nX-Close-Reason: none\r\n",
    ],
    ids=["content-length", "chunked", "no-framing", "no-framing-connection-names-a-header"],
)
async def test_head_answer_ends_with_its_head_connection_carries_the_next_request(
    make_proxy: Any, client: aiohttp.ClientSession, framing: bytes, upstream_client: str
) -> None:
    """A HEAD answer announcing a body (a length, chunked, or nothing, which for GET would mean "until the
    close") ends with its head: the client gets it at once, and the next GET goes on the same connection. A
    Connection header naming a header whose name holds "close" is not Connection: close."""
    if upstream_client == "session" and b"Content-Length" not in framing and b"chunked" not in framing:
        pytest.skip("aiohttp's ClientSession does not keep alive a connection whose HEAD answer has no framing")

    async def head_aware(request: Request) -> bool:
        if request.method == "HEAD":
            await request.conn.send(b"HTTP/1.1 200 OK\r\n" + framing + b"X-Head: yes\r\n\r\n")
            return True
        return await echo_target(request)

    async with RawUpstream(head_aware) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        for target in ("/a", "/b"):
            async with client.head(f"{proxy.url}{target}") as resp:
                assert resp.status == 200
                assert resp.headers["X-Head"] == "yes"
                assert "X-Close-Reason" not in resp.headers
                assert await asyncio.wait_for(resp.read(), RAW_BOUND) == b""
            assert await get(client, f"{proxy.url}/next{target}") == (200, b"/next" + target.encode())
    assert [(r.method, r.target) for r in upstream.requests] == [
        ("HEAD", "/a"),
        ("GET", "/next/a"),
        ("HEAD", "/b"),
        ("GET", "/next/b"),
    ]
    assert len(upstream.connections) == 1


async def test_body_sent_with_a_head_answer_drops_that_connection(
    make_proxy: Any, client: aiohttp.ClientSession, upstream_client: str
) -> None:
    """An upstream that sends a body after its HEAD answer (in the same write) is broken: the client
    gets the head alone, that connection is closed, and the next GET gets its own answer on a new one."""
    if upstream_client == "session":
        pytest.skip("aiohttp's ClientSession answers 502: it reads the body as a malformed answer")

    async def head_with_body(request: Request) -> bool:
        if request.method == "HEAD":
            await request.conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Head: yes\r\n\r\nhello")
            return True
        return await echo_target(request)

    async with RawUpstream(head_with_body) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        async with client.head(f"{proxy.url}/file") as resp:
            assert resp.status == 200
            assert resp.headers["X-Head"] == "yes"
            assert await asyncio.wait_for(resp.read(), RAW_BOUND) == b""
        await closed_by_proxy(upstream.connections[0])
        assert await get(client, f"{proxy.url}/next") == (200, b"/next")
    assert len(upstream.connections) == 2
    assert upstream.connections[1].requests == 1


async def test_body_sent_late_after_a_head_answer_drops_that_connection(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """The body of a HEAD answer arriving after the client has its answer: the connection is closed
    (never handed to the next request, which would read those bytes as its answer)."""
    answered = asyncio.Event()

    async def head_then_body(request: Request) -> bool:
        if request.method == "HEAD":
            await request.conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            await asyncio.wait_for(answered.wait(), RAW_BOUND)
            await request.conn.send(b"hello")
            return True
        return await echo_target(request)

    async with RawUpstream(head_then_body) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        async with client.head(f"{proxy.url}/file") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == "5"
        answered.set()
        await closed_by_proxy(upstream.connections[0])
        assert await get(client, f"{proxy.url}/next") == (200, b"/next")
    assert len(upstream.connections) == 2


# --- a body that runs until the close ---------------------------------------------------------------


async def test_http11_body_until_close_arrives_whole_next_request_on_a_new_connection(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """An HTTP/1.1 answer with neither Content-Length nor chunked ends when the upstream closes: the
    client gets every byte, and the next request goes on a new connection."""
    payload = bytes(range(256)) * 700  # 175 KiB: more than one read, past the pause mark

    async def until_close(request: Request) -> bool:
        if request.target != "/stream":
            return await echo_target(request)
        await request.conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for i in range(0, len(payload), 50_000):
            await request.conn.send(payload[i : i + 50_000])
        return False  # close cleanly: that ends the body

    async with RawUpstream(until_close) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        assert await get(client, f"{proxy.url}/stream") == (200, payload)
        assert await get(client, f"{proxy.url}/next") == (200, b"/next")
    assert len(upstream.connections) == 2
    assert upstream.connections[1].requests == 1


async def test_chunked_answer_with_trailers_arrives_whole_connection_reused(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A chunked answer ending in trailer fields: the client gets the whole body (the trailers are not
    taken for headers), and the connection carries the next request."""

    async def with_trailers(request: Request) -> bool:
        if request.target != "/trailers":
            return await echo_target(request)
        await request.conn.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n"
        )
        return True

    async with RawUpstream(with_trailers) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        async with client.get(f"{proxy.url}/trailers") as resp:
            assert resp.status == 200
            assert "X-Sum" not in resp.headers
            assert await resp.read() == b"hello world"
        assert await get(client, f"{proxy.url}/next") == (200, b"/next")
    assert len(upstream.connections) == 1


# --- interim answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("together", [True, False], ids=["one-write", "separate-writes"])
async def test_interim_100_and_103_skipped_client_gets_the_final_answer(
    make_proxy: Any, client: aiohttp.ClientSession, together: bool
) -> None:
    """A 100 Continue and a 103 Early Hints before the final answer (in one write with it, or each on
    its own): the client gets the 200 and its body; the connection carries the next request."""
    interim = [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n",
    ]

    async def interim_first(request: Request) -> bool:
        if request.target != "/page":
            return await echo_target(request)
        if together:
            await request.conn.send(b"".join(interim) + answer(b"final", headers=("X-Final: yes",)))
        else:
            for part in interim:
                await request.conn.send(part)
            await request.conn.send(answer(b"final", headers=("X-Final: yes",)))
        return True

    async with RawUpstream(interim_first) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        async with client.get(f"{proxy.url}/page") as resp:
            assert resp.status == 200
            assert resp.headers["X-Final"] == "yes"
            assert "Link" not in resp.headers
            assert await resp.read() == b"final"
        assert await get(client, f"{proxy.url}/next") == (200, b"/next")
    assert len(upstream.connections) == 1


# --- answers that break off -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cut",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n10\r\nonly-part",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello",
    ],
    ids=["mid-chunk", "before-last-chunk", "short-of-length"],
)
async def test_answer_cut_by_a_clean_close_cuts_the_clients_connection(
    make_proxy: Any, cut: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunked answer whose upstream closes (a clean FIN) mid-chunk or before the last chunk, or a
    body short of its Content-Length: the client's connection is cut, never ended as if whole; one log
    line says why; the next request works on a new upstream connection."""

    async def breaks_off(request: Request) -> bool:
        if not request.target.startswith("/broken"):
            return await echo_target(request)
        await request.conn.send(cut)
        return False  # close cleanly mid-answer

    async with RawUpstream(breaks_off) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        reader, writer = await open_raw(proxy.url)
        try:
            writer.write(b"GET /broken?q=s3kr1t HTTP/1.1\r\nHost: c\r\n\r\n")
            received = await read_to_eof(reader)  # ends: the proxy cut the connection
        finally:
            await close_raw(writer)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        if b"chunked" in head.lower():
            assert not body.endswith(b"0\r\n\r\n")  # never completed as if whole
        else:
            assert len(body) < 100
        async with aiohttp.ClientSession() as client:
            assert await get(client, f"{proxy.url}/next") == (200, b"/next")
    assert len(upstream.connections) == 2
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("tokenproxy") and r.levelname == "WARNING"]
    assert len(lines) == 1
    assert "GET /broken" in lines[0] and "before its answer was complete" in lines[0]
    assert not [r for r in caplog.records if "s3kr1t" in r.getMessage()]


async def test_upstream_head_over_the_limits_gets_502_next_request_works(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """An answer with a header longer than 8190 bytes, or with more than 128 headers: 502
    upstream_unreachable (nothing relayed), and the next request works."""
    heads = {
        "/long": b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 9000 + b"\r\nContent-Length: 2\r\n\r\nok",
        "/many": b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        + b"Content-Length: 2\r\n\r\nok",
    }

    async def oversized(request: Request) -> bool:
        if request.target not in heads:
            return await echo_target(request)
        await request.conn.send(heads[request.target])
        return True

    async with RawUpstream(oversized) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        for target in heads:
            async with client.get(f"{proxy.url}{target}") as resp:
                assert resp.status == 502
                assert json.loads(await resp.read())["error"] == "upstream_unreachable"
            assert await get(client, f"{proxy.url}/next") == (200, b"/next")


# --- the status line ------------------------------------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True], ids=["first-request", "kept-alive-upstream"])
@pytest.mark.parametrize(
    "reason", [b"Tr\xe8s bien", "Très bien".encode(), b""], ids=["latin-1-obs-text", "utf-8", "empty"]
)
async def test_reason_phrase_relayed_byte_for_byte(
    make_proxy: Any, client: aiohttp.ClientSession, reason: bytes, warm: bool
) -> None:
    """A reason phrase with obs-text (RFC 9112 §4: any byte from 0x80 on, here Latin-1 and UTF-8) or none
    at all reaches the client as the upstream sent it, and the connection carries the next request: on a
    new upstream connection and on a kept-alive one (the quick path)."""

    async def odd_reason(request: Request) -> bool:
        if request.target != "/odd":
            return await echo_target(request)
        await request.conn.send(b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 2\r\n\r\nok")
        return True

    async with RawUpstream(odd_reason) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        if warm:
            assert await get(client, f"{proxy.url}/warm") == (200, b"/warm")
        reader, writer = await open_raw(proxy.url)
        try:
            writer.write(
                b"GET /odd HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            data = await read_to_eof(reader)
        finally:
            await close_raw(writer)
    first, _, rest = data.partition(b"\r\n")
    assert first == b"HTTP/1.1 200 " + reason
    assert rest.split(b"\r\n\r\n", 1)[1].startswith(b"okHTTP/1.1 200 OK\r\n")
    assert data.endswith(b"/next")

"""The connections the proxy opens to the upstream: kept alive, bounded, recovered when stale, never confused.

Every test runs with each `upstream.client` (see conftest's `upstream_client`).
The upstream is a bare asyncio server (tests/fakes/raw_upstream.py) so a test
can answer with any bytes it likes and count the TCP connections it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.fakes.raw_upstream import Conn, RawUpstream, Request, answer

# Bound for one raw exchange with the proxy; a hang fails the test instead of stalling the run.
RAW_BOUND = 10.0


async def echo_target(request: Request) -> bool:
    """A well-behaved keep-alive upstream: the body names the target it was asked for."""
    await request.conn.send(answer(request.target.encode()))
    return True


async def get(client: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, bytes]:
    """GET `url`: the status and the whole body."""
    async with client.get(url, **kwargs) as resp:
        return resp.status, await resp.read()


async def assert_proxy_error(resp: aiohttp.ClientResponse, status: int, code: str) -> None:
    """The answer is tokenproxy's own JSON error with this status and code."""
    assert resp.status == status
    assert resp.headers["X-Tokenproxy-Error"] == code
    body = json.loads(await resp.read())
    assert body["error"] == code and body["detail"]


def assert_bearer(upstream: RawUpstream) -> None:
    """Every request the upstream read carried exactly one bearer token."""
    for request in upstream.requests:
        values = request.all(b"authorization")
        assert len(values) == 1 and values[0].startswith(b"Bearer ")


async def open_raw(base_url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection to the proxy."""
    url = URL(base_url)
    return await asyncio.open_connection(url.host, url.port)


async def close_raw(writer: asyncio.StreamWriter) -> None:
    """Close a raw connection, tolerating one the other side already reset."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def send_in_pieces(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write `data` 64 KiB at a time, waiting for the peer to take each piece."""
    for i in range(0, len(data), 65536):
        writer.write(data[i : i + 65536])
        await writer.drain()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One answer framed by Content-Length off a raw connection: its status and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_BOUND)
    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    assert len(lengths) == 1, head
    return int(head.split(b" ", 2)[1]), await asyncio.wait_for(reader.readexactly(int(lengths[0])), RAW_BOUND)


async def one_answer_per_connection(request: Request) -> bool:
    """Answer a connection's first request; read its second and close without answering (an idle timeout firing)."""
    if request.number > 1:
        return False  # closed without a word (and without reading the body)
    await request.conn.read_body(request)
    await request.conn.send(answer(request.method.encode() + b" " + request.target.encode()))
    return True


async def closed_by_proxy(conn: Conn) -> None:
    """Wait until the proxy has closed this upstream connection; fail if it keeps it."""
    try:
        await asyncio.wait_for(conn.closed.wait(), RAW_BOUND)
    except TimeoutError:
        pytest.fail(f"the proxy kept upstream connection {conn.index} open")


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- keep-alive and the pool bound --------------------------------------------------------------


async def test_keepalive_sequential_requests_share_one_connection(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """20 requests one after another: all answered right, over a single upstream TCP connection."""
    async with RawUpstream(echo_target) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        for i in range(20):
            assert await get(client, f"{proxy.url}/n/{i}") == (200, f"/n/{i}".encode())
    assert len(upstream.connections) == 1
    assert upstream.connections[0].requests == 20
    assert_bearer(upstream)


async def test_pool_bound_max_connections_never_exceeded(make_proxy: Any, client: aiohttp.ClientSession) -> None:
    """max_connections = 2 and 10 concurrent requests: all answered, never more than 2 upstream connections."""
    two_arrived = asyncio.Event()

    async def held(request: Request) -> bool:
        if len(upstream.requests) >= 2:
            two_arrived.set()
        await two_arrived.wait()
        return await echo_target(request)

    async with RawUpstream(held) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url, "max_connections": 2})
        results = await asyncio.gather(*(get(client, f"{proxy.url}/c/{i}") for i in range(10)))
    assert results == [(200, f"/c/{i}".encode()) for i in range(10)]
    assert upstream.max_open == 2
    assert len(upstream.connections) == 2  # kept alive: the 8 others waited for a free connection
    assert len(upstream.requests) == 10


# --- stale and closing connections --------------------------------------------------------------


async def test_stale_connection_closed_while_idle_client_never_sees_it(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """The upstream answers as keep-alive, then closes the idle connection: the next GET, PUT and POST get 200.

    The close has happened before each next request is sent, so even the
    POST (which must never be resent) goes out on a fresh connection.
    """
    bodies: list[bytes] = []

    async def answer_then_close(request: Request) -> bool:
        bodies.append(await request.conn.read_body(request))
        await request.conn.send(answer(request.method.encode() + b" " + request.target.encode()))
        return False  # close right after the answer, which said nothing of closing

    async with RawUpstream(answer_then_close) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        assert await get(client, f"{proxy.url}/warm") == (200, b"GET /warm")
        await upstream.connections[0].closed.wait()
        assert await get(client, f"{proxy.url}/again") == (200, b"GET /again")
        for i, method in enumerate(("PUT", "POST"), start=1):
            await upstream.connections[i].closed.wait()
            async with client.request(method, f"{proxy.url}/thing", data=b"small body " + method.encode()) as resp:
                assert resp.status == 200
                assert await resp.read() == method.encode() + b" /thing"
    assert bodies == [b"", b"", b"small body PUT", b"small body POST"]
    assert [r.conn.index for r in upstream.requests] == [0, 1, 2, 3]
    assert_bearer(upstream)


async def test_stale_connection_closed_as_request_arrives_retried_on_fresh_one(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """The race keep-alive always has: the upstream closes a kept connection just as a GET or PUT goes out on it.

    Each connection answers its first request and drops its second unanswered
    (as a server whose idle timeout fired does). An idempotent request is
    resent on a fresh connection: the client gets 200 and the PUT's body
    arrives whole.
    """
    async with RawUpstream(one_answer_per_connection) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        assert await get(client, f"{proxy.url}/warm") == (200, b"GET /warm")
        assert await get(client, f"{proxy.url}/again") == (200, b"GET /again")
        async with client.put(f"{proxy.url}/thing", data=b"small idempotent body") as resp:
            assert resp.status == 200
            assert await resp.read() == b"PUT /thing"
    assert [(r.target, r.conn.index) for r in upstream.requests] == [
        ("/warm", 0), ("/again", 0), ("/again", 1), ("/thing", 1), ("/thing", 2)
    ]
    answered = [(r.target, r.body) for r in upstream.requests if r.number == 1]
    assert answered == [("/warm", b""), ("/again", b""), ("/thing", b"small idempotent body")]


async def test_get_dropped_on_two_kept_connections_sent_again_once_then_502(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """Two kept-alive connections that each drop their next request unanswered: a GET goes out on one, is sent
    again once on the other, and the client gets 502; it is never sent a third time (on a new connection)."""
    both_warm = asyncio.Event()
    warm = 0

    async def drop_second_requests(request: Request) -> bool:
        nonlocal warm
        if request.number > 1:
            return False  # dropped unanswered, as a server whose idle timeout fired does
        if request.target.startswith("/warm"):
            warm += 1
            if warm == 2:
                both_warm.set()
            await asyncio.wait_for(both_warm.wait(), RAW_BOUND)  # both in flight at once: two connections
        return await echo_target(request)

    async with RawUpstream(drop_second_requests) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        warmed = await asyncio.gather(get(client, f"{proxy.url}/warm1"), get(client, f"{proxy.url}/warm2"))
        assert warmed == [(200, b"/warm1"), (200, b"/warm2")]
        async with client.get(f"{proxy.url}/twice") as resp:
            await assert_proxy_error(resp, 502, "upstream_unreachable")
    assert sorted((r.target, r.conn.index) for r in upstream.requests if r.target == "/twice") == [
        ("/twice", 0),
        ("/twice", 1),
    ]


async def test_post_dropped_unanswered_on_kept_connection_not_resent_gives_502(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A POST the upstream read and then dropped unanswered may have taken effect: never resent (RFC 9110 §9.2.2), 502."""
    async with RawUpstream(one_answer_per_connection) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        assert await get(client, f"{proxy.url}/warm") == (200, b"GET /warm")
        async with client.post(f"{proxy.url}/order", data=b"buy one") as resp:
            await assert_proxy_error(resp, 502, "upstream_unreachable")
        assert await get(client, f"{proxy.url}/next") == (200, b"GET /next")
    assert [(r.method, r.target, r.conn.index) for r in upstream.requests] == [
        ("GET", "/warm", 0),
        ("POST", "/order", 0),
        ("GET", "/next", 1),
    ]


async def test_connection_close_from_upstream_next_request_opens_new_connection(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """Every answer says `Connection: close`: each request gets its own connection, and every one succeeds."""

    async def closing(request: Request) -> bool:
        await request.conn.send(answer(request.target.encode(), headers=("Connection: close",)))
        return False

    async with RawUpstream(closing) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        for i in range(5):
            status, body = await get(client, f"{proxy.url}/r/{i}")
            assert (status, body) == (200, f"/r/{i}".encode())
    assert len(upstream.connections) == 5
    assert [c.requests for c in upstream.connections] == [1] * 5


async def test_http10_answer_without_length_body_until_close_arrives_whole(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """An HTTP/1.0 answer with no Content-Length ends when the upstream closes: the client gets every byte."""
    payload = bytes(range(256)) * 1024  # 256 KiB, sent in pieces

    async def http10(request: Request) -> bool:
        if request.target != "/old":
            return await echo_target(request)
        await request.conn.send(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for i in range(0, len(payload), 65536):
            await request.conn.send(payload[i : i + 65536])
        return False

    async with RawUpstream(http10) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        assert await get(client, f"{proxy.url}/old") == (200, payload)
        assert await get(client, f"{proxy.url}/next") == (200, b"/next")
    assert len(upstream.connections) == 2


# --- answers without a body, interim answers ---------------------------------------------------------


async def test_informational_103_then_200_client_gets_the_200(make_proxy: Any, client: aiohttp.ClientSession) -> None:
    """A 103 Early Hints before the final answer: the client's answer is the 200 and its body; the connection stays usable."""

    async def early_hints(request: Request) -> bool:
        await request.conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n")
        return await echo_target(request)

    async with RawUpstream(early_hints) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        async with client.get(f"{proxy.url}/page") as resp:
            assert resp.status == 200
            assert await resp.read() == b"/page"
        assert await get(client, f"{proxy.url}/next") == (200, b"/next")
    assert len(upstream.connections) == 1


async def test_head_with_content_length_no_body_connection_reused(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """HEAD answered with Content-Length: 1000 and no body: the client sees 200 and that length; the next GET is right."""

    async def head_aware(request: Request) -> bool:
        if request.method == "HEAD":
            await request.conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nX-Head: yes\r\n\r\n")
            return True
        return await echo_target(request)

    async with RawUpstream(head_aware) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        async with client.head(f"{proxy.url}/file") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == "1000"
            assert resp.headers["X-Head"] == "yes"
            assert await resp.read() == b""
        assert await get(client, f"{proxy.url}/next") == (200, b"/next")
    assert [(r.method, r.target) for r in upstream.requests] == [("HEAD", "/file"), ("GET", "/next")]
    assert len(upstream.connections) == 1


async def test_204_and_304_without_body_then_next_request_fine(make_proxy: Any, client: aiohttp.ClientSession) -> None:
    """A 204, then a 304 (which names the representation's length but carries no body), then a 200: all right."""

    async def bodiless(request: Request) -> bool:
        if request.target == "/none":
            await request.conn.send(b"HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n")
        elif request.target == "/cached":
            await request.conn.send(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 10\r\n\r\n')
        else:
            await request.conn.send(answer(b"0123456789"))
        return True

    async with RawUpstream(bodiless) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        async with client.get(f"{proxy.url}/none") as resp:
            assert resp.status == 204
            assert resp.headers["X-Kind"] == "none"
            assert await resp.read() == b""
        async with client.get(f"{proxy.url}/cached", headers={"If-None-Match": '"v1"'}) as resp:
            assert resp.status == 304
            assert resp.headers["ETag"] == '"v1"'
            assert await resp.read() == b""
        assert await get(client, f"{proxy.url}/full") == (200, b"0123456789")
    assert len(upstream.connections) == 1


# --- broken upstreams -----------------------------------------------------------------------------


async def test_garbage_instead_of_status_line_gives_502_next_request_works(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """Bytes that are not HTTP: 502 upstream_unreachable; that connection is dropped and the next request works."""

    async def garbage_once(request: Request) -> bool:
        if request.target != "/garbage":
            return await echo_target(request)
        await request.conn.send(b"SSH-2.0-OpenSSH_9.6\r\nthis is not http\r\n\r\n")
        await request.conn.drain_until_closed()  # a proxy that pooled this connection would hang here
        return False

    async with RawUpstream(garbage_once) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        async with client.get(f"{proxy.url}/garbage") as resp:
            await assert_proxy_error(resp, 502, "upstream_unreachable")
        assert await get(client, f"{proxy.url}/good") == (200, b"/good")
    assert [r.conn.index for r in upstream.requests] == [0, 1]


async def test_upstream_never_answers_gives_504_next_request_works(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """An upstream that accepts and never answers: 504 upstream_timeout after read_timeout; that connection is not reused."""
    hung = asyncio.Event()

    async def silent_once(request: Request) -> bool:
        if request.target != "/hang":
            return await echo_target(request)
        hung.set()
        await request.conn.drain_until_closed()
        return False

    async with RawUpstream(silent_once) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url, "read_timeout": 0.5})
        async with client.get(f"{proxy.url}/hang") as resp:
            await assert_proxy_error(resp, 504, "upstream_timeout")
        assert hung.is_set()
        assert await get(client, f"{proxy.url}/good") == (200, b"/good")
    assert [r.conn.index for r in upstream.requests] == [0, 1]


async def test_connection_refused_gives_502(make_proxy: Any, client: aiohttp.ClientSession) -> None:
    """An upstream port nobody listens on: 502 upstream_unreachable."""
    proxy = await make_proxy(upstream={"url": f"http://127.0.0.1:{closed_port()}"})
    async with client.get(f"{proxy.url}/anything") as resp:
        await assert_proxy_error(resp, 502, "upstream_unreachable")


async def test_early_413_during_large_upload_client_gets_413_and_keeps_its_connection(make_proxy: Any) -> None:
    """The upstream refuses a 4 MiB streamed upload after its head (413, Connection: close), without reading it.

    It then closes its sending side and discards what still comes, as nginx
    does (lingering close). The client gets the 413 while still uploading;
    the proxy reads and drops the rest of the upload (no reset), and the
    client's next request on the same connection works.
    """
    upload = b"u" * (4 * 1024 * 1024)

    async def refuse_uploads(request: Request) -> bool:
        if request.method != "POST":
            return await echo_target(request)
        await request.conn.send(answer(b"too large", "413 Payload Too Large", ("Connection: close",)))
        request.conn.writer.write_eof()
        await request.conn.drain_until_closed()
        return False

    async with RawUpstream(refuse_uploads) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url}, retry={"replay_limit": 65536})
        reader, writer = await open_raw(proxy.url)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: c\r\nContent-Length: %d\r\n\r\n" % len(upload))
        uploading = asyncio.create_task(send_in_pieces(writer, upload))
        try:
            assert await read_answer(reader) == (413, b"too large")
            await uploading  # every byte of the upload was taken: the proxy did not reset the client
            writer.write(b"GET /next HTTP/1.1\r\nHost: c\r\n\r\n")
            assert await read_answer(reader) == (200, b"/next")
        finally:
            uploading.cancel()
            await asyncio.gather(uploading, return_exceptions=True)
            await close_raw(writer)
    assert [r.target for r in upstream.requests] == ["/upload", "/next"]
    assert upstream.requests[0].all(b"content-length") == [str(len(upload)).encode()]


@pytest.mark.parametrize(
    "stray",
    [answer(b"STRAY", "200 Stray"), b"HTTP/1.1 200 Stray\r\n", b"HTT"],
    ids=["whole-answer", "status-line-only", "first-bytes-only"],
)
async def test_extra_answer_after_complete_one_not_relayed_and_connection_not_reused(
    make_proxy: Any, client: aiohttp.ClientSession, stray: bytes, upstream_client: str
) -> None:
    """The upstream sends a second answer (or its first bytes) to one request with the first: the first is
    relayed, the stray one never reaches anybody, and that connection carries no other request."""
    if upstream_client == "session" and not stray.endswith(b"STRAY"):
        pytest.skip("aiohttp's ClientSession keeps a connection whose answer came with the start of another")

    async def doubled(request: Request) -> bool:
        if request.target == "/first":
            await request.conn.send(answer(b"first") + stray)
            return True
        return await echo_target(request)

    async with RawUpstream(doubled) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        assert await get(client, f"{proxy.url}/first") == (200, b"first")
        async with client.get(f"{proxy.url}/second") as resp:
            assert (resp.status, resp.reason) == (200, "OK")
            assert await resp.read() == b"/second"
    assert [(r.target, r.conn.index) for r in upstream.requests] == [("/first", 0), ("/second", 1)]


@pytest.mark.parametrize(
    "stray",
    [answer(b"STRAY", "200 Stray"), b"HTTP/1.1 200 Stray\r\n"],
    ids=["whole-answer", "status-line-only"],
)
async def test_stray_bytes_on_idle_connection_drop_it_every_request_gets_its_own_answer(
    make_proxy: Any, client: aiohttp.ClientSession, stray: bytes
) -> None:
    """Once each answer is complete, the upstream sends stray bytes on the kept-alive connection: the proxy
    closes that connection, and each request after gets its own answer, never the stray nor the one before."""
    answered = asyncio.Event()  # the client has its answer: the connection is idle

    async def stray_after_answer(request: Request) -> bool:
        await request.conn.send(answer(request.target.encode()))
        await asyncio.wait_for(answered.wait(), RAW_BOUND)
        answered.clear()
        await request.conn.send(stray)
        return True  # and read on: only the proxy may close this connection

    async with RawUpstream(stray_after_answer) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        for i in range(4):
            assert await get(client, f"{proxy.url}/c{i}") == (200, f"/c{i}".encode())
            answered.set()
            await closed_by_proxy(upstream.connections[i])
    assert [(r.target, r.conn.index) for r in upstream.requests] == [(f"/c{i}", i) for i in range(4)]


async def test_stray_answer_in_the_read_that_ends_a_body_never_reaches_the_next_request(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A stray answer that arrives with the last bytes of a body whose head came earlier is not kept for
    the next request: that connection is closed and the next request gets its own answer."""
    rest = asyncio.Event()

    async def stray_with_body_end(request: Request) -> bool:
        if request.target != "/first":
            return await echo_target(request)
        await request.conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        await asyncio.wait_for(rest.wait(), RAW_BOUND)
        await request.conn.send(b"-last" + answer(b"STRAY", "200 Stray"))
        return True

    async with RawUpstream(stray_with_body_end) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        async with client.get(f"{proxy.url}/first") as resp:
            assert await asyncio.wait_for(resp.content.readexactly(5), RAW_BOUND) == b"first"
            rest.set()
            assert await asyncio.wait_for(resp.read(), RAW_BOUND) == b"-last"
        await closed_by_proxy(upstream.connections[0])
        for i in range(3):
            assert await get(client, f"{proxy.url}/next/{i}") == (200, f"/next/{i}".encode())
    assert [(r.target, r.conn.index) for r in upstream.requests] == [
        ("/first", 0),
        ("/next/0", 1),
        ("/next/1", 1),
        ("/next/2", 1),
    ]


# --- answers that cannot be relayed ---------------------------------------------------------------


async def refused_then_next_answered(proxy_url: str, target: bytes) -> None:
    """GET `target` on a raw client connection: 502 upstream_unreachable; then `/next` on the same connection
    is answered (the refusal did not cost the client its connection)."""
    reader, writer = await open_raw(proxy_url)
    try:
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: c\r\n\r\n")
        status, body = await read_answer(reader)
        assert status == 502
        assert json.loads(body)["error"] == "upstream_unreachable"
        writer.write(b"GET /next HTTP/1.1\r\nHost: c\r\n\r\n")
        assert await read_answer(reader) == (200, b"/next")
    finally:
        await close_raw(writer)


@pytest.mark.parametrize(
    ("status_line", "header", "where"),
    [
        (b"200 OK", b"X-Bad: s3kr1t\x01value", "header X-Bad"),
        (b"200 OK", b"X-Bad: s3kr1t\x7fvalue", "header X-Bad"),
        (b"200 s3kr1t\x1bOK", b"X-Fine: 1", "the reason phrase"),
    ],
    ids=["value-0x01", "value-0x7f", "reason-phrase"],
)
async def test_control_character_in_upstream_head_gives_502_client_connection_kept(
    make_proxy: Any, caplog: pytest.LogCaptureFixture, status_line: bytes, header: bytes, where: str
) -> None:
    """A control character in an upstream header value or reason phrase is the upstream's fault: 502
    upstream_unreachable (not 500), one log line naming where (never the value), and the client's
    connection carries its next request."""

    async def bad_head(request: Request) -> bool:
        if not request.target.startswith("/bad"):
            return await echo_target(request)
        await request.conn.send(b"HTTP/1.1 " + status_line + b"\r\n" + header + b"\r\nContent-Length: 2\r\n\r\nok")
        return True

    async with RawUpstream(bad_head) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        await refused_then_next_answered(proxy.url, b"/bad?q=1")
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenproxy.forward"]
    assert lines == [f"upstream answer to GET /bad refused: a control character in {where}"]
    assert not [r for r in caplog.records if "s3kr1t" in r.getMessage()]
    assert not [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelname == "ERROR"]


async def test_control_character_in_a_later_read_of_the_head_gives_502_naming_the_header(
    make_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A head whose control character arrives in a read of its own, after the start of the head: the same 502,
    and the log line still names the header (the head is read again from its first byte, not from that read)."""

    async def split_head(request: Request) -> bool:
        if not request.target.startswith("/bad"):
            return await echo_target(request)
        await request.conn.send_read_apart(b"HTTP/1.1 200 OK\r\nX-Fine: 1\r\nX-Bad: s3kr1t")
        await request.conn.send(b"\x01value\r\nContent-Length: 2\r\n\r\nok")
        return True

    async with RawUpstream(split_head) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        await refused_then_next_answered(proxy.url, b"/bad")
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenproxy.forward"]
    assert lines == ["upstream answer to GET /bad refused: a control character in header X-Bad"]
    assert not [r for r in caplog.records if "s3kr1t" in r.getMessage()]


@pytest.mark.parametrize(
    ("framing", "sent_body", "kept"),
    [
        (b"Content-Length: 2 \t", b"ok", True),
        (b"Transfer-Encoding: gzip,\tChunked  ", b"2\r\nok\r\n0\r\n\r\n", True),
        (b"Content-Length: 2\r\nConnection: close \t", b"ok", False),
        (b"Content-Length: 2\r\nConnection: keep-alive ", b"ok", True),
    ],
    ids=["length", "chunked", "close", "keep-alive"],
)
async def test_framing_values_with_whitespace_after_them_are_read_as_without(
    make_proxy: Any, client: aiohttp.ClientSession, framing: bytes, sent_body: bytes, kept: bool
) -> None:
    """llhttp keeps the whitespace after a header value: Content-Length, Transfer-Encoding and Connection are
    still read as the upstream meant them (the body relayed whole, the connection kept or closed as it says)."""

    async def spaced(request: Request) -> bool:
        if request.target != "/spaced":
            return await echo_target(request)
        await request.conn.send(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n" + sent_body)
        return True  # and read on: only the proxy may close this connection

    async with RawUpstream(spaced) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        assert await get(client, f"{proxy.url}/spaced") == (200, b"ok")
        if not kept:
            await closed_by_proxy(upstream.connections[0])
        assert await get(client, f"{proxy.url}/next") == (200, b"/next")
    assert [(r.target, r.conn.index) for r in upstream.requests] == [("/spaced", 0), ("/next", 0 if kept else 1)]


async def test_transfer_encoding_chunked_with_a_tab_after_it_refused_at_once(
    make_proxy: Any, client: aiohttp.ClientSession, upstream_client: str
) -> None:
    """`Transfer-Encoding: chunked<TAB>` is chunked by RFC 9110 (a tab is whitespace) but not by llhttp, which
    would read the body until the close: 502 upstream_unreachable at once, not an answer relayed wrong or held
    until the read timeout; the next request gets its own answer on a new connection."""
    if upstream_client == "session":
        pytest.skip("aiohttp's ClientSession reads such a body until the close (llhttp's reading)")

    async def tabbed(request: Request) -> bool:
        if request.target != "/tabbed":
            return await echo_target(request)
        await request.conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\t\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        return True  # and read on: only the proxy may close this connection

    async with RawUpstream(tabbed) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url, "read_timeout": 60.0})
        async with asyncio.timeout(RAW_BOUND), client.get(f"{proxy.url}/tabbed") as resp:
            await assert_proxy_error(resp, 502, "upstream_unreachable")
        await closed_by_proxy(upstream.connections[0])
        assert await get(client, f"{proxy.url}/next") == (200, b"/next")
    assert [(r.target, r.conn.index) for r in upstream.requests] == [("/tabbed", 0), ("/next", 1)]


async def test_transfer_encoding_not_ending_in_chunked_read_until_the_close(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A last transfer coding that only ends in the letters of chunked (`xchunked`) is not chunked: the answer's
    body runs until the upstream closes, and the client gets it whole."""

    async def not_chunked(request: Request) -> bool:
        await request.conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        return False  # closes: the end of this body

    async with RawUpstream(not_chunked) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        assert await get(client, f"{proxy.url}/x") == (200, b"2\r\nok\r\n0\r\n\r\n")


async def test_control_character_in_401_passed_through_gives_502(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A 401 the proxy would hand back unchanged (its token is too young to renew) with a control character
    in a header: 502 upstream_unreachable, not 500."""

    async def rejects(request: Request) -> bool:
        await request.conn.send(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nno"
        )
        return True

    async with RawUpstream(rejects) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url}, token={"min_refresh_interval": 300.0})
        async with client.get(f"{proxy.url}/guarded") as resp:
            await assert_proxy_error(resp, 502, "upstream_unreachable")
    assert len(upstream.requests) == 1


async def test_control_character_in_401_then_resent_answer_relayed(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A 401 with a control character in a header is never relayed, so it does not stop the refresh: the
    resent request's good answer reaches the client."""

    async def rejects_first(request: Request) -> bool:
        if len(upstream.requests) == 1:
            await request.conn.send(
                b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nno"
            )
            return True
        return await echo_target(request)

    async with RawUpstream(rejects_first) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        assert await get(client, f"{proxy.url}/guarded") == (200, b"/guarded")
    assert [r.target for r in upstream.requests] == ["/guarded", "/guarded"]
    first, second = (r.all(b"authorization") for r in upstream.requests)
    assert first != second


# --- what the upstream reads ------------------------------------------------------------------------


async def test_host_header_is_upstreams_authority(make_proxy: Any, client: aiohttp.ClientSession) -> None:
    """The upstream sees one Host, its own `127.0.0.1:<port>`, whatever Host the client sent."""
    async with RawUpstream(echo_target) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        assert await get(client, f"{proxy.url}/h", headers={"Host": "client.example:8443"}) == (200, b"/h")
        assert await get(client, f"{proxy.url}/h2") == (200, b"/h2")
    for request in upstream.requests:
        assert request.all(b"host") == [upstream.authority.encode()]


async def test_request_head_utf8_value_and_repeated_headers_arrive_byte_for_byte_in_order(make_proxy: Any) -> None:
    """A UTF-8 header value and two `X-Dup` lines reach the upstream as the same bytes, in the client's order."""
    sent = [
        (b"X-First", b"1"),
        (b"X-Utf8", "caf\u00e9 \u2713 \u20ac".encode()),
        (b"X-Dup", b"one"),
        (b"x-between", b"mid"),
        (b"X-Dup", b"two"),
    ]
    async with RawUpstream(echo_target) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        reader, writer = await open_raw(proxy.url)
        try:
            lines = b"".join(name + b": " + value + b"\r\n" for name, value in sent)
            writer.write(b"GET /bytes HTTP/1.1\r\nHost: client.example\r\n" + lines + b"Connection: close\r\n\r\n")
            await writer.drain()
            reply = await asyncio.wait_for(reader.read(), RAW_BOUND)
        finally:
            await close_raw(writer)
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert reply.endswith(b"\r\n\r\n/bytes")
    (request,) = upstream.requests
    assert request.head.startswith(b"GET /bytes HTTP/1.1\r\n")
    proxy_own = {b"host", b"authorization", b"content-length"}
    assert [(k, v) for k, v in request.headers if k.lower() not in proxy_own] == sent
    for name, value in sent:
        assert b"\r\n" + name + b": " + value + b"\r\n" in request.head


async def test_body_until_close_cut_by_a_reset_reaches_client_cut_not_complete(
    make_proxy: Any, client: aiohttp.ClientSession, upstream_client: str
) -> None:
    """An answer framed by the connection's end (no length, not chunked) is complete when the upstream
    closes; when it resets the connection mid-body instead, the client's answer is broken off too.

    A clean close after such a body still ends it normally (checked first).
    """
    if upstream_client == "session":
        pytest.skip("aiohttp's ClientSession counts a reset after a body framed by the close as its end")
    reset = asyncio.Event()

    async def until_close(request: Request) -> bool:
        await request.conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 1000)
        if request.target == "/reset":
            await asyncio.wait_for(reset.wait(), RAW_BOUND)  # the client has the head: the relay is under way
            sock = request.conn.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.conn.writer.transport.abort()  # linger 0: a reset, not a close
        return False  # otherwise: close cleanly, which ends the body

    async with RawUpstream(until_close) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        assert await get(client, f"{proxy.url}/close") == (200, b"x" * 1000)
        async with client.get(f"{proxy.url}/reset") as resp:
            assert resp.status == 200
            reset.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(resp.read(), RAW_BOUND)


async def test_small_sized_answer_still_arriving_streams_on(make_proxy: Any, client: aiohttp.ClientSession) -> None:
    """A small answer with a Content-Length whose body is still arriving is not held back until it is
    whole: its first bytes reach the client while the upstream waits to send the rest."""
    rest = asyncio.Event()

    async def in_two_parts(request: Request) -> bool:
        await request.conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        await asyncio.wait_for(rest.wait(), RAW_BOUND)
        await request.conn.send(b"-last")
        return True

    async with RawUpstream(in_two_parts) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        async with client.get(f"{proxy.url}/slow") as resp:
            assert resp.headers["Content-Length"] == "10"
            assert await asyncio.wait_for(resp.content.readexactly(5), RAW_BOUND) == b"first"
            rest.set()
            assert await asyncio.wait_for(resp.read(), RAW_BOUND) == b"-last"

"""The proxy port's own HTTP/1.x server: framing and keep-alive as clients see them, slow and vanishing clients.

HTTP/1.0 clients get keep-alive only when they ask, and close-delimited
answers when the length is unknown; HEAD answers carry the length and no
body; a client that stops reading holds a bounded number of bytes in the
proxy; a client that leaves mid-upload is logged as 499, mid-download with the status it got.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.helpers import (
    BOTH_LOOPS,
    RAW_BOUND,
    close_raw,
    open_raw,
    parse_response,
    read_one_answer,
    read_to_eof,
)

on_both_loops = pytest.mark.asyncio(loop_factories=BOTH_LOOPS)


async def access_lines(caplog: pytest.LogCaptureFixture, path: str) -> list[str]:
    """The access lines for `path`, waiting (bounded) until at least one is written."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RAW_BOUND
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "tokenproxy.access" and path in r.getMessage()]
        if lines or loop.time() > deadline:
            return lines
        await asyncio.sleep(0.02)


@on_both_loops
async def test_server_http10_keep_alive_asked_for_is_kept(make_proxy: Any) -> None:
    """An HTTP/1.0 client that asks for keep-alive gets `Connection: keep-alive` and a second answer on it."""
    proxy = await make_proxy()
    reader, writer = await open_raw(proxy.url)
    try:
        answers = []
        for path in (b"/echo/one", b"/echo/two"):
            writer.write(b"GET %s HTTP/1.0\r\nHost: c\r\nConnection: keep-alive\r\n\r\n" % path)
            answers.append(parse_response(await read_one_answer(reader)))
    finally:
        await close_raw(writer)
    assert [a.status for a in answers] == [200, 200]
    assert answers[0].all("Connection") == ["keep-alive"]
    assert [a.json()["raw_path"] for a in answers] == ["/echo/one", "/echo/two"]


@on_both_loops
@pytest.mark.parametrize(
    "headers",
    [b"Host: c\r\nConnection: keep-alive\r\n", b"Host: c\r\n", b""],
    ids=["keep-alive", "no-connection-header", "no-headers"],
)
async def test_server_http10_answer_of_unknown_length_is_close_delimited(make_proxy: Any, headers: bytes) -> None:
    """An answer without a length goes to an HTTP/1.0 client unchunked, ended by closing the connection; also
    without a Connection header (the version is then told from llhttp's keep-alive verdict)."""
    proxy = await make_proxy()
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(b"GET /download/200000 HTTP/1.0\r\n" + headers + b"\r\n")
        data = await read_to_eof(reader)
    finally:
        await close_raw(writer)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0].startswith(b"http/1.1 200")
    assert b"connection: close" in lines
    assert not any(line.startswith((b"transfer-encoding", b"content-length")) for line in lines)
    assert body == (bytes(range(256)) * 256 * 4)[:200000]


@on_both_loops
async def test_server_http10_without_keep_alive_is_closed_after_answer(make_proxy: Any) -> None:
    """A plain HTTP/1.0 request gets its answer with its length, then the connection closes."""
    proxy = await make_proxy()
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(b"GET /echo/plain HTTP/1.0\r\nHost: c\r\n\r\n")
        data = await read_to_eof(reader)
    finally:
        await close_raw(writer)
    resp = parse_response(data)
    assert resp.status == 200 and resp.json()["raw_path"] == "/echo/plain"
    assert resp.all("Connection") == ["close"]


@on_both_loops
async def test_server_head_answer_has_length_no_body_connection_kept(make_proxy: Any) -> None:
    """HEAD gets the upstream's Content-Length and no body bytes; the next request on the connection is served."""
    proxy = await make_proxy()
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(b"HEAD /echo/head HTTP/1.1\r\nHost: c\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_BOUND)
        writer.write(b"GET /echo/after HTTP/1.1\r\nHost: c\r\n\r\n")
        after = parse_response(await read_one_answer(reader))
    finally:
        await close_raw(writer)
    lines = head.lower().split(b"\r\n")
    assert lines[0].startswith(b"http/1.1 200")
    lengths = [line for line in lines if line.startswith(b"content-length: ")]
    assert len(lengths) == 1 and int(lengths[0].split(b":")[1]) > 0
    assert after.status == 200 and after.json()["raw_path"] == "/echo/after"  # no stray body bytes in between


class EndlessUpstream:
    """A bare HTTP/1.1 upstream that answers with a chunked body of `total` bytes, counting what it got to send."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.url = ""
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> EndlessUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        block = b"b" * 65536
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while self.sent < self.total:
                writer.write(b"%x\r\n%s\r\n" % (len(block), block))
                await writer.drain()
                self.sent += len(block)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def settled(read: Any) -> int:
    """The value `read()` stops changing at (polled every 0.2 s, bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RAW_BOUND
    last = -1
    while loop.time() < deadline:
        now = read()
        if now == last:
            return int(now)
        last = now
        await asyncio.sleep(0.2)
    return int(read())


@on_both_loops
async def test_server_slow_reader_holds_bounded_bytes_then_gets_everything(make_proxy: Any) -> None:
    """A client that stops reading stops the upstream too (the proxy buffers a bounded amount); then all arrives."""
    total = 96 * 1024 * 1024
    async with EndlessUpstream(total) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url})
        reader, writer = await open_raw(proxy.url)
        try:
            writer.write(b"GET /big HTTP/1.1\r\nHost: c\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_BOUND)
            assert head.startswith(b"HTTP/1.1 200 ")
            stalled_at = await settled(lambda: upstream.sent)
            # Socket buffers on both sides of the proxy hold a few MiB; the proxy itself holds little.
            assert stalled_at < 32 * 1024 * 1024, stalled_at
            received = 0
            while True:
                line = await asyncio.wait_for(reader.readuntil(b"\r\n"), RAW_BOUND)
                size = int(line.strip(), 16)
                await asyncio.wait_for(reader.readexactly(size + 2), RAW_BOUND)
                if size == 0:
                    break
                received += size
        finally:
            await close_raw(writer)
    assert received == total


async def test_server_client_gone_mid_download_logged_with_status_sent(make_proxy: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A client that leaves in the middle of a streamed answer: its access line gives the status it got, once."""
    caplog.set_level(logging.INFO, logger="tokenproxy.access")
    proxy = await make_proxy()
    reader, writer = await open_raw(proxy.url)
    writer.write(b"GET /endless HTTP/1.1\r\nHost: c\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_BOUND)
    assert await asyncio.wait_for(reader.read(65536), RAW_BOUND)
    writer.transport.abort()
    lines = await access_lines(caplog, "/endless")
    # The status line went out before the client left; the access line tells what the client got: 200.
    assert len(lines) == 1 and " 200 " in lines[0], lines


async def test_server_client_gone_mid_upload_logged_as_499(
    make_proxy: Any, api: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that leaves in the middle of a streamed upload, before any answer: its access line says 499."""
    caplog.set_level(logging.INFO, logger="tokenproxy.access")
    proxy = await make_proxy(retry={"replay_limit": 1024})
    _, writer = await open_raw(proxy.url)
    writer.write(b"PUT /upload HTTP/1.1\r\nHost: c\r\nContent-Length: 10000000\r\n\r\n" + b"u" * 65536)
    await writer.drain()
    await asyncio.wait_for(api.upload_started.wait(), RAW_BOUND)
    writer.transport.abort()
    lines = await access_lines(caplog, "/upload")
    assert len(lines) == 1 and " 499 " in lines[0], lines


async def test_server_upgrade_with_body_gets_400_nothing_forwarded(make_proxy: Any, upstream: Any) -> None:
    """A request asking to Upgrade with a body (whose bytes llhttp would read as the next request): 400, nothing sent."""
    proxy = await make_proxy(upstream={"url": upstream.url})
    smuggled = b"GET /echo/smuggled HTTP/1.1\r\nHost: c\r\n\r\n"
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(
            b"POST /echo/front HTTP/1.1\r\nHost: c\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
        )
        data = await read_to_eof(reader)
    finally:
        await close_raw(writer)
    resp = parse_response(data)
    assert resp.status == 400 and resp.all("X-Tokenproxy-Error") == ["bad_request"]
    assert b"HTTP/1.1 200" not in resp.rest
    assert upstream.requests == 0


async def test_server_upgrade_without_body_forwarded_plain_next_request_served(make_proxy: Any) -> None:
    """A GET asking to Upgrade is forwarded as a plain request (Upgrade is hop-by-hop); the connection carries on."""
    proxy = await make_proxy()
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(
            b"GET /echo/up HTTP/1.1\r\nHost: c\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"GET /echo/next HTTP/1.1\r\nHost: c\r\n\r\n"
        )
        first = parse_response(await read_one_answer(reader))
        second = parse_response(await read_one_answer(reader))
    finally:
        await close_raw(writer)
    assert first.status == 200 and first.json()["raw_path"] == "/echo/up"
    assert "upgrade" not in {name.lower() for name, _ in first.json()["headers"]}
    assert second.status == 200 and second.json()["raw_path"] == "/echo/next"

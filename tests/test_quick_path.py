"""The forwarder's quick path, seen from the client: a bodiless request on a kept-alive upstream connection.

Such a request is sent and, when its answer comes whole, answered in
callbacks; whatever needs waiting goes on in the connection's coroutine. The
client sees one behaviour either way: an answer that arrives in pieces
streams, a refresh status is renewed and resent, a client that leaves is
logged as 499 and its upstream exchange dropped, and a shutdown lets the
request under way finish. Every test first warms the upstream connection,
so the request under test is one the quick path takes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.helpers import RAW_BOUND, close_raw, open_raw, parse_response, raw_exchange, read_one_answer


async def _warm(proxy_url: str) -> None:
    """One answered request: the proxy now holds an idle kept-alive connection to the API."""
    answer = await raw_exchange(proxy_url, b"GET /echo/warm HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert answer.status == 200


async def _held(
    proxy_url: str, path: bytes, entered: asyncio.Event
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection that sent `GET path`, once the API has the request (`entered`, an event of the fake)."""
    reader, writer = await open_raw(proxy_url)
    try:
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: c\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(entered.wait(), RAW_BOUND)
    except BaseException:
        await close_raw(writer)
        raise
    return reader, writer


async def _access_lines(caplog: pytest.LogCaptureFixture, path: str) -> list[str]:
    """The access lines for `path`, once there is one (polled up to RAW_BOUND)."""
    deadline = asyncio.get_running_loop().time() + RAW_BOUND
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "tokenproxy.access" and path in r.getMessage()]
        if lines or asyncio.get_running_loop().time() > deadline:
            return lines
        await asyncio.sleep(0.01)


async def test_quick_answer_arriving_in_pieces_streams_then_connection_serves_next(make_proxy: Any, api: Any) -> None:
    """An answer whose body is still arriving after its head streams to the client as it comes; the client
    connection then carries the next request."""
    proxy = await make_proxy()
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(b"GET /echo/first HTTP/1.1\r\nHost: c\r\n\r\n")
        assert parse_response(await read_one_answer(reader)).status == 200
        writer.write(b"GET /sse HTTP/1.1\r\nHost: c\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_BOUND)
        assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
        first = await asyncio.wait_for(reader.readuntil(b"data: first\n\n\r\n"), RAW_BOUND)
        assert first.endswith(b"data: first\n\n\r\n")
        api.sse_gate.set()
        rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), RAW_BOUND)
        assert b"data: second\n\n" in rest
        writer.write(b"GET /echo/next HTTP/1.1\r\nHost: c\r\n\r\n")
        after = parse_response(await read_one_answer(reader))
    finally:
        await close_raw(writer)
    assert after.status == 200 and after.json()["raw_path"] == "/echo/next"


async def test_quick_refresh_status_renewed_and_resent_once(make_proxy: Any, api: Any, token_server: Any) -> None:
    """A 401 to a request on a kept-alive connection: one refresh, the request resent, the client gets 200."""
    proxy = await make_proxy()
    await _warm(proxy.url)
    calls = len(token_server.calls)
    api.expire_all(list(token_server.issued_access))
    answer = await raw_exchange(proxy.url, b"GET /echo/again HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert answer.status == 200 and answer.json()["raw_path"] == "/echo/again"
    assert len(token_server.calls) == calls + 1
    assert api.tokens_seen[-1] == token_server.issued_access[-1] != api.tokens_seen[-2]


async def test_quick_client_leaving_before_answer_logged_499_and_next_request_served(
    make_proxy: Any, api: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that leaves while its request waits for the upstream: one access line with 499; the upstream
    exchange is dropped and later requests are served."""
    caplog.set_level(logging.INFO, logger="tokenproxy.access")
    proxy = await make_proxy()
    await _warm(proxy.url)
    _, writer = await _held(proxy.url, b"/hang", api.hang_entered)
    await close_raw(writer)
    lines = await _access_lines(caplog, "/hang")
    assert len(lines) == 1 and " 499 " in lines[0], lines
    for path in (b"/echo/one", b"/echo/two"):
        answer = await raw_exchange(proxy.url, b"GET " + path + b" HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
        assert answer.status == 200


async def test_quick_shutdown_lets_request_under_way_finish(make_proxy: Any, api: Any) -> None:
    """A shutdown while a request waits for its upstream answer: the listener closes, the request still gets
    its whole answer, then the shutdown completes."""
    proxy = await make_proxy(server={"shutdown_timeout": RAW_BOUND})
    await _warm(proxy.url)
    reader, writer = await _held(proxy.url, b"/gated", api.gated_entered)
    try:
        stopping = asyncio.ensure_future(proxy.stop())
        deadline = asyncio.get_running_loop().time() + RAW_BOUND
        while True:  # the listener closes first
            try:
                _, probe = await open_raw(proxy.url)
            except OSError:
                break
            await close_raw(probe)
            assert asyncio.get_running_loop().time() < deadline, "the listener never closed"
            await asyncio.sleep(0.01)
        # Then the request under way is waited for: released only once the shutdown reached it.
        connections = proxy.runner.server.connections
        while not all(connection.shutting_down for connection in connections):
            assert asyncio.get_running_loop().time() < deadline, "the shutdown never reached the connection"
            await asyncio.sleep(0.01)
        assert not stopping.done()
        api.gate.set()
        answer = parse_response(await read_one_answer(reader))
        await asyncio.wait_for(stopping, RAW_BOUND)
    finally:
        await close_raw(writer)
    assert answer.status == 200 and answer.json() == {"gated": True}

"""The proxy port's HTTP/1.1 handling at the edges any server under the forwarder must keep.

Pipelined requests with bodies are answered in order, a client that half-closes
while its answer is pending counts as gone (nginx's 499: TCP cannot tell a
half-close from a client that left, and a client that leaves must free its
place), and a chunked body that ends mid-chunk forwards nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import pytest

from tests.helpers import RAW_BOUND, close_raw, open_raw, parse_response, raw_exchange, read_one_answer


async def test_server_pipelined_post_bodies_answered_in_order(make_proxy: Any) -> None:
    """Two POSTs with bodies and a GET written at once are each forwarded with their own body, answered in order."""
    proxy = await make_proxy()
    pipelined = (
        b"POST /upload HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\n\r\nfirst"
        b"POST /upload HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecond\r\n0\r\n\r\n"
        b"GET /echo/third HTTP/1.1\r\nHost: c\r\n\r\n"
    )
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(pipelined)
        await writer.drain()
        answers = [parse_response(await read_one_answer(reader)) for _ in range(3)]
    finally:
        await close_raw(writer)
    assert [a.status for a in answers] == [200, 200, 200]
    assert answers[0].json()["sha256"] == hashlib.sha256(b"first").hexdigest()
    assert answers[1].json()["sha256"] == hashlib.sha256(b"second").hexdigest()
    assert answers[2].json()["raw_path"] == "/echo/third"


async def test_server_client_half_closes_while_answer_pending_is_gone(
    make_proxy: Any, api: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that shuts its sending side while its answer is pending counts as gone (as with nginx): 499, no answer."""
    caplog.set_level(logging.INFO, logger="tokenproxy.access")
    proxy = await make_proxy()
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(b"GET /hang HTTP/1.1\r\nHost: c\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(api.hang_entered.wait(), RAW_BOUND)
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), RAW_BOUND)
    finally:
        await close_raw(writer)
    assert rest == b""
    after = await raw_exchange(proxy.url, b"GET /echo/after HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert after.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenproxy.access" and "/hang" in r.getMessage()]
    assert len(lines) == 1 and " 499 " in lines[0], lines


async def test_server_chunked_body_ends_mid_chunk_nothing_forwarded(
    make_proxy: Any, api: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunked upload whose client leaves in the middle of a chunk reaches no upstream; the proxy serves on."""
    caplog.set_level(logging.INFO, logger="tokenproxy.access")
    proxy = await make_proxy()
    reader, writer = await open_raw(proxy.url)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
    await writer.drain()
    writer.write_eof()
    rest = await asyncio.wait_for(reader.read(), RAW_BOUND)
    await close_raw(writer)
    assert not api.upload_started.is_set()
    # Either nothing (the client is gone) or the proxy's own JSON 400: never an upstream's answer.
    if rest:
        assert parse_response(rest).status == 400
    after = await raw_exchange(proxy.url, b"GET /echo/after HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
    assert after.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenproxy.access" and "/upload" in r.getMessage()]
    assert len(lines) == 1 and (" 499 " in lines[0] or " 400 " in lines[0]), lines

"""A request body cannot hold the proxy: a stalled upload times out, and the bodies kept for a resend are bounded.

`server.body_timeout` ends a body that stops arriving while the proxy reads
it (408, or a cut connection once the answer has begun), whether the body
was being kept for a resend or already streamed upstream, and never while
the proxy itself holds the client back. `retry.replay_memory` bounds the
bytes all kept bodies hold together: beyond it a body streams instead, so
its 401 is passed through rather than replayed. Real HTTP over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

import aiohttp
import pytest

from proxy.runtime.app import FORWARDER
from tests.fakes.api_server import FakeApi
from tests.fakes.counting_upstream import CountingUpstream
from tests.fakes.raw_upstream import RawUpstream, Request, answer
from tests.fakes.token_server import FakeTokenServer, until
from tests.helpers import (
    BOTH_LOOPS,
    RAW_BOUND,
    RawResponse,
    assert_proxy_error,
    close_raw,
    no_tracebacks,
    open_raw,
    parse_response,
    raw_exchange,
    read_to_eof,
)

on_both_loops = pytest.mark.asyncio(loop_factories=BOTH_LOOPS)

REPLAY_LIMIT = 65536

# (what the test shows, the head, the body bytes sent before the client stalls)
STALLS = [
    (
        "kept for a resend",
        b"POST /echo/stalled HTTP/1.1\r\nHost: c\r\nContent-Length: 60000\r\n\r\n",
        b"k" * 1000,
    ),
    (
        "streamed, Content-Length",
        b"POST /upload HTTP/1.1\r\nHost: c\r\nContent-Length: 1048576\r\n\r\n",
        b"s" * 1000,
    ),
    (
        "streamed, chunked",
        b"POST /upload HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"%x\r\n%b\r\n" % (REPLAY_LIMIT + 1000, b"c" * (REPLAY_LIMIT + 1000)),
    ),
]


async def served_once_free(url: str) -> RawResponse:
    """A plain request on a new connection, tried until a connection place is free (bounded)."""
    for _ in range(50):  # each attempt is a full exchange; a freed place shows within a few
        resp = await raw_exchange(url, b"GET /echo/after HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
        if resp.status != 503:
            return resp
    return resp


@on_both_loops
@pytest.mark.parametrize(("case", "head", "sent"), STALLS, ids=[case for case, _, _ in STALLS])
async def test_stalled_body_gets_408_and_frees_its_connection(
    make_proxy: Any, upstream: CountingUpstream, caplog: pytest.LogCaptureFixture, case: str, head: bytes, sent: bytes
) -> None:
    """A body that stops arriving gets 408 after server.body_timeout and its connection is closed, which frees its place.

    With max_connections = 1 the stalled upload holds the only place (another
    client gets 503) until the time limit ends it; then a new client is served.
    """
    proxy = await make_proxy(
        upstream={"url": upstream.url},
        server={"body_timeout": 0.5, "max_connections": 1},
        retry={"replay_limit": REPLAY_LIMIT},
    )
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(head + sent)  # and then nothing
        await writer.drain()
        refused = await raw_exchange(proxy.url, b"GET /echo/other HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
        assert refused.status == 503  # the stalled upload holds the only place meanwhile
        data = await read_to_eof(reader)
    finally:
        await close_raw(writer)
    resp = parse_response(data)
    assert_proxy_error(resp.status, resp.all, resp.body, 408, "request_timeout")
    assert resp.all("Connection") == ["close"]

    after = await served_once_free(proxy.url)
    assert after.status == 200
    assert after.json()["raw_path"] == "/echo/after"
    if case == "kept for a resend":
        assert upstream.hosts == [upstream.authority]  # only the request after it was forwarded
    stalled = [r.getMessage() for r in caplog.records if "server.body_timeout" in r.getMessage()]
    assert len(stalled) == 1 and "answered 408" in stalled[0]
    assert [r.getMessage() for r in caplog.records if r.name == "tokenproxy.access" and " 408 " in r.getMessage()]
    no_tracebacks(caplog)


@on_both_loops
async def test_stalled_body_after_the_answer_began_cuts_the_connection(
    make_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An upload that stalls while its answer is already streaming back: the connection is cut, no 408 after the 200."""

    async def answer_at_once(request: Request) -> bool:
        await request.conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await request.conn.drain_until_closed()  # takes the streamed body; the answer never ends
        return False

    async with RawUpstream(answer_at_once) as upstream:
        proxy = await make_proxy(
            upstream={"url": upstream.url}, server={"body_timeout": 0.5}, retry={"replay_limit": REPLAY_LIMIT}
        )
        reader, writer = await open_raw(proxy.url)
        try:
            writer.write(b"POST /upload HTTP/1.1\r\nHost: c\r\nContent-Length: 1048576\r\n\r\n" + b"u" * 1000)
            data = await read_to_eof(reader)
        finally:
            await close_raw(writer)
        # The upload is abandoned upstream too: its connection is closed, not pooled.
        await asyncio.wait_for(upstream.connections[0].closed.wait(), RAW_BOUND)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"hello" in data
    assert b"request_timeout" not in data and not data.endswith(b"0\r\n\r\n")  # cut, not completed
    stalled = [r.getMessage() for r in caplog.records if "server.body_timeout" in r.getMessage()]
    assert len(stalled) == 1 and "answered 408" not in stalled[0]
    no_tracebacks(caplog)


@on_both_loops
async def test_body_not_timed_while_the_proxy_holds_the_client_back(make_proxy: Any) -> None:
    """A streamed upload whose upstream takes nothing for several body_timeouts still arrives whole.

    The proxy stops reading the client (flow control) while it cannot pass
    the body on; the client is not to blame for that silence.
    """
    size = 8 * 1024 * 1024
    body = bytes(range(256)) * (size // 256)

    async def slow_taker(request: Request) -> bool:
        await asyncio.sleep(2.0)  # four body_timeouts without reading a byte
        got = await request.conn.read_body(request)
        reply = json.dumps({"length": len(got), "sha256": hashlib.sha256(got).hexdigest()}).encode()
        await request.conn.send(answer(reply))
        return True

    async with RawUpstream(slow_taker) as upstream:
        proxy = await make_proxy(
            upstream={"url": upstream.url}, server={"body_timeout": 0.5}, retry={"replay_limit": REPLAY_LIMIT}
        )
        reader, writer = await open_raw(proxy.url)
        try:
            writer.write(b"POST /upload HTTP/1.1\r\nHost: c\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % size)
            writer.write(body)
            await asyncio.wait_for(writer.drain(), RAW_BOUND)
            data = await read_to_eof(reader)
        finally:
            await close_raw(writer)
    resp = parse_response(data)
    assert resp.status == 200, data[:300]
    assert resp.json() == {"length": size, "sha256": hashlib.sha256(body).hexdigest()}


async def _warm_then_hold(proxy: Any, client: aiohttp.ClientSession) -> tuple[Any, asyncio.StreamWriter]:
    """A first request (a token), then an upload announcing 60 000 bytes that keeps them held from the start."""
    memory = proxy.app[FORWARDER]._memory
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    _, writer = await open_raw(proxy.url)
    writer.write(b"POST /echo/held HTTP/1.1\r\nHost: c\r\nContent-Length: 60000\r\n\r\n" + b"h" * 1000)
    await writer.drain()
    await until(lambda: memory.held == 60_000)  # 40 000 of the 100 000 are left
    return memory, writer


@on_both_loops
async def test_replay_memory_full_body_waits_for_room_then_is_kept_and_resent(
    make_proxy: Any, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """A body within replay_limit that does not fit in retry.replay_memory waits; once room is given back it is
    kept after all, so its 401 is resent after the refresh instead of passed through."""
    proxy = await make_proxy(retry={"replay_limit": REPLAY_LIMIT, "replay_memory": 100_000})
    memory, holder = await _warm_then_hold(proxy, client)
    body = b"b" * 50_000
    api.expire_all(token_server.issued_access)
    try:
        upload = asyncio.ensure_future(client.post(f"{proxy.url}/echo/upload", data=body))
        await until(lambda: len(memory._waiting) == 1)
        assert api.requests == 1  # it waits before anything goes upstream
    finally:
        await close_raw(holder)  # the held upload ends: its 60 000 bytes are given back
    async with await asyncio.wait_for(upload, RAW_BOUND) as resp:
        assert resp.status == 200
        assert (await resp.json())["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert token_server.count == 2  # the 401, a refresh, the resend
    await until(lambda: memory.held == 0)


@on_both_loops
async def test_replay_memory_held_by_a_trickling_upload_body_streams_after_the_wait_its_401_passed_through(
    make_proxy: Any, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """While an upload that trickles (never stalls for body_timeout) holds retry.replay_memory, a further body
    waits body_timeout for room, then is streamed: not replayable, its 401 goes back to the client."""
    proxy = await make_proxy(
        server={"body_timeout": 0.5}, retry={"replay_limit": REPLAY_LIMIT, "replay_memory": 100_000}
    )
    memory, holder = await _warm_then_hold(proxy, client)

    async def trickle() -> None:
        for _ in range(1000):  # bounded: one byte every 0.1 s, well inside body_timeout
            holder.write(b"t")
            await asyncio.sleep(0.1)

    dripping = asyncio.ensure_future(trickle())
    try:
        api.expire_all(token_server.issued_access)
        async with client.post(f"{proxy.url}/echo/upload", data=b"b" * 50_000) as resp:
            assert resp.status == 401  # streamed: the client gets the upstream's 401
        assert memory.held == 60_000  # still the trickling upload's
    finally:
        dripping.cancel()
        await close_raw(holder)
    await until(lambda: memory.held == 0)


async def test_replay_memory_taken_back_when_a_kept_body_breaks_off(
    make_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A body kept for a resend whose chunking breaks off malformed gets 400 and leaves nothing held."""
    proxy = await make_proxy(retry={"replay_limit": REPLAY_LIMIT})
    memory = proxy.app[FORWARDER]._memory
    resp = await raw_exchange(
        proxy.url,
        b"POST /echo/bad HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"a\r\n0123456789\r\nzz\r\n",
    )
    assert_proxy_error(resp.status, resp.all, resp.body, 400, "bad_request")
    assert memory.held == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_config_body_timeout_and_replay_memory_defaults_and_checks() -> None:
    """body_timeout defaults to 30 s and replay_memory to 32 MiB; a body_timeout of 0 or a negative replay_memory is refused by key."""
    from proxy.config import ConfigError, parse_config

    base = {"upstream": {"url": "http://a"}, "token": {"grant": "static", "access_token": "t"}}
    config = parse_config(base, {})
    assert (config.server.body_timeout, config.retry.replay_memory) == (30.0, 32 * 1024 * 1024)
    with pytest.raises(ConfigError) as caught:
        parse_config({**base, "server": {"body_timeout": 0}, "retry": {"replay_memory": -1}}, {})
    assert caught.value.problems == [
        "server.body_timeout: must be greater than 0, got 0.0",
        "retry.replay_memory: must not be negative, got -1",
    ]

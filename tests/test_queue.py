"""The bounded waiting queue, observed through the real proxy: full, timed out, and a client that leaves."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import FakeTokenServer, until


async def assert_proxy_error(resp: aiohttp.ClientResponse, code: str, *, retry_after: bool = True) -> None:
    """The answer is tokenproxy's own 503 with `code` in the header and the JSON body."""
    assert resp.status == 503
    assert resp.headers["X-Tokenproxy-Error"] == code
    assert resp.content_type == "application/json"
    body = json.loads(await resp.read())
    assert body["error"] == code and body["detail"]
    if retry_after:
        assert int(resp.headers["Retry-After"]) >= 1


def handler_tasks(proxy: Any) -> list[asyncio.Task[Any]]:
    """Unfinished tasks serving a connection or request of this proxy's server."""
    server = proxy.runner.server
    found = []
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)
        owner = frame.f_locals.get("self") if frame is not None else None
        if getattr(owner, "_manager", None) is server and not task.done():
            found.append(task)
    return found


async def test_queue_full_next_request_gets_503_at_once(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """With max_waiting requests waiting for a held token call, one more gets 503 queue_full at once."""
    proxy = await make_proxy(queue={"max_waiting": 3})
    token_server.gate = asyncio.Event()
    waiting = [asyncio.create_task(client.get(f"{proxy.url}/echo/{i}")) for i in range(3)]
    await until(lambda: proxy.tokens.waiting == 3)

    async with client.get(f"{proxy.url}/echo/extra") as resp:
        await assert_proxy_error(resp, "queue_full")
    assert not token_server.gate.is_set()  # answered while the token call was still held

    token_server.gate.set()
    for task in waiting:
        async with await task as resp:
            assert resp.status == 200
    assert token_server.count == 1


async def test_queue_full_during_401_refresh_newcomer_gets_503(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """The bound holds while an expired token is being replaced: the request beyond it gets queue_full."""
    proxy = await make_proxy(queue={"max_waiting": 2})
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    api.expire_all(token_server.issued_access)
    token_server.gate = asyncio.Event()
    waiting = [asyncio.create_task(client.get(f"{proxy.url}/echo/{i}")) for i in range(2)]
    await until(lambda: proxy.tokens.waiting == 2)

    async with client.get(f"{proxy.url}/echo/extra") as resp:
        await assert_proxy_error(resp, "queue_full")

    token_server.gate.set()
    for task in waiting:
        async with await task as resp:
            assert resp.status == 200
    assert token_server.count == 2


async def test_queue_wait_longer_than_wait_timeout_gets_503(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """A request that waits longer than queue.wait_timeout for a token gets 503 queue_timeout."""
    proxy = await make_proxy(queue={"wait_timeout": 0.3})
    token_server.gate = asyncio.Event()

    async with client.get(f"{proxy.url}/echo/slow") as resp:
        await assert_proxy_error(resp, "queue_timeout")
    assert proxy.tokens.waiting == 0
    token_server.gate.set()


async def test_queue_client_disconnect_while_waiting_frees_place(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """A client that hangs up while waiting gives its place back and leaves no handler task behind."""
    proxy = await make_proxy(queue={"max_waiting": 1})
    token_server.gate = asyncio.Event()
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /echo/leaving HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    await until(lambda: proxy.tokens.waiting == 1)
    assert handler_tasks(proxy)

    writer.close()
    await writer.wait_closed()
    await until(lambda: proxy.tokens.waiting == 0 and not handler_tasks(proxy))

    following = asyncio.create_task(client.get(f"{proxy.url}/echo/next"))
    await until(lambda: proxy.tokens.waiting == 1)  # the one place was free for it
    token_server.gate.set()
    async with await following as resp:
        assert resp.status == 200
    assert token_server.count == 1

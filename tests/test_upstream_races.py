"""Races around the upstream connections and the listener, each once a bug, each proven through the real proxy.

Every test that starts a proxy runs with each `upstream.client` (conftest's
`upstream_client`); the session client is the reference behaviour. Upstreams
are bare asyncio servers on 127.0.0.1 (tests/fakes/raw_upstream.py). Tests
synchronise on events and on loop turns (`until`), never on sleeps; the only
time bound is the one that turns a hang into a failure. Each docstring
describes the bug as it was found in review (fixed in 4c10f17 and the commit
that added this file).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import socket
import warnings
from typing import Any

import aiohttp
from yarl import URL

from proxy.config import Config
from proxy.runtime.app import METRICS
from proxy.runtime.reload import apply_reload
from tests.fakes.raw_upstream import RawUpstream, Request, answer
from tests.fakes.token_server import FakeClock, FakeTokenServer, until

# A request the proxy should answer at once is given this long before it counts as hung.
HANG_BOUND = 10.0


async def echo_target(request: Request) -> bool:
    """A well-behaved keep-alive upstream: the body names the target it was asked for."""
    await request.conn.send(answer(request.target.encode()))
    return True


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    """GET `url`: the status and the whole body."""
    async with client.get(url) as resp:
        return resp.status, await resp.read()


def reload_to(proxy: Any, current: Config, url: str) -> Config:
    """SIGHUP with `upstream.url` changed to `url`, as the proxy's reload does it; the new config."""
    new = dataclasses.replace(current, upstream=dataclasses.replace(current.upstream, url=url))
    apply_reload(proxy.app, current, new)
    return new


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel whatever is still pending and wait for it, so a failed test leaves nothing behind."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- the pool across a reload that moves the upstream --------------------------------------------


async def test_reload_to_other_upstream_request_waiting_for_old_pool_is_still_served(
    make_proxy: Any, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """A request queued for a connection to the old upstream when a reload moves it is still answered.

    max_connections = 2: two requests hold both connections to the old
    upstream and a third waits for one. A reload points the proxy elsewhere
    and a request goes there (which closes the old pool). When the two held
    answers end, the waiting request must get a connection; the fast pool
    never hands a freed place to a waiter once closed, so it hangs.
    """
    release = asyncio.Event()

    async def hold_first_two(request: Request) -> bool:
        if request.conn.index < 2:
            await release.wait()
        return await echo_target(request)

    tasks: list[asyncio.Task[Any]] = []
    async with RawUpstream(hold_first_two) as old, RawUpstream(echo_target) as new:
        clock = FakeClock()
        proxy = await make_proxy(clock=clock, upstream={"url": old.url, "max_connections": 2})
        try:
            # All three wait for the first token, then reach the pool in one loop turn: two connect, one queues.
            token_server.gate = asyncio.Event()
            tasks = [asyncio.create_task(get(client, f"{proxy.url}/old/{i}")) for i in range(3)]
            await until(lambda: proxy.tokens.waiting == 3)
            token_server.gate.set()
            await until(lambda: len(old.requests) == 2)

            reload_to(proxy, proxy.config, new.url)
            # The request to the new upstream waits for a token too, so we know when it reached the client.
            token_server.gate = asyncio.Event()
            clock.advance(10**6)
            tasks.append(asyncio.create_task(get(client, f"{proxy.url}/new")))
            await until(lambda: proxy.tokens.waiting == 1)
            token_server.gate.set()
            await until(lambda: proxy.tokens.waiting == 0)

            release.set()
            results = await asyncio.wait_for(asyncio.gather(*tasks), HANG_BOUND)
        finally:
            release.set()
            await cancel_all(tasks)
    assert results == [(200, b"/old/0"), (200, b"/old/1"), (200, b"/old/2"), (200, b"/new")]
    assert sorted(r.target for r in old.requests) == ["/old/0", "/old/1", "/old/2"]


async def test_reload_away_and_back_connections_are_kept_alive_again(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """Reload to another upstream while a request is in flight, then back: requests share one connection again.

    The fast client closes the first origin's pool on the first switch but
    keeps it (busy) in its table; the switch back finds that closed pool and
    uses it for good: no connection is ever kept alive again, and a request
    that has to wait for one would never get it.
    """
    release = asyncio.Event()

    async def hold(request: Request) -> bool:
        if request.target == "/hold":
            await release.wait()
        return await echo_target(request)

    async with RawUpstream(hold) as first, RawUpstream(echo_target) as second:
        proxy = await make_proxy(upstream={"url": first.url, "max_connections": 2})
        held = asyncio.create_task(get(client, f"{proxy.url}/hold"))
        try:
            await until(lambda: len(first.requests) == 1)
            config = reload_to(proxy, proxy.config, second.url)
            assert await get(client, f"{proxy.url}/elsewhere") == (200, b"/elsewhere")
            release.set()
            assert await held == (200, b"/hold")
            reload_to(proxy, config, first.url)
            for i in range(3):
                assert await get(client, f"{proxy.url}/back/{i}") == (200, f"/back/{i}".encode())
        finally:
            release.set()
            await cancel_all([held])
    back = [r.conn.index for r in first.requests if r.target.startswith("/back/")]
    assert len(set(back)) == 1, f"each request after the reload back opened its own connection: {back}"


async def test_resend_after_reload_to_old_upstream_leaves_new_upstreams_connections_alone(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A request begun before a reload is resent (after a 401) to its old upstream: the new one's pool is untouched.

    `FastClient._pool_for` treats any origin a request names as the current
    one: the straggler's resend re-creates the old origin's pool and closes
    the new origin's (its kept-alive connection is dropped, and its busy
    ones would be counted in a second pool: max_connections no longer holds).
    """
    release = asyncio.Event()

    async def rejects_first(request: Request) -> bool:
        if request.target == "/old" and request.conn.index == 0 and request.number == 1:
            await release.wait()
            await request.conn.send(
                answer(b"expired", "401 Unauthorized", ('WWW-Authenticate: Bearer error="invalid_token"',))
            )
            return True
        return await echo_target(request)

    async with RawUpstream(rejects_first) as first, RawUpstream(echo_target) as second:
        proxy = await make_proxy(upstream={"url": first.url})
        old = asyncio.create_task(get(client, f"{proxy.url}/old"))
        try:
            await until(lambda: len(first.requests) == 1)
            reload_to(proxy, proxy.config, second.url)
            assert await get(client, f"{proxy.url}/new/0") == (200, b"/new/0")
            release.set()
            assert await old == (200, b"/old")  # resent, with a new token, to the upstream it started with
            assert await get(client, f"{proxy.url}/new/1") == (200, b"/new/1")
        finally:
            release.set()
            await cancel_all([old])
    assert [r.target for r in first.requests] == ["/old", "/old"]
    news = [r.conn.index for r in second.requests]
    assert news == [0, 0], f"the new upstream's kept-alive connection was closed by the resend: {news}"


# --- the read timer -------------------------------------------------------------------------------------


async def test_answer_begun_during_a_stalled_upload_then_silent_times_out(make_proxy: Any) -> None:
    """The upstream answers a streamed upload early, stops reading it, and then goes silent mid-answer.

    read_timeout must still end the exchange (the client's answer is cut):
    aiohttp's session re-arms sock_read on every byte received. The fast
    client starts its timer only once the whole body is sent, which never
    happens here: the relay waits forever.
    """
    silence = asyncio.Event()  # set when the test is over

    async def never_reads(request: Request) -> bool:
        await request.conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await silence.wait()  # neither reads the upload nor sends the rest of the answer
        return False

    size = 64 * 1024 * 1024  # more than the kernel buffers between the proxy and an upstream that never reads
    async with RawUpstream(never_reads) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url, "read_timeout": 0.5}, retry={"replay_limit": 1024})
        url = URL(proxy.url)
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: c\r\nContent-Length: %d\r\n\r\n" % size)
        uploading = asyncio.create_task(_send_all(writer, size))
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_BOUND)
            assert head.startswith(b"HTTP/1.1 200 ")
            # After read_timeout of silence the proxy gives up and cuts the connection, short of the 100 bytes.
            received = await asyncio.wait_for(_read_until_cut(reader), HANG_BOUND)
        finally:
            silence.set()
            uploading.cancel()
            await asyncio.gather(uploading, return_exceptions=True)
            writer.close()
    assert received == b"partial"


async def test_upstream_that_stops_reading_an_upload_and_times_out_does_not_keep_its_pool_place(
    make_proxy: Any,
) -> None:
    """max_connections = 1: after a timeout on a connection whose upload the upstream stopped reading, the next request is served.

    The timed-out connection is closed with `transport.close()`, which waits
    to flush the upload still buffered: the upstream never reads it, so
    `connection_lost` never comes, and the fast pool frees a place only
    there. (aiohttp's connector frees it when the response is closed.) The
    upload is far larger than the kernel buffers, which it fills well within
    read_timeout; a pipe not yet full when the timer fires would only hide
    the bug, never fail a correct pool.
    """
    silence = asyncio.Event()  # set when the test is over

    async def never_reads_uploads(request: Request) -> bool:
        if request.method != "POST":
            return await echo_target(request)
        await request.conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await silence.wait()  # neither reads the upload nor sends the rest of the answer
        return False

    size = 64 * 1024 * 1024
    async with RawUpstream(never_reads_uploads) as upstream:
        proxy = await make_proxy(
            upstream={"url": upstream.url, "read_timeout": 1.0, "max_connections": 1}, retry={"replay_limit": 1024}
        )
        url = URL(proxy.url)
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: c\r\nContent-Length: %d\r\n\r\n" % size)
        uploading = asyncio.create_task(_send_all(writer, size))
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_BOUND)
            assert await asyncio.wait_for(_read_until_cut(reader), HANG_BOUND) == b"partial"
            async with aiohttp.ClientSession() as other:
                result = await asyncio.wait_for(get(other, f"{proxy.url}/next"), HANG_BOUND)
        finally:
            silence.set()
            uploading.cancel()
            await asyncio.gather(uploading, return_exceptions=True)
            writer.close()
    assert result == (200, b"/next")


async def _read_until_cut(reader: asyncio.StreamReader) -> bytes:
    """Everything until the peer closes or resets the connection (a reset is how a cut upload often ends)."""
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            received += chunk
    return received


async def _send_all(writer: asyncio.StreamWriter, size: int) -> None:
    """Write `size` bytes 64 KiB at a time, waiting for the peer to take each piece (it may never take them all)."""
    piece = b"u" * 65536
    with contextlib.suppress(ConnectionError):
        for _ in range(size // len(piece)):
            writer.write(piece)
            await writer.drain()


# --- a client that leaves while its upstream connection is being made ------------------------------------


class _HookedUpstream:
    """A keep-alive echo upstream whose accept runs a hook in the very loop turn the proxy's connect completes.

    It accepts from its own reader callback (asyncio's servers accept a turn
    later, in a task), so a test can act at an exact point of the proxy's
    `create_connection`.
    """

    def __init__(self, on_first_accept: Any) -> None:
        self._on_first_accept = on_first_accept
        self._listen = socket.socket()
        self._listen.bind(("127.0.0.1", 0))
        self._listen.listen()
        self._listen.setblocking(False)
        self.url = f"http://127.0.0.1:{self._listen.getsockname()[1]}"
        self.accepted = 0
        self.first_closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        asyncio.get_running_loop().add_reader(self._listen.fileno(), self._accept)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listen.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.accepted += 1
            if self.accepted == 1:
                self._on_first_accept()
            task = asyncio.get_running_loop().create_task(self._serve(conn, self.accepted))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, number: int) -> None:
        reader, writer = await asyncio.open_connection(sock=conn)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(answer(head.split(b" ", 2)[1]))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            if number == 1:
                self.first_closed.set()

    async def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._listen.fileno())
        self._listen.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_client_leaving_as_the_upstream_connection_is_made_keeps_the_pool_bound(
    make_proxy: Any, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """max_connections = 1: a handler cancelled inside `create_connection`, after `connection_made`, is counted once.

    The client hangs up in the loop turn the proxy's connect completes; its
    handler is cancelled after the transport called `connection_made` and
    before `create_connection` returned. `_Pool._connect` gives the place
    back, and so does `forget()` when that transport's loss is reported:
    `_open` ends at -1, and two requests then get two connections.
    """
    leaving: list[socket.socket] = []

    def hang_up() -> None:
        leaving[0].close()  # FIN now: seen by the proxy's next select

    upstream = _HookedUpstream(hang_up)
    try:
        clock = FakeClock()
        proxy = await make_proxy(clock=clock, upstream={"url": upstream.url, "max_connections": 1})
        await proxy.tokens.get()  # the token is in: the next request goes straight to the pool
        url = URL(proxy.url)
        leaving.append(socket.create_connection((url.host, url.port)))
        leaving[0].sendall(b"GET /leaving HTTP/1.1\r\nHost: c\r\n\r\n")
        await asyncio.wait_for(upstream.first_closed.wait(), HANG_BOUND)
        await until(lambda: proxy.tokens.waiting == 0)

        # Two requests reach the pool in one loop turn (both wait for a token first): one connects, one waits.
        token_server.gate = asyncio.Event()
        clock.advance(10**6)
        tasks = [asyncio.create_task(get(client, f"{proxy.url}/after/{i}")) for i in range(2)]
        try:
            await until(lambda: proxy.tokens.waiting == 2)
            token_server.gate.set()
            results = await asyncio.wait_for(asyncio.gather(*tasks), HANG_BOUND)
        finally:
            await cancel_all(tasks)
    finally:
        await upstream.close()
    assert sorted(results) == [(200, b"/after/0"), (200, b"/after/1")]
    assert upstream.accepted == 2, f"{upstream.accepted - 1} connections for two requests with max_connections = 1"


# --- a client that leaves while the proxy reads a refresh-status answer ------------------------------


async def test_client_leaving_while_401_body_is_read_frees_the_upstream_connection(
    make_proxy: Any, client: aiohttp.ClientSession, caplog: Any
) -> None:
    """The client hangs up while the proxy reads a 401's body (to keep it for a resend): that connection is freed.

    max_connections = 1 and a 401 whose body the upstream never finishes.
    `Forwarder._keep_rejection` has no cleanup for cancellation, so the
    FastAnswer is neither released nor closed: its pool place is held until
    read_timeout (here an hour), and the next request waits for it.
    """

    async def stalled_401(request: Request) -> bool:
        if request.target != "/denied":
            return await echo_target(request)
        await request.conn.send(b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await request.conn.drain_until_closed()
        return False

    async with RawUpstream(stalled_401) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url, "max_connections": 1, "read_timeout": 3600.0})
        assert await get(client, f"{proxy.url}/warm") == (200, b"/warm")  # the token is in, the connection idle
        url = URL(proxy.url)
        _, writer = await asyncio.open_connection(url.host, url.port)
        try:
            writer.write(b"GET /denied HTTP/1.1\r\nHost: c\r\n\r\n")
            # The 401's head is in: the handler is inside _keep_rejection, waiting for the rest of the body.
            await until(lambda: b"tokenproxy_upstream_latency_seconds_count 2.0" in proxy.app[METRICS].render())
        finally:
            writer.close()
        await until(lambda: any(getattr(r, "status", None) == 499 for r in caplog.records))
        result = await asyncio.wait_for(get(client, f"{proxy.url}/next"), HANG_BOUND)
    assert result == (200, b"/next")


# --- the listener ------------------------------------------------------------------------------------


async def test_listener_closed_with_a_handshake_not_yet_started_closes_that_socket(make_proxy: Any) -> None:
    """Shutdown right after the listener accepted a connection: its socket is closed, not left to the GC.

    `_BatchListener.close` cancels the `connect_accepted_socket` tasks; one
    that has not run yet never wraps its socket in a transport, so nothing
    closes the accepted fd: the garbage collector does, with a ResourceWarning.
    """
    proxy = await make_proxy()
    url = URL(proxy.url)
    listener = next(iter(proxy.runner.sites))._server
    client = socket.create_connection((url.host, url.port))  # completed by the kernel, waits in the backlog
    try:
        await until(lambda: bool(listener._handshakes))  # accepted; its task has not run yet
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await proxy.stop()
            gc.collect()
        leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert not leaked, leaked
    finally:
        client.close()


# --- a kept-alive connection that closes as it is handed over -------------------------------------------


async def test_post_handed_a_connection_the_upstream_just_closed_is_sent_on_a_new_one(
    make_proxy: Any, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """max_connections = 1, two POSTs: the upstream answers each and closes (as an idle timeout would, unannounced).

    The first POST's connection is handed to the waiting one while the
    upstream's FIN is being processed: its transport is closing, not yet
    lost. Nothing was sent on it, so the POST must go out on a new
    connection; `exchange` reports it as "closed unanswered" instead, and a
    POST may not be resent: 502.
    """

    async def answer_then_close(request: Request) -> bool:
        await request.conn.read_body(request)
        await request.conn.send(answer(request.target.encode()))
        return False

    async with RawUpstream(answer_then_close) as upstream:
        proxy = await make_proxy(upstream={"url": upstream.url, "max_connections": 1})
        token_server.gate = asyncio.Event()

        async def post(target: str) -> tuple[int, bytes]:
            async with client.post(f"{proxy.url}{target}", data=b"body") as resp:
                return resp.status, await resp.read()

        tasks = [asyncio.create_task(post(f"/p/{i}")) for i in range(2)]
        try:
            await until(lambda: proxy.tokens.waiting == 2)
            token_server.gate.set()  # both reach the pool in one loop turn: one connects, one waits
            results = await asyncio.wait_for(asyncio.gather(*tasks), HANG_BOUND)
        finally:
            await cancel_all(tasks)
    assert sorted(results) == [(200, b"/p/0"), (200, b"/p/1")]
    assert sorted(r.target for r in upstream.requests) == ["/p/0", "/p/1"]

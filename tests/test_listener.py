"""The proxy's listener takes every connection waiting in the accept queue each time it is woken."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from yarl import URL

BURST = 50


async def test_listener_one_wake_up_accepts_the_whole_queue_and_serves_each(make_proxy: Any) -> None:
    """50 clients whose connections wait in the kernel's queue: one wake-up takes all 50, each is then served.

    The clients connect while the event loop is not running (the kernel
    completes their handshakes into the listen backlog), so the listener's
    first readiness sees all of them. A listener that takes one connection
    per loop turn (uvloop's own) would have taken 1 here.
    """
    proxy = await make_proxy()
    url = URL(proxy.url)
    listener = next(iter(proxy.runner.sites))._server
    clients = [socket.create_connection((url.host, url.port)) for _ in range(BURST)]
    try:
        listener._accept(listener.sockets[0])  # what one readiness event runs
        assert len(listener._handshakes) == BURST
        for sock in clients:
            sock.setblocking(False)
        readers = [await asyncio.open_connection(sock=sock) for sock in clients]
        for i, (_, writer) in enumerate(readers):
            writer.write(f"GET /echo/burst-{i} HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n".encode())
        heads = [await asyncio.wait_for(reader.readuntil(b"\r\n"), 10) for reader, _ in readers]
        assert heads == [b"HTTP/1.1 200 OK\r\n"] * BURST
        for _, writer in readers:
            writer.close()
    finally:
        for sock in clients:
            sock.close()

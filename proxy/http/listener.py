"""The proxy's TCP listener: every connection waiting in the accept queue is taken at once.

Owns: the listening sockets and the accept loop. uvloop (libuv since 1.45)
accepts one connection per turn of the event loop; under load a turn takes
milliseconds, so a burst of new clients (a fleet starting, a refresh storm,
1 000 connections at once) waited seconds in the kernel's queue and hit
their timeouts. This site accepts up to `backlog` connections each time the
socket is ready, on any loop, and hands each to the server's protocol
through `loop.connect_accepted_socket`. Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from typing import Any

from aiohttp import web

logger = logging.getLogger("tokenproxy.server")

# Out of file descriptors (or kernel memory): stop accepting this long, as asyncio does.
_ACCEPT_RETRY_DELAY = 1.0
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _BatchListener:
    """Listening sockets whose every readiness accepts all waiting connections (up to a batch)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket], factory: Any, batch: int
    ) -> None:
        self.sockets = tuple(sockets)
        self._loop = loop
        self._factory = factory
        self._batch = batch
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._closed = False
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self._batch):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    # A connection that failed while queued (EPROTO, ENETDOWN, ...): the next one may be fine.
                    logger.debug("accept failed (%s)", exc.strerror)
                    continue
                logger.warning("cannot accept connections (%s); pausing for %.0f s", exc.strerror, _ACCEPT_RETRY_DELAY)
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(_ACCEPT_RETRY_DELAY, self._resume, sock)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
            self._handshakes.add(task)
            task.add_done_callback(functools.partial(self._handed_over, conn))

    def _handed_over(self, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        self._handshakes.discard(task)
        if task.cancelled():
            conn.close()  # never became a transport: nothing else will close it
        elif task.exception() is not None:
            conn.close()
            logger.debug("a new connection failed before its first byte (%s)", type(task.exception()).__name__)

    def _resume(self, sock: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and close the listening sockets; connections already open carry on."""
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        for task in self._handshakes:
            task.cancel()


class BatchAcceptSite(web.BaseSite):
    """An aiohttp site on `host:port` (every address it resolves to) that accepts in batches."""

    __slots__ = ("_host", "_port", "_reuse_port")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, *, backlog: int = 128, reuse_port: bool = False
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port  # workers: several processes accept on the one port (Linux balances)

    @property
    def name(self) -> str:
        """The URL it listens on, for aiohttp's messages."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        """Bind, listen and start accepting; OSError when the address cannot be used."""
        await super().start()
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self._reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(self._backlog)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        self._server = _BatchListener(loop, sockets, self._runner.server, self._backlog)  # type: ignore[assignment]

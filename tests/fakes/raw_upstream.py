"""A bare HTTP/1.1 upstream on 127.0.0.1, for tests that need byte-level control of the answers.

Every TCP connection the proxy opens is one `Conn`. The server reads request
heads off it and hands each one to the test's script, which writes whatever
bytes it likes (a valid answer, two answers, garbage, nothing) and says
whether to go on reading that connection. It counts connections (in total,
open now, most open at once) and sets an event when it has closed one, so
tests synchronise on events, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Self

# Bound on any one read the fake makes, so a test that goes wrong fails instead of hanging.
READ_BOUND = 10.0


@dataclass
class Request:
    """One request head as it came off the wire, and the connection it came on."""

    conn: Conn
    head: bytes
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]  # raw (name, value) pairs, in order, repeats kept
    number: int  # 1 for the first request on its connection
    body: bytes | None = None  # once read with Conn.read_body

    def all(self, name: bytes) -> list[bytes]:
        """Every value of header `name` (case-insensitive), in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass(eq=False)
class Conn:
    """One TCP connection from the proxy."""

    index: int  # 0 for the first connection the upstream accepted
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: int = 0  # request heads read on this connection
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # set once the upstream closed its side

    async def send(self, data: bytes) -> None:
        """Write bytes and wait until they are handed to the kernel."""
        self.writer.write(data)
        await self.writer.drain()

    async def send_read_apart(self, data: bytes) -> None:
        """Write bytes and wait until the proxy has read them off its socket, so that what is sent next
        reaches it as a read of its own (Linux: its socket's receive queue in /proc/net/tcp is empty)."""
        await self.send(data)
        ours = self.writer.get_extra_info("sockname")
        theirs = self.writer.get_extra_info("peername")
        wanted = (_proc_address(theirs), _proc_address(ours))
        deadline = asyncio.get_running_loop().time() + READ_BOUND
        while True:
            if _receive_queues(wanted) == [0]:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the proxy did not read {len(data)} bytes within {READ_BOUND} s")
            await asyncio.sleep(0.001)  # polling the kernel's table, with the deadline above

    async def read_body(self, request: Request) -> bytes:
        """Read the request's body, framed by Content-Length or chunked; also kept as `request.body`."""
        request.body = await self._read_body(request)
        return request.body

    async def _read_body(self, request: Request) -> bytes:
        if any(b"chunked" in v.lower() for v in request.all(b"transfer-encoding")):
            body = bytearray()
            while True:
                size = int((await self._bounded(self.reader.readuntil(b"\r\n"))).split(b";")[0], 16)
                body += await self._bounded(self.reader.readexactly(size + 2))
                if size == 0:
                    return bytes(body[:-2])
                del body[-2:]
        lengths = request.all(b"content-length")
        return await self._bounded(self.reader.readexactly(int(lengths[0]))) if lengths else b""

    async def drain_until_closed(self) -> int:
        """Read and discard everything until the proxy closes the connection; how many bytes came."""
        total = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await self.reader.read(65536):
                total += len(chunk)
        return total

    @staticmethod
    async def _bounded(read: Awaitable[bytes]) -> bytes:
        return await asyncio.wait_for(read, READ_BOUND)


def _receive_queues(connection: tuple[str, str]) -> list[int]:
    """The unread bytes of each IPv4 socket whose (local, remote) addresses are `connection`, from the kernel's
    table (a read of /proc: instant, nothing to wait for)."""
    with open("/proc/net/tcp", encoding="ascii") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return [int(row[4].split(":")[1], 16) for row in rows if (row[1], row[2]) == connection]


def _proc_address(address: tuple[str, int]) -> str:
    """An IPv4 address as /proc/net/tcp writes it: the address's four bytes read as one number of this machine's
    byte order, then the port, in hex."""
    host, port = address[0], address[1]
    packed = bytes(int(part) for part in host.split("."))
    return f"{int.from_bytes(packed, sys.byteorder):08X}:{port:04X}"


# Handles one request: writes the answer (or not); True to read the next request on the connection.
Script = Callable[[Request], Awaitable[bool]]


def answer(body: bytes = b"", status: str = "200 OK", headers: tuple[str, ...] = (), version: str = "1.1") -> bytes:
    """A complete answer with a Content-Length (unless `headers` frame it otherwise)."""
    lines = [f"HTTP/{version} {status}", *headers]
    if not any(h.lower().startswith(("content-length:", "transfer-encoding:")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawUpstream:
    """An asyncio server on 127.0.0.1 that runs `script` for every request head it reads."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections: list[Conn] = []
        self.requests: list[Request] = []
        self.open = 0
        self.max_open = 0
        self.url = ""
        self.authority = ""
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.authority = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        self.url = f"http://{self.authority}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.connections:
            conn.writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=READ_BOUND)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Conn(len(self.connections), reader, writer)
        self.connections.append(conn)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            for _ in range(10_000):  # bounded: requests on one connection
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                conn.requests += 1
                request = _parse(conn, head)
                self.requests.append(request)
                if not await self.script(request):
                    return
        except ConnectionError:
            return
        finally:
            self.open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            conn.closed.set()
            self._tasks.discard(task)


def _parse(conn: Conn, head: bytes) -> Request:
    lines = head[:-4].split(b"\r\n")
    method, target, _ = lines[0].decode("latin-1").split(" ", 2)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return Request(conn, head, method, target, headers, conn.requests)

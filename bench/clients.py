"""The bench's own HTTP clients, for what wrk cannot do.

Owns: opening many connections first and sending one request on each at
the same instant (the refresh storm), holding keep-alive connections idle
(memory), and one-request streaming of a large download or upload with a
byte count (streaming). Every wait is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import http.client
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Answer:
    """What one request of a storm got: the status (0 = no answer) and when, from the start."""

    status: int
    seconds: float


async def _read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked); return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    if "content-length" in fields:
        await reader.readexactly(int(fields["content-length"]))
    elif "chunked" in fields.get("transfer-encoding", "").lower():
        for _ in range(1_000_000):
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                for _ in range(100):  # trailer fields, up to the blank line
                    if await reader.readuntil(b"\r\n") == b"\r\n":
                        break
                break
            await reader.readexactly(size + 2)
    elif status not in (204, 304):
        await reader.read()  # no framing: the body ends with the connection
    return status


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_connections(host: str, port: int, count: int, parallel: int = 200, timeout: float = 30.0) -> list[Conn]:
    """Open `count` TCP connections, at most `parallel` handshakes at a time (so no listen backlog overflows)."""
    gate = asyncio.Semaphore(parallel)

    async def one() -> Conn:
        async with gate:
            return await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout)

    return list(await asyncio.gather(*(one() for _ in range(count))))


def _request(host: str, port: int, path: str, close: bool) -> bytes:
    connection = "close" if close else "keep-alive"
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: {connection}\r\n\r\n".encode()


async def storm(conns: list[Conn], host: str, port: int, path: str, timeout: float) -> list[Answer]:
    """Send one request on every connection at once; each answer's status and its time from the start."""
    request = _request(host, port, path, close=False)
    started = time.perf_counter()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Answer:
        try:
            status = await asyncio.wait_for(_read_answer(reader), timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError):
            status = 0
        return Answer(status, time.perf_counter() - started)

    for _, writer in conns:
        writer.write(request)
    return list(await asyncio.gather(*(one(r, w) for r, w in conns)))


async def one_request_each(conns: list[Conn], host: str, port: int, path: str, timeout: float) -> int:
    """One keep-alive request per connection, the connections left open; how many got a 200."""
    answers = await storm(conns, host, port, path, timeout)
    return sum(1 for answer in answers if answer.status == 200)


async def close_all(conns: list[Conn]) -> None:
    """Close every connection."""
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)


# -- streaming (blocking: one big transfer at a time) -------------------------


@dataclass(frozen=True)
class Transfer:
    """A finished streaming request: bytes moved, seconds taken, the final status."""

    nbytes: int
    seconds: float
    status: int

    @property
    def mb_per_s(self) -> float:
        """Throughput in MB/s (10^6 bytes)."""
        return self.nbytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def download(url: str, timeout: float) -> Transfer:
    """GET `url` and read the whole body into a reused buffer; time from request to last byte."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    buffer = memoryview(bytearray(CHUNK))
    total = 0
    try:
        started = time.perf_counter()
        conn.request("GET", parts.path)
        response = conn.getresponse()
        for _ in range(1 << 40):  # bounded by the body's end and the socket timeout
            got = response.readinto(buffer)
            if not got:
                break
            total += got
        return Transfer(total, time.perf_counter() - started, response.status)
    finally:
        conn.close()


def upload(url: str, size: int, timeout: float) -> Transfer:
    """PUT `size` zero bytes (with Content-Length) to `url`; time from request to the complete answer."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    block = bytes(CHUNK)
    try:
        started = time.perf_counter()
        conn.putrequest("PUT", parts.path)
        conn.putheader("Content-Length", str(size))
        conn.putheader("Content-Type", "application/octet-stream")
        conn.endheaders()
        sent = 0
        while sent < size:
            piece = block if size - sent >= CHUNK else block[: size - sent]
            conn.send(piece)
            sent += len(piece)
        response = conn.getresponse()
        response.read()
        return Transfer(sent, time.perf_counter() - started, response.status)
    finally:
        conn.close()

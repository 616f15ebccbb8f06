"""Bodies flow through the proxy as they arrive: large transfers stay byte-exact in flat memory, events are not held."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.fakes.api_server import FakeApi

MiB = 1024 * 1024
TRANSFER = 50 * MiB
# Peak growth allowed while TRANSFER bytes cross the proxy: far below the transfer itself.
MEMORY_BOUND = 20 * MiB
# Bound for awaiting one event; a proxy that holds data back fails instead of stalling the run.
EVENT_BOUND = 10.0

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    """The process's resident set size now, in bytes."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


class PeakMemory:
    """Peak growth of the process, over a baseline, while bytes cross the proxy.

    Two views: resident memory sampled at every chunk the test sends or
    receives, and tracemalloc's peak of Python allocations (which every
    buffered body would show up in).
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.baseline = 0
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.baseline = self.peak = _rss()
        tracemalloc.start()
        return self

    def sample(self) -> None:
        """Note the resident size now."""
        self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self.sample()
        _, self.traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"\n[memory] {self.label}: {TRANSFER // MiB} MiB moved; "
            f"RSS baseline {self.baseline / MiB:.1f} MiB, peak growth {self.rss_growth / MiB:.1f} MiB; "
            f"tracemalloc peak {self.traced_peak / MiB:.1f} MiB"
        )

    @property
    def rss_growth(self) -> int:
        """Bytes the resident set grew above the baseline at its peak."""
        return self.peak - self.baseline


def numbered_blocks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """`total` bytes as blocks that each start with their own number, so a lost or repeated block shows."""
    filler = bytes(range(256)) * (size // 256)
    for index, start in enumerate(range(0, total, size)):
        block = index.to_bytes(8, "big") + filler[8:]
        yield block[: min(size, total - start)]


def download_pattern(total: int) -> Iterator[bytes]:
    """What /download/{size} sends, block by block."""
    block = bytes(range(256)) * 256
    for start in range(0, total, len(block)):
        yield block[: min(len(block), total - start)]


def sha256_of(blocks: Iterator[bytes]) -> str:
    """The SHA-256 of the concatenated blocks, without holding them together."""
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(block)
    return digest.hexdigest()


async def warm(client: aiohttp.ClientSession, proxy_url: str) -> None:
    """One small request first, so the token fetch and pools are not counted as transfer memory."""
    async with client.get(f"{proxy_url}/sized/10") as resp:
        assert await resp.read() == b"x" * 10


async def read_counted(resp: aiohttp.ClientResponse, memory: PeakMemory) -> tuple[int, str]:
    """Read a body to its end chunk by chunk: its length and SHA-256."""
    digest = hashlib.sha256()
    length = 0
    async for chunk in resp.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
        memory.sample()
    return length, digest.hexdigest()


# --- large transfers -------------------------------------------------------------------------


async def test_upload_50mb_streamed_arrives_byte_exact_in_flat_memory(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A 50 MiB upload, far above the replay limit, reaches the API byte-exact while memory stays flat."""
    proxy = await make_proxy()
    assert proxy.config.retry.replay_limit < TRANSFER
    await warm(client, proxy.url)
    sent = hashlib.sha256()

    with PeakMemory("upload (Content-Length)") as memory:

        async def body() -> AsyncIterator[bytes]:
            for block in numbered_blocks(TRANSFER):
                sent.update(block)
                memory.sample()
                yield block

        async with client.put(
            f"{proxy.url}/upload", data=body(), headers={"Content-Length": str(TRANSFER)}
        ) as resp:
            assert resp.status == 200
            data = await resp.json()

    assert data["length"] == TRANSFER
    assert data["sha256"] == sent.hexdigest()
    assert data["content_length"] == str(TRANSFER)
    assert memory.rss_growth < MEMORY_BOUND
    assert memory.traced_peak < MEMORY_BOUND


async def test_download_50mb_chunked_arrives_byte_exact_in_flat_memory(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A 50 MiB chunked download reaches the client byte-exact while memory stays flat."""
    proxy = await make_proxy()
    await warm(client, proxy.url)
    with PeakMemory("download (chunked)") as memory:
        async with client.get(f"{proxy.url}/download/{TRANSFER}") as resp:
            assert resp.status == 200
            assert resp.headers.get("Content-Length") is None
            length, digest = await read_counted(resp, memory)
    assert length == TRANSFER
    assert digest == sha256_of(download_pattern(TRANSFER))
    assert memory.rss_growth < MEMORY_BOUND
    assert memory.traced_peak < MEMORY_BOUND


async def test_download_50mb_sized_keeps_content_length_in_flat_memory(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """A 50 MiB download with Content-Length keeps that header and arrives byte-exact in flat memory."""
    proxy = await make_proxy()
    await warm(client, proxy.url)
    with PeakMemory("download (Content-Length)") as memory:
        async with client.get(f"{proxy.url}/sized/{TRANSFER}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(TRANSFER)
            assert "Transfer-Encoding" not in resp.headers
            length, digest = await read_counted(resp, memory)
    assert length == TRANSFER
    assert digest == sha256_of(iter([b"x" * TRANSFER]))
    assert memory.rss_growth < MEMORY_BOUND
    assert memory.traced_peak < MEMORY_BOUND


# --- events and interruptions ----------------------------------------------------------------


async def test_sse_first_event_arrives_before_upstream_finishes(
    make_proxy: Any, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """The first server-sent event reaches the client while the API still holds back the second."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/sse") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), EVENT_BOUND)
        assert first == b"data: first\n\n"
        assert not api.sse_gate.is_set()
        api.sse_gate.set()
        rest = await asyncio.wait_for(resp.read(), EVENT_BOUND)
    assert rest == b"data: second\n\n"


async def test_response_upstream_breaks_mid_body_client_sees_truncation(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """When the API drops the connection mid-body, the client's read fails instead of ending cleanly."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/broken") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), EVENT_BOUND)


async def test_response_upstream_breaks_mid_body_next_request_succeeds(
    make_proxy: Any, client: aiohttp.ClientSession
) -> None:
    """After an answer the API broke off, the proxy still serves the next request intact."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/broken") as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), EVENT_BOUND)
    async with client.get(f"{proxy.url}/sized/1000") as resp:
        assert await resp.read() == b"x" * 1000


async def _start_then_disconnect(proxy_url: str, target: str) -> None:
    """Begin a download through the proxy, read some body bytes, then hang up."""
    url = URL(proxy_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: c\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EVENT_BOUND)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.read(1024), EVENT_BOUND)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_download_client_disconnects_upstream_connection_dropped(make_proxy: Any, api: FakeApi) -> None:
    """A client hanging up mid-download makes the proxy drop its upstream connection, not park it half-read."""
    proxy = await make_proxy()
    await _start_then_disconnect(proxy.url, "/endless")
    await asyncio.wait_for(api.endless_aborted.wait(), EVENT_BOUND)


async def test_download_client_disconnects_access_line_reports_sent_status(
    make_proxy: Any, api: FakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    """The access line of a download the client abandoned reports the 200 it was sent, not a 500."""
    proxy = await make_proxy()
    await _start_then_disconnect(proxy.url, "/endless")
    await asyncio.wait_for(api.endless_aborted.wait(), EVENT_BOUND)
    lines = [r for r in caplog.records if r.name == "tokenproxy.access" and getattr(r, "path", None) == "/endless"]
    assert [getattr(r, "status", None) for r in lines] == [200]


async def test_download_client_disconnects_next_request_intact(
    make_proxy: Any, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """After a client hung up mid-download, the next request gets its own answer, byte-exact."""
    proxy = await make_proxy(upstream={"max_connections": 1})
    await _start_then_disconnect(proxy.url, "/endless")
    async with client.get(f"{proxy.url}/sized/100000", timeout=aiohttp.ClientTimeout(total=EVENT_BOUND)) as resp:
        assert resp.status == 200
        assert await resp.read() == b"x" * 100000

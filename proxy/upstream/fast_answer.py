"""One upstream answer on the fast path: its head as parsed, its body as the connection hands it over.

Owns: `FastAnswer`, the UpstreamAnswer that `fast_client.py`'s connections
fill in, and the body's buffer between the socket and the forwarder: chunks
kept as llhttp gave them (never copied, except one join when a read asks for
more than the first chunk holds), the connection paused above a high-water
mark and resumed below a low one, so a slow client holds flat memory. It
knows the connection only as a `_Source` (pause, resume, hand back).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from ..core.errors import ProxyError
from .model import RawHeaders

# The connection stops reading above HIGH_WATER body bytes buffered and reads again below LOW_WATER
# (what aiohttp's StreamReader did with its 64 KiB limit).
LOW_WATER = 2**16
HIGH_WATER = 2 * LOW_WATER


class _Source(Protocol):
    """What an answer needs from the connection it arrives on."""

    def pause_body(self) -> None:
        """Stop reading from the socket: the reader is behind."""

    def resume_body(self) -> None:
        """Read from the socket again."""

    def hand_back(self, answer: FastAnswer, *, whole: bool) -> None:
        """The answer's owner is done with it; `whole` when its body was read to the end."""


class FastAnswer:
    """An UpstreamAnswer whose body the connection feeds as llhttp parses it.

    The connection calls `feed`, `end` and `fail` from its protocol
    callbacks; one task (the forwarder's) reads. Reads raise only ProxyError.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_done",
        "_dropped",
        "_error",
        "_headers",
        "_paused",
        "_raw",
        "_relayed",
        "_source",
        "_waiter",
        "close_delimited",
        "complete",
        "content_length",
        "reason_bytes",
        "relayed_headers",
        "status",
        "values_checked",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        relayed: list[tuple[bytes, bytes]],
        dropped: list[tuple[bytes, bytes]],
        content_length: int | None,
        source: _Source,
        names_more: bool = False,
        values_checked: bool = False,
    ) -> None:
        """`relayed`: the headers that go back to the client, unless `names_more` (a `Connection` header names
        more to leave out: the forwarder sorts them out of `raw_headers`); `dropped`: the hop-by-hop and framing
        ones; `values_checked`: llhttp refused any control character in a header value."""
        self.status = status
        self._relayed = relayed
        self._dropped = dropped
        self._raw: RawHeaders | None = None
        # What goes back to the client, sorted out while parsing; None: to be worked out from raw_headers.
        self.relayed_headers = None if names_more else relayed
        self.reason_bytes = reason
        self.values_checked = values_checked
        self.content_length = content_length
        self.close_delimited = False  # the body ends when the upstream closes the connection
        self._headers: CIMultiDictProxy[str] | None = None
        self._source = source
        self._chunks: list[bytes] = []  # few: the socket pauses above HIGH_WATER
        self._buffered = 0
        self.complete = False  # the whole body has arrived (read or not)
        self._error: ProxyError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._done = False

    @property
    def reason(self) -> str:
        """The reason phrase (bytes that are not UTF-8 kept as surrogates, as aiohttp reads them)."""
        return self.reason_bytes.decode("utf-8", "surrogateescape")

    @property
    def raw_headers(self) -> RawHeaders:
        """The headers as received (the hop-by-hop and framing ones last), repeats kept in order."""
        raw = self._raw
        if raw is None:
            raw = self._raw = (*self._relayed, *self._dropped)
        return raw

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The headers by name, built on first use (the forwarder asks only for a refresh status)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDictProxy(
                CIMultiDict(
                    (name.decode("utf-8", "surrogateescape"), value.rstrip(b" \t").decode("utf-8", "surrogateescape"))
                    for name, value in self.raw_headers
                )
            )
        return headers

    # --- fed by the connection ------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """A piece of the body has arrived."""
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self._source.pause_body()
        if self._waiter is not None:
            self._wake()

    def end(self) -> None:
        """The whole body has arrived."""
        self.complete = True
        if self._waiter is not None:
            self._wake()

    def fail(self, error: ProxyError) -> None:
        """The body broke off: the reader gets `error` instead of what is left (unless it is all here)."""
        if self._error is None and not self.complete:
            self._error = error
            self._chunks.clear()
            self._buffered = 0
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _more(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _taken(self, size: int) -> None:
        self._buffered -= size
        if self._paused and self._buffered < LOW_WATER:
            self._paused = False
            self._source.resume_body()

    # --- read by the forwarder ------------------------------------------------------------------

    def at_eof(self) -> bool:
        """True once the whole body has been read."""
        return self.complete and not self._chunks

    async def read(self, limit: int) -> bytes:
        """Up to `limit` body bytes; b"" at the end."""
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            await self._more()
        if self._error is not None:
            raise self._error
        first = chunks[0]
        if len(first) >= limit or len(chunks) == 1:
            if len(first) <= limit:
                chunks.pop(0)
                self._taken(len(first))
                return first
            chunks[0] = first[limit:]
            self._taken(limit)
            return first[:limit]
        parts: list[bytes] = []
        wanted = limit
        while chunks and wanted:
            chunk = chunks.pop(0)
            if len(chunk) > wanted:
                chunks.insert(0, chunk[wanted:])
                chunk = chunk[:wanted]
            parts.append(chunk)
            wanted -= len(chunk)
        self._taken(limit - wanted)
        return b"".join(parts)

    def take_body(self) -> bytes:
        """Every body byte that has arrived and not been read, at once."""
        chunks = self._chunks
        if not chunks:
            return b""
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused:
            self._taken(0)
        return body

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives, chunk by chunk as llhttp handed it over."""
        chunks = self._chunks
        while True:
            if self._error is not None:
                raise self._error
            if chunks:
                chunk = chunks.pop(0)
                self._taken(len(chunk))
                yield chunk
            elif self.complete:
                return
            else:
                await self._more()

    def release(self) -> None:
        """Done: the connection goes back to the pool if the answer was read to its end."""
        if not self._done:
            self._done = True
            self._source.hand_back(self, whole=self.complete and not self._chunks)

    def close(self) -> None:
        """Done early: the connection is closed."""
        if not self._done:
            self._done = True
            self._chunks.clear()
            self._source.hand_back(self, whole=False)

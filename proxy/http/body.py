"""The request body: kept for a resend when small, streamed through when large.

Owns: the replayable-or-streamed decision. A body of at most
`replay_limit` bytes (known from Content-Length, or found by reading at
most that much) is held in memory, while the bodies held by all requests
together stay within `ReplayMemory`'s bound: one that would go past it
waits for room for a while, and is streamed if none comes. A larger body
is never held whole but streamed. Also refuses a body on GET or HEAD.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from aiohttp.web_protocol import RequestPayloadError

from ..core.errors import BadRequest
from ..upstream.model import RequestBody
from .exchange import BodyStream, Request

CHUNK = 64 * 1024

# Methods whose body has no defined meaning (RFC 9110 §9.3.1-2) and that an upstream may not
# expect one on: it could take such a body for the next request on a kept-alive connection.
NO_BODY_METHODS = frozenset({"GET", "HEAD"})


class ReplayMemory:
    """The bytes of request bodies held for a resend by all requests together, and their bound.

    Owned by the event loop: taken, waited for and given back only in its
    coroutines and callbacks, so it needs no lock. `limit` may change (a
    reload); bytes already held stay held until given back. Waiters are
    served in arrival order as bytes are given back, each one that fits.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def take(self, size: int) -> bool:
        """Hold `size` more bytes if that stays within the limit; False (holding nothing) otherwise."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    async def wait_to_take(self, size: int, timeout: float) -> bool:
        """Hold `size` more bytes as soon as they fit, waiting at most `timeout` seconds; False if they never did."""
        if self.take(size):
            return True
        if size > self.limit or timeout <= 0:
            return False
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, granted)
        self._waiting.append(entry)
        try:
            await asyncio.wait((granted,), timeout=timeout)
        except BaseException:
            if granted.done():
                self.give_back(size)  # granted just as the wait was cancelled
            else:
                self._waiting.remove(entry)
            raise
        if granted.done():
            return True
        self._waiting.remove(entry)
        return False

    def give_back(self, size: int) -> None:
        """Release bytes taken before, and hand them on to waiters that now fit."""
        self.held -= size
        for entry in list(self._waiting):
            wanted, granted = entry
            if self.held + wanted <= self.limit:
                self._waiting.remove(entry)
                self.held += wanted
                granted.set_result(None)


async def _stream(prefix: deque[bytes], content: BodyStream) -> AsyncIterator[bytes]:
    while prefix:
        yield prefix.popleft()  # not kept here once handed on
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        yield chunk


# The bodies of requests without one (no Content-Length, or 0): shared, nothing held.
NO_BODY = RequestBody(None, None, None)
_EMPTY_BODY = RequestBody(b"", None, 0)


def bodiless(request: Request) -> RequestBody | None:
    """The body of a request that has none, without awaiting anything; None when it has one (use read_body)."""
    if request.body is not None:
        return None
    length = request.content_length
    if length is None:
        return NO_BODY
    return _EMPTY_BODY if length == 0 else None


async def read_body(request: Request, replay_limit: int, memory: ReplayMemory, wait: float = 0.0) -> RequestBody:
    """Decide, reading at most `replay_limit + 1` bytes, how this request's body travels.

    The bytes it holds are taken from `memory`: the caller gives back
    `held` of the result once the request is done (on an exception,
    nothing is held). A body of known length waits up to `wait` seconds
    for room there before it is streamed instead; a chunked one streams
    on at once from where room ran out. Raises BadRequest for a body on
    GET or HEAD, a transfer coding other than chunked (its meaning would be
    lost once the proxy de-chunks) or a body that breaks off malformed.
    """
    if request.method in NO_BODY_METHODS and request.body_exists:
        raise BadRequest(
            f"a {request.method} request with a body is not forwarded (an upstream may read the body as "
            "another request); send the body with POST"
        )
    codings = request.transfer_encoding
    if codings is not None and codings.strip().lower() != "chunked":
        raise BadRequest("transfer codings other than chunked are not supported (use Content-Encoding)")
    try:
        return await _read_body(request, replay_limit, memory, wait)
    except RequestPayloadError:
        raise BadRequest("the request body was malformed") from None


async def _read_body(request: Request, replay_limit: int, memory: ReplayMemory, wait: float) -> RequestBody:
    length = request.content_length
    content = request.body
    if content is None:
        return RequestBody(b"" if length == 0 else None, None, length)
    if length is not None and (length > replay_limit or not await memory.wait_to_take(length, wait)):
        return RequestBody(None, _stream(deque(), content), length)
    # A known length is held in full from the start; a chunked body as it arrives.
    held = 0 if length is None else length
    chunks: deque[bytes] = deque()
    size = 0
    try:
        while size <= replay_limit:
            chunk = await content.read(min(CHUNK, replay_limit + 1 - size))
            if not chunk:
                # Whole body read: replayable. A chunked upload that fits is sent
                # with its length, which every upstream understands.
                return RequestBody(b"".join(chunks), None, size, held)
            chunks.append(chunk)
            size += len(chunk)
            if length is None:
                if not memory.take(len(chunk)):
                    break  # the held bodies are at their bound: stream this one on
                held += len(chunk)
    except BaseException:
        memory.give_back(held)
        raise
    return RequestBody(None, _stream(chunks, content), length, held)

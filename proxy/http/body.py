"""The request body: kept for a resend when small, streamed through when large.

Owns: the replayable-or-streamed decision. A body of at most
`replay_limit` bytes (known from Content-Length, or found by reading at
most that much) is held in memory; a larger one is never held whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import StreamReader, hdrs, web
from aiohttp.web_protocol import RequestPayloadError

from ..core.errors import BadRequest
from ..upstream.model import RequestBody

CHUNK = 64 * 1024


async def _stream(prefix: bytes, content: StreamReader) -> AsyncIterator[bytes]:
    if prefix:
        yield prefix
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        yield chunk


async def read_body(request: web.BaseRequest, replay_limit: int) -> RequestBody:
    """Decide, reading at most `replay_limit + 1` bytes, how this request's body travels.

    Raises BadRequest for a transfer coding other than chunked (its meaning
    would be lost once the proxy de-chunks) or a body that breaks off malformed.
    """
    codings = request.headers.get(hdrs.TRANSFER_ENCODING)
    if codings is not None and codings.strip().lower() != "chunked":
        raise BadRequest("transfer codings other than chunked are not supported (use Content-Encoding)")
    try:
        return await _read_body(request, replay_limit)
    except RequestPayloadError:
        raise BadRequest("the request body was malformed") from None


async def _read_body(request: web.BaseRequest, replay_limit: int) -> RequestBody:
    length = request.content_length
    if not request.body_exists:
        return RequestBody(b"" if length == 0 else None, None, length)
    content = request.content
    if length is not None and length > replay_limit:
        return RequestBody(None, _stream(b"", content), length)
    buffer = bytearray()
    while len(buffer) <= replay_limit:
        chunk = await content.read(min(CHUNK, replay_limit + 1 - len(buffer)))
        if not chunk:
            # Whole body read: replayable. A chunked upload that fits is sent
            # with its length, which every upstream understands.
            return RequestBody(bytes(buffer), None, len(buffer))
        buffer += chunk
    return RequestBody(None, _stream(bytes(buffer), content), length)

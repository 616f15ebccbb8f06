"""The one way tokenproxy's own answers are rendered.

Owns: turning a ProxyError into the JSON answer every port gives
(`{"error": code, "detail": sentence}` and `X-Tokenproxy-Error`), as an
aiohttp response for a request (the admin port), as a head and body for the
proxy port's writer, or as the bytes of a whole HTTP/1.1 answer
for when there is no request to answer (a connection refused or timed out
before its head was complete). Knows nothing of where the error came from.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web

from ..core.errors import MethodNotAllowed, NotFound, ProxyError

ERROR_HEADER = "X-Tokenproxy-Error"


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An aiohttp app's own 404 and 405 as tokenproxy's JSON answer (the admin ports), the path never echoed."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        response = error_response(MethodNotAllowed(f"{request.method} is not allowed here"))
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPNotFound:
        return error_response(NotFound("no such endpoint: /healthz, /readyz, /status and /metrics are"))


def error_body(error: ProxyError) -> bytes:
    """The JSON body of the answer to `error`: its code and its sentence, nothing else."""
    return json.dumps({"error": error.code, "detail": error.detail}).encode()


def _retry_after(error: ProxyError) -> str | None:
    return None if error.retry_after is None else str(max(1, error.retry_after))


def error_response(error: ProxyError) -> web.Response:
    """Render a ProxyError as tokenproxy's JSON answer."""
    headers = {ERROR_HEADER: error.code}
    retry_after = _retry_after(error)
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return web.Response(status=error.status, body=error_body(error), content_type="application/json", headers=headers)


def error_head(error: ProxyError) -> tuple[bytes, bytes]:
    """The status line and headers of the answer to `error` (without framing or the blank line), and its body."""
    body = error_body(error)
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n%s: %s\r\n" % (
        error.status,
        HTTPStatus(error.status).phrase.encode(),
        ERROR_HEADER.encode(),
        error.code.encode(),
    )
    retry_after = _retry_after(error)
    if retry_after is not None:
        head += b"Retry-After: %s\r\n" % retry_after.encode()
    return head, body


def raw_answer(error: ProxyError) -> bytes:
    """A complete HTTP/1.1 answer for `error` that closes the connection, for when no request exists."""
    body = error_body(error)
    lines = [
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"{ERROR_HEADER}: {error.code}",
        "Connection: close",
    ]
    retry_after = _retry_after(error)
    if retry_after is not None:
        lines.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

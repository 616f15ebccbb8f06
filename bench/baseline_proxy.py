"""The plain aiohttp proxy anyone would write: the floor tokenproxy must not fall below.

`python -m bench.baseline_proxy --port P --upstream http://127.0.0.1:U --token T`

One shared ClientSession, a catch-all route, hop-by-hop headers dropped,
the bearer set, bodies streamed both ways. No refresh, no queue, no errors
of its own beyond what aiohttp does.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset(
    [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "authorization",
    ]
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstream: str, token: str) -> web.Application:
    """An Application that forwards every request to `upstream` with `Authorization: Bearer <token>`."""
    app = web.Application()
    bearer = f"Bearer {token}"

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Authorization"] = bearer
        data = request.content if request.body_exists else None
        async with request.app[SESSION].request(
            request.method, upstream + request.path_qs, headers=headers, data=data, allow_redirects=False
        ) as upstream_response:
            response = web.StreamResponse(status=upstream_response.status)
            for key, value in upstream_response.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    """Serve on 127.0.0.1 until terminated."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    app = build_app(args.upstream.rstrip("/"), args.token)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

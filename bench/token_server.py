"""A tiny OAuth2 token endpoint for the bench: `python -m bench.token_server --port P --delay 0.1`.

`POST /oauth/token` answers a client_credentials request after `delay`
seconds. The first token after a reset is `old-<n>` (with the lifetime the
reset asked for); every later one is `new-<n>` and lives an hour, so the
upstream's `/storm` route can tell the first token from its replacements.
`GET /stats` gives `{"calls": n}`; `POST /reset?first_lifetime=S` zeroes it.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

from aiohttp import web


@dataclass
class Counter:
    """Token calls since the last reset; owned by the app, changed only by its handlers."""

    calls: int = 0
    first_lifetime: float = 3600.0


COUNTER = web.AppKey("counter", Counter)


def build_app(delay: float) -> web.Application:
    """The token endpoint and its two control routes."""
    app = web.Application()
    app[COUNTER] = Counter()

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        counter = request.app[COUNTER]
        counter.calls += 1
        number = counter.calls
        await asyncio.sleep(delay)
        first = number == 1
        return web.json_response(
            {
                "access_token": f"{'old' if first else 'new'}-{number}",
                "token_type": "Bearer",
                "expires_in": counter.first_lifetime if first else 3600,
            }
        )

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"calls": request.app[COUNTER].calls})

    async def reset(request: web.Request) -> web.Response:
        request.app[COUNTER].calls = 0
        request.app[COUNTER].first_lifetime = float(request.query.get("first_lifetime", "3600"))
        return web.json_response({"calls": 0})

    app.router.add_post("/oauth/token", token)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    return app


def main() -> None:
    """Serve on 127.0.0.1 until terminated."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.1, help="seconds before each token answer")
    args = parser.parse_args()
    web.run_app(build_app(args.delay), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

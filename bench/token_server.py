"""The bench's OAuth2 token endpoint: `python -m bench.token_server --port P --delay 0.1`.

The demo's token server (`proxy.demo.token_server`) serving only the
client_credentials grant, each answer after `delay` seconds. The first token
after a reset is `old-1` (with the lifetime the reset asked for); every later
one is `new-<n>` and lives an hour, so the upstream's `/storm` route can tell
the first token from its replacements. `GET /stats` gives `{"calls": n}`;
`POST /reset?first_lifetime=S` zeroes it.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.demo.token_server import TokenServer


@dataclass
class BenchTokenServer(TokenServer):
    """Opaque, numbered client_credentials tokens after a fixed delay; owned by its app's handlers."""

    grants: frozenset[str] = frozenset({"client_credentials"})
    delay: float = 0.1  # seconds before each token answer
    first_lifetime: float = 3600.0  # expires_in of the first token after a reset
    issued: int = 0  # tokens issued since the last reset

    def app(self) -> web.Application:
        """The token endpoint and its two control routes."""
        app = super().app()
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/reset", self.reset)
        return app

    async def intercept(self, request: web.Request) -> web.StreamResponse | None:
        """Take `delay` seconds, as a real token endpoint does, then answer normally."""
        await asyncio.sleep(self.delay)
        return None

    def issue(self) -> dict[str, Any]:
        """`old-1` with the first lifetime, then `new-<n>` living an hour."""
        self.issued += 1
        first = self.issued == 1
        return {
            "access_token": f"{'old' if first else 'new'}-{self.issued}",
            "expires_in": self.first_lifetime if first else 3600,
        }

    async def stats(self, request: web.Request) -> web.Response:
        """GET /stats: the token requests since the last reset."""
        return web.json_response({"calls": self.count})

    async def reset(self, request: web.Request) -> web.Response:
        """POST /reset?first_lifetime=S: zero the counts; the next token is `old-1` living S seconds."""
        self.count = self.issued = 0
        self.first_lifetime = float(request.query.get("first_lifetime", "3600"))
        return web.json_response({"calls": 0})


def main() -> None:
    """Serve on 127.0.0.1 until terminated."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.1, help="seconds before each token answer")
    args = parser.parse_args()
    server = BenchTokenServer(delay=args.delay)
    web.run_app(server.app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

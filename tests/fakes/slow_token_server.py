"""A token server that takes its time: the tests' FakeTokenServer with every answer delayed.

A refresh that takes 300 ms leaves a wide window in which several processes
see the same token expire: where their coordination is missing, two of them
refresh with the same (rotating) refresh token and the server notices.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web

from tests.fakes.token_server import FakeTokenServer


@dataclass
class SlowTokenServer(FakeTokenServer):
    """FakeTokenServer whose every token-endpoint answer comes `delay` seconds late."""

    delay: float = 0.3
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each call as it arrived

    async def intercept(self, request: web.Request) -> web.StreamResponse | None:
        """Note when the call came, wait `delay`, then answer as FakeTokenServer does."""
        self.arrivals.append(time.monotonic())
        await asyncio.sleep(self.delay)
        return await super().intercept(request)

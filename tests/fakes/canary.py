"""A listener standing for "another host": the proxy must never connect to it."""

from __future__ import annotations

import asyncio
from typing import Self


class Canary:
    """A listener standing for another host: counts every connection anybody makes to it."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.authority = ""

    async def __aenter__(self) -> Self:
        """Listen on a free port of 127.0.0.1."""
        self.server = await asyncio.start_server(self._seen, "127.0.0.1", 0)
        self.authority = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    def _seen(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def __aexit__(self, *exc: object) -> None:
        """Stop listening."""
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

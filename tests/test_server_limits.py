"""The listener's limits come from the config alone: a proxy started with the default config enforces its defaults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
from typing import Any

import pytest

from proxy.config.schema import ServerConfig
from proxy.http.server import ServerLimits

# A connection the proxy should answer at once is given this long before it counts as hung.
HANG_BOUND = 10.0


def test_server_limits_without_the_configs_values_cannot_be_built() -> None:
    """ServerLimits has no defaults of its own that could differ from the config's: each value must be given."""
    with pytest.raises(TypeError):
        ServerLimits()  # type: ignore[call-arg]


async def test_server_limits_default_config_admits_its_max_connections_then_503(make_proxy: Any) -> None:
    """With server.max_connections left at its default, that many connections are admitted; the next gets 503."""
    # Both ends of every connection live in this process: raise the soft descriptor limit if the hard one allows.
    needed = 2 * ServerConfig.max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    proxy = await make_proxy()
    assert proxy.config.server.max_connections == ServerConfig.max_connections
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(ServerConfig.max_connections):
            _, writer = await asyncio.open_connection(host, int(port))
            writers.append(writer)
        reader, writer = await asyncio.open_connection(host, int(port))
        writers.append(writer)
        answer = await asyncio.wait_for(reader.read(), HANG_BOUND)
    finally:
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert json.loads(body) == {
        "error": "too_many_connections",
        "detail": f"the proxy already has {ServerConfig.max_connections} open connections (server.max_connections)",
    }

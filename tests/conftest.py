"""Fixtures: a real token server, a real API and the real proxy, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import Config, parse_config
from proxy.runtime.app import TOKENS, build_app
from proxy.runtime.serve import make_runner, start_listener
from proxy.tokens.manager import TokenManager
from tests.fakes.api_server import FakeApi
from tests.fakes.canary import Canary
from tests.fakes.counting_upstream import CountingUpstream
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET, PASSWORD, FakeTokenServer


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# The event loops a test may run on: asyncio's own for every test, and uvloop (the proxy's
# default, `server.loop`) too for a test marked `@pytest.mark.asyncio(loop_factories=BOTH_LOOPS)`.
LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
if (_uvloop := _uvloop_factory()) is not None:
    LOOP_FACTORIES["uvloop"] = _uvloop
BOTH_LOOPS = ["asyncio", "uvloop"]  # where uvloop does not install, its runs are skipped


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """asyncio's loop for every test; uvloop as well for one that asks for it (see BOTH_LOOPS)."""
    marker = item.get_closest_marker("asyncio")
    if marker is not None and marker.kwargs.get("loop_factories"):
        return LOOP_FACTORIES
    return {"asyncio": asyncio.new_event_loop}


@dataclass
class Running:
    """A fake server and where it listens."""

    url: str
    server: TestServer


@pytest.fixture
async def token_server(aiohttp_server: Any) -> AsyncIterator[FakeTokenServer]:
    """The fake authorization server, listening on 127.0.0.1."""
    fake = FakeTokenServer()
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    yield fake
    if fake.gate is not None:
        fake.gate.set()


@pytest.fixture
async def upstream() -> AsyncIterator[CountingUpstream]:
    """A counting, echoing upstream on 127.0.0.1 (for what must, or must not, reach it)."""
    async with CountingUpstream() as server:
        yield server


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    """A listener standing for another host, which must never be connected to."""
    async with Canary() as server:
        yield server


@pytest.fixture
async def api(aiohttp_server: Any, token_server: FakeTokenServer) -> AsyncIterator[FakeApi]:
    """The fake API, trusting the fake token server's signing key."""
    fake = FakeApi(token_server.signing_key)
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    fake.server = server  # type: ignore[attr-defined]
    yield fake
    fake.sse_gate.set()


@dataclass
class Proxy:
    """A running tokenproxy: its URL, config and token manager (read-only use)."""

    url: str
    config: Config
    app: web.Application
    runner: web.AppRunner

    @property
    def tokens(self) -> TokenManager:
        """The proxy's token manager, for observing waiting counts and generations."""
        return self.app[TOKENS]

    async def stop(self) -> None:
        """Shut the proxy down (idempotent)."""
        await self.runner.cleanup()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


ProxyFactory = Callable[..., Awaitable[Proxy]]


UPSTREAM_CLIENTS = ("fast", "session")


@pytest.fixture(params=UPSTREAM_CLIENTS)
def upstream_client(request: pytest.FixtureRequest) -> str:
    """`upstream.client`: every test that starts a proxy runs once with each way to the upstream."""
    return str(request.param)


@pytest.fixture
async def make_proxy(
    token_server: FakeTokenServer, api: FakeApi, tmp_path: Path, upstream_client: str
) -> AsyncIterator[ProxyFactory]:
    """Start a proxy in front of the fake API; keyword sections override the test defaults."""
    started: list[Proxy] = []

    async def start(clock: Callable[[], float] = time.time, **sections: dict[str, Any]) -> Proxy:
        raw = {
            "server": {"listen": "127.0.0.1:0"},
            "upstream": {
                "url": api.base_url,  # type: ignore[attr-defined]
                "connect_timeout": 5.0,
                "read_timeout": 10.0,
                "client": upstream_client,
            },
            "token": {
                "grant": "refresh_token",
                "token_url": f"{token_server.base_url}/oauth/token",  # type: ignore[attr-defined]
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "refresh_token": token_server.current_refresh,
                "state_file": str(tmp_path / "state" / "state.json"),
                "min_refresh_interval": 0.0,
                "backoff_initial": 0.5,
                "backoff_max": 2.0,
                "timeout": 5.0,
            },
            "queue": {"max_waiting": 1000, "wait_timeout": 10.0},
        }
        config = parse_config(_merge(raw, sections), {})
        app = build_app(config, clock=clock)
        runner = make_runner(app, config)
        await runner.setup()
        url = await start_listener(runner, "127.0.0.1:0", backlog=config.server.max_connections)
        proxy = Proxy(url, config, app, runner)
        started.append(proxy)
        return proxy

    yield start
    for proxy in reversed(started):
        await proxy.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client, as a user's tool would be: no decompression, no redirects followed."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture(autouse=True)
def no_secrets_in_logs(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Any:
    """Every test: no token, refresh token or client secret reaches any log record, at any level."""
    caplog.set_level(logging.DEBUG)
    fake: FakeTokenServer | None = None
    if "token_server" in request.fixturenames:
        fake = request.getfixturevalue("token_server")
    yield
    secrets = [CLIENT_SECRET, PASSWORD]
    if fake is not None:
        secrets += fake.issued_access + list(fake.used_refresh) + [fake.current_refresh]
    text = "\n".join(
        record.getMessage() + (caplog_format_exc(record) or "") for record in caplog.get_records("call")
    )
    leaked = [s[:12] + "..." for s in secrets if s and s in text]
    assert not leaked, f"secrets found in log output: {leaked}"


def caplog_format_exc(record: logging.LogRecord) -> str | None:
    """The formatted traceback of a record, if it has one."""
    if record.exc_info:
        return logging.Formatter().formatException(record.exc_info)
    return None


HTTPBIN = """
import logging, sys
logging.disable(logging.WARNING)
from httpbin import app
from werkzeug.serving import make_server
server = make_server("127.0.0.1", 0, app, threaded=True)
print(server.server_port, flush=True)
server.serve_forever()
"""


@pytest.fixture
async def httpbin() -> AsyncIterator[str]:
    """httpbin on a free 127.0.0.1 port, for the length of one test."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HTTPBIN, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 30))
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.communicate(), 30)  # reads its pipe to the end: wait() alone can hang on a full one

"""Fixtures: a real token server, a real API and the real proxy, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.api_server import FakeApi
from tests.fakes.canary import Canary
from tests.fakes.counting_upstream import CountingUpstream
from tests.fakes.token_server import CLIENT_SECRET, PASSWORD, FakeTokenServer
from tests.helpers import LOOP_FACTORIES, REDIS_SERVER, ProxyFactory, RedisServer


def pytest_configure(config: pytest.Config) -> None:
    """Let the CLI processes the tests start see Ctrl-C: a shell that runs the suite in the background hands it
    SIGINT ignored, which every child would inherit (Python then leaves it ignored, and `login` never stops)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """asyncio's loop for every test; uvloop as well for one that asks for it (see tests.helpers.BOTH_LOOPS)."""
    marker = item.get_closest_marker("asyncio")
    if marker is not None and marker.kwargs.get("loop_factories"):
        return LOOP_FACTORIES
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
async def token_server(aiohttp_server: Any) -> AsyncIterator[FakeTokenServer]:
    """The fake authorization server, listening on 127.0.0.1."""
    fake = FakeTokenServer()
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
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
    fake.base_url = str(server.make_url("")).rstrip("/")
    fake.server = server
    yield fake
    fake.sse_gate.set()


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
    factory = ProxyFactory(token_server, api, tmp_path / "state" / "state.json", upstream_client)
    yield factory
    await factory.stop_all()


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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (tests keep apart by key_prefix); skipped when it is not installed."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server not found (`.ci/run` installs Debian's redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may stop and start again."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server not found (`.ci/run` installs Debian's redis-server)")
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()

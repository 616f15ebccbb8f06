"""Helpers shared by the test modules: a running proxy, the CLI, raw HTTP, the proxy's error shape, event loops.

Fixtures live in conftest.py and fake servers in tests/fakes/; a test module
imports what it shares from here, never from another test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from proxy.config import Config, parse_config
from proxy.runtime.app import TOKENS, build_app
from proxy.runtime.serve import make_runner, start_listener
from proxy.tokens.manager import TokenManager
from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET, FakeTokenServer

# --- event loops ------------------------------------------------------------------------------


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

# --- a proxy in front of the fakes -------------------------------------------------------------

Section = dict[str, Any] | None  # one config section's keys, laid over the test defaults


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


class ProxyFactory:
    """The `make_proxy` fixture: starts proxies in front of the fake token server and API, and stops them all."""

    def __init__(self, token_server: FakeTokenServer, api: FakeApi, state_file: Path, upstream_client: str) -> None:
        self._token_server = token_server
        self._api = api
        self._state_file = state_file
        self._upstream_client = upstream_client
        self._started: list[Proxy] = []

    async def __call__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        server: Section = None,
        upstream: Section = None,
        token: Section = None,
        queue: Section = None,
        retry: Section = None,
        log: Section = None,
    ) -> Proxy:
        """Start a proxy listening on 127.0.0.1; each section given overrides those keys of the test defaults."""
        raw = {
            "server": {"listen": "127.0.0.1:0"},
            "upstream": {
                "url": self._api.base_url,
                "connect_timeout": 5.0,
                "read_timeout": 10.0,
                "client": self._upstream_client,
            },
            "token": {
                "grant": "refresh_token",
                "token_url": f"{self._token_server.base_url}/oauth/token",
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "refresh_token": self._token_server.current_refresh,
                "state_file": str(self._state_file),
                "min_refresh_interval": 0.0,
                "backoff_initial": 0.5,
                "backoff_max": 2.0,
                "timeout": 5.0,
            },
            "queue": {"max_waiting": 1000, "wait_timeout": 10.0},
        }
        given = {"server": server, "upstream": upstream, "token": token, "queue": queue, "retry": retry, "log": log}
        config = parse_config(_merge(raw, {name: keys for name, keys in given.items() if keys is not None}), {})
        app = build_app(config, clock=clock)
        runner = make_runner(app, config)
        await runner.setup()
        url = await start_listener(runner, "127.0.0.1:0", backlog=config.server.max_connections)
        proxy = Proxy(url, config, app, runner)
        self._started.append(proxy)
        return proxy

    async def stop_all(self) -> None:
        """Stop every proxy started, the last first."""
        for proxy in reversed(self._started):
            await proxy.stop()


# --- the command line -------------------------------------------------------------------------

TOKENPROXY = [sys.executable, "-m", "proxy"]


def write_config(
    path: Path,
    token_server: FakeTokenServer,
    api: FakeApi,
    state: Path,
    extra: str = "",
    server: str = "",
    upstream: str = "",
) -> Path:
    """A config file for `tokenproxy run`/`check` in front of the fakes; the secret comes from $TEST_CLIENT_SECRET."""
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
{server}
[upstream]
url = "{api.base_url}"
{upstream}
[token]
grant = "refresh_token"
token_url = "{token_server.base_url}/oauth/token"
client_id = "{CLIENT_ID}"
client_secret = "${{TEST_CLIENT_SECRET}}"
refresh_token = "{token_server.current_refresh}"
state_file = "{state}"
{extra}
"""
    )
    path.chmod(0o600)  # it holds a literal refresh token: readable by others, run and check would warn
    return path


async def start_cli(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """Start `tokenproxy ARGS` with its output piped; `env` is laid over this process's environment."""
    return await asyncio.create_subprocess_exec(
        *TOKENPROXY,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str]:
    """Run `tokenproxy ARGS` to its end: exit code, standard output, standard error."""
    proc = await start_cli(*args, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def read_until(stream: asyncio.StreamReader, pattern: str, seen: list[str], timeout: float = 20) -> re.Match[str]:
    """Read lines until one matches; the lines read are kept in `seen`."""

    async def scan() -> re.Match[str]:
        while True:
            line = await stream.readline()
            if not line:
                raise AssertionError("process ended before printing " + pattern + ":\n" + "".join(seen))
            seen.append(line.decode())
            match = re.search(pattern, seen[-1])
            if match:
                return match

    return await asyncio.wait_for(scan(), timeout)


# --- raw HTTP ---------------------------------------------------------------------------------

# Bound for one raw exchange; a hang fails the test instead of stalling the run.
RAW_BOUND = 10.0


@dataclass
class RawResponse:
    """One HTTP/1.1 answer exactly as it came off the wire."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes  # de-chunked when the answer was chunked
    rest: bytes  # every byte after the header block, as received

    def all(self, name: str) -> list[str]:
        """Every value of header `name`, in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


def parse_response(data: bytes) -> RawResponse:
    """Split a raw answer (read up to EOF) into status, headers and body."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete header block in {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    chunked = any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers)
    body = _dechunk(rest) if chunked and rest else rest
    return RawResponse(status, headers, body, rest)


async def read_one_answer(reader: asyncio.StreamReader) -> bytes:
    """One answer with a Content-Length off a kept-alive connection: header block and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_BOUND)
    length = int(parse_response(head).all("Content-Length")[0])
    return head + await asyncio.wait_for(reader.readexactly(length), RAW_BOUND)


async def _read_answer_to_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), RAW_BOUND)


async def _exchange(
    base_url: str, request: bytes, read: Callable[[asyncio.StreamReader], Awaitable[bytes]]
) -> RawResponse:
    url = URL(base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await read(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    return parse_response(data)


async def raw_exchange(base_url: str, request: bytes) -> RawResponse:
    """Send raw request bytes (which should say `Connection: close`) and read the answer to EOF."""
    return await _exchange(base_url, request, _read_answer_to_eof)


async def raw_exchange_kept_alive(base_url: str, request: bytes) -> RawResponse:
    """Send raw request bytes on a connection left open and read one answer by its Content-Length."""
    return await _exchange(base_url, request, read_one_answer)


async def open_raw(base_url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to the proxy."""
    url = URL(base_url)
    return await asyncio.open_connection(url.host, url.port)


async def close_raw(writer: asyncio.StreamWriter) -> None:
    """Close a raw connection, tolerating one the other side already reset."""
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the proxy closes the connection (a reset counts as the end)."""
    try:
        return await asyncio.wait_for(reader.read(), RAW_BOUND)
    except ConnectionResetError:
        return b""


# --- what the proxy says and logs -------------------------------------------------------------


def assert_proxy_error(status: int, headers: Callable[[str], list[str]], body: bytes, want: int, code: str) -> None:
    """The answer is tokenproxy's own JSON error with the given status and code."""
    assert status == want
    assert headers("X-Tokenproxy-Error") == [code]
    data = json.loads(body)
    assert data["error"] == code
    assert isinstance(data["detail"], str) and data["detail"]


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """No record at ERROR or above, and none carrying a traceback."""
    bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == []


# --- Redis ------------------------------------------------------------------------------------

REDIS_SERVER = shutil.which("redis-server")
# Bound for redis-server to start answering (or to stop) on a loaded machine.
REDIS_BOUND = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """Debian's redis-server on a free 127.0.0.1 port, no persistence; started and killed by PID.

    `stop()` then `start()` gives a Redis that comes back empty on the same port (a restart without persistence).
    """

    def __init__(self, directory: Path, tls: tuple[Path, Path, Path] | None = None) -> None:
        """`tls`: (certificate, key, CA file) to serve TLS only (rediss://) with that certificate."""
        assert REDIS_SERVER is not None
        self.directory = directory
        self.port = free_port()
        self.tls = tls
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait (bounded) until it answers PING."""
        assert REDIS_SERVER is not None and self._proc is None
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            cert, key, ca = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert), "--tls-key-file",
                     str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        self._proc = subprocess.Popen(
            [REDIS_SERVER, *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + REDIS_BOUND
        while time.monotonic() < deadline:
            try:
                with contextlib.ExitStack() as stack:
                    sock = stack.enter_context(socket.create_connection(("127.0.0.1", self.port), timeout=1))
                    if self.tls is not None:
                        context = ssl.create_default_context(cafile=str(self.tls[2]))
                        sock = stack.enter_context(context.wrap_socket(sock, server_hostname="127.0.0.1"))
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)  # polling for a process to start, not a settle delay
        self.stop()
        raise AssertionError(f"redis-server did not answer on port {self.port} within {REDIS_BOUND}s")

    def pause(self) -> None:
        """Stop it with SIGSTOP: connections are still accepted by the kernel, nothing is answered (a stall)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused Redis go on (SIGCONT): it then runs what it was sent meanwhile."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill it by PID and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(REDIS_BOUND)

    def client(self) -> Any:
        """A synchronous redis client to look inside (the test's own connection)."""
        import redis

        if self.tls is not None:
            return redis.Redis.from_url(self.url, socket_timeout=5, ssl_ca_certs=str(self.tls[2]))
        return redis.Redis.from_url(self.url, socket_timeout=5)


async def stop_process(proc: asyncio.subprocess.Process) -> str:
    """Kill a started CLI by PID (if still running) and return what it wrote on stderr."""
    if proc.returncode is None:
        proc.kill()
    _, err = await asyncio.wait_for(proc.communicate(), RAW_BOUND)
    return err.decode()


def saved_entry(path: Path) -> dict[str, Any]:
    """The one credential's entry in a state file (whose JSON keys each credential's state by its id)."""
    data = json.loads(path.read_text())
    entries = data["credentials"]
    assert len(entries) == 1, f"expected one credential in {path}, found {len(entries)}"
    return dict(next(iter(entries.values())))

"""HTTPS_PROXY: CONNECT intercepted with the local CA for the hosts routes name; 403 for any other host.

Two APIs over TLS (each with its own token server, on 127.0.0.1, certificates from a test CA the proxy
trusts through the routes' `ca_file`), routed by host (`left.test`, `right.test`); real clients (curl,
requests, httpx, aiohttp) reach them through the proxy as an HTTPS proxy, trusting tokenproxy's local
CA. What a person sees is asserted: exit codes, statuses, JSON bodies, what each upstream received.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests

from proxy.config import parse_config
from proxy.runtime.app import METRICS, build_app
from proxy.runtime.serve import make_runner, start_listener
from proxy.tls.ca import create_ca
from tests.fakes.api_server import FakeApi
from tests.fakes.tls import TestCa
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET, FakeTokenServer
from tests.helpers import BOTH_LOOPS, close_raw, open_raw, read_to_eof

BOUND = 20.0


@dataclasses.dataclass
class Side:
    """One API over TLS and the token server it trusts."""

    tokens: FakeTokenServer
    api: FakeApi


@dataclasses.dataclass
class Setup:
    """A proxy with two routes by host, its local CA, and the two sides."""

    url: str
    ca_file: Path  # tokenproxy's local CA: what clients trust
    left: Side
    right: Side
    app: aiohttp.web.Application


async def _side(aiohttp_server: Any, upstream_ca: TestCa) -> Side:
    tokens = FakeTokenServer()
    server = await aiohttp_server(tokens.app(), host="127.0.0.1")
    tokens.base_url = str(server.make_url("")).rstrip("/")
    api = FakeApi(tokens.signing_key)
    api_server = await aiohttp_server(api.app(), host="127.0.0.1", ssl=upstream_ca.server_context(require_client=False))
    api.base_url = f"https://127.0.0.1:{api_server.port}"
    return Side(tokens, api)


def _credential(side: Side, state: Path) -> dict[str, Any]:
    return {
        "grant": "refresh_token",
        "token_url": f"{side.tokens.base_url}/oauth/token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": side.tokens.current_refresh,
        "state_file": str(state),
        "min_refresh_interval": 0.0,
        "timeout": 5.0,
    }


@pytest.fixture
async def setup(aiohttp_server: Any, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    """The proxy (with a local CA) in front of two TLS APIs; stopped at the end. Parametrized indirectly with a dict:
    `ca: False` for none, `server` for more `[server]` keys."""
    param = getattr(request, "param", {})
    upstream_ca = TestCa(tmp_path)
    left, right = await _side(aiohttp_server, upstream_ca), await _side(aiohttp_server, upstream_ca)
    ca_dir = tmp_path / "ca"
    ca_file = create_ca(ca_dir) if param.get("ca", True) else ca_dir / "ca.crt"
    if "key_mode" in param:
        (ca_dir / "ca.key").chmod(param["key_mode"])
    state = tmp_path / "state.json"
    raw = {
        "server": {"listen": "127.0.0.1:0", "ca_dir": str(ca_dir), **param.get("server", {})},
        "queue": {"wait_timeout": 10.0},
        "credentials": {"lc": _credential(left, state), "rc": _credential(right, state)},
        "route": [
            {"name": "left", "host": "left.test", "url": left.api.base_url, "token": "lc",
             "ca_file": str(upstream_ca.ca_file)},
            {"name": "right", "host": "right.test", "url": right.api.base_url, "token": "rc",
             "ca_file": str(upstream_ca.ca_file)},
        ],
    }
    config = parse_config(raw, {})
    app = build_app(config)
    runner = make_runner(app, config)
    await runner.setup()
    try:
        url = await start_listener(runner, "127.0.0.1:0")
        yield Setup(url, ca_file, left, right, app)
    finally:
        await runner.cleanup()


def bearer_of(echo: dict[str, Any]) -> str | None:
    """The Authorization header the upstream received, from /echo's answer."""
    for name, value in echo["headers"]:
        if name.lower() == "authorization":
            return str(value)
    return None


async def curl(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run curl to its end (bounded); the exit code, output and errors."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "15", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ["PATH"], **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BOUND)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.asyncio(loop_factories=BOTH_LOOPS)
async def test_connect_curl_reaches_each_route_with_its_own_credential(setup: Setup) -> None:
    code, out, err = await curl("--cacert", str(setup.ca_file), "-x", setup.url, "https://left.test/echo/a?q=1")
    assert (code, err) == (0, "")
    echo = json.loads(out)
    assert echo["raw_path"] == "/echo/a?q=1"
    assert bearer_of(echo) == f"Bearer {setup.left.tokens.issued_access[-1]}"
    # HTTPS_PROXY from the environment, as a tool that cannot be told anything else gets it.
    code, out, err = await curl(
        "--cacert", str(setup.ca_file), "https://right.test/echo/b", env={"HTTPS_PROXY": setup.url}
    )
    assert (code, err) == (0, "")
    assert bearer_of(json.loads(out)) == f"Bearer {setup.right.tokens.issued_access[-1]}"
    assert (setup.left.api.requests, setup.right.api.requests) == (1, 1)
    assert (len(setup.left.tokens.calls), len(setup.right.tokens.calls)) == (1, 1)


async def test_connect_requests_and_httpx_through_https_proxy(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", setup.url)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(setup.ca_file))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    def with_requests() -> tuple[int, Any]:
        answer = requests.post("https://left.test/echo/r", data=b"hello", timeout=15)
        return answer.status_code, answer.json()

    status, echo = await asyncio.to_thread(with_requests)
    assert status == 200 and echo["body"] == "hello"
    assert bearer_of(echo) == f"Bearer {setup.left.tokens.issued_access[-1]}"

    trust = ssl.create_default_context(cafile=str(setup.ca_file))
    async with httpx.AsyncClient(proxy=setup.url, verify=trust, trust_env=False) as client:
        answer = await client.get("https://right.test/echo/h", timeout=15)
    assert answer.status_code == 200
    assert answer.http_version == "HTTP/1.1"
    assert bearer_of(answer.json()) == f"Bearer {setup.right.tokens.issued_access[-1]}"


@pytest.mark.asyncio(loop_factories=BOTH_LOOPS)
async def test_connect_refresh_storm_inside_tunnels_one_token_call_per_credential(setup: Setup) -> None:
    trust = ssl.create_default_context(cafile=str(setup.ca_file))
    async with aiohttp.ClientSession() as client:
        # One token each, then both expire at the API: a storm of requests through tunnels renews each once.
        for host in ("left.test", "right.test"):
            async with client.get(f"https://{host}/echo/first", proxy=setup.url, ssl=trust) as resp:
                assert resp.status == 200
        for side in (setup.left, setup.right):
            side.api.expire_all(side.tokens.issued_access)

        async def one(host: str, n: int) -> tuple[int, str]:
            async with client.get(f"https://{host}/echo/{n}", proxy=setup.url, ssl=trust) as resp:
                return resp.status, bearer_of(await resp.json()) or ""

        results = await asyncio.wait_for(
            asyncio.gather(*(one(host, n) for n in range(25) for host in ("left.test", "right.test"))), BOUND
        )
    assert {status for status, _ in results} == {200}
    assert (len(setup.left.tokens.calls), len(setup.right.tokens.calls)) == (2, 2)
    assert {bearer for _, bearer in results} == {
        f"Bearer {setup.left.tokens.issued_access[-1]}", f"Bearer {setup.right.tokens.issued_access[-1]}"
    }


async def test_connect_large_streamed_upload_and_download_inside_a_tunnel(setup: Setup) -> None:
    trust = ssl.create_default_context(cafile=str(setup.ca_file))
    size = 24 * 1024 * 1024
    block = os.urandom(1024 * 1024)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    async with aiohttp.ClientSession() as client:
        async with client.post("https://left.test/upload", data=body(), proxy=setup.url, ssl=trust) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["length"] == size
        assert answer["sha256"] == hashlib.sha256(block * (size // len(block))).hexdigest()
        digest, total = hashlib.sha256(), 0
        async with client.get(f"https://right.test/download/{size}", proxy=setup.url, ssl=trust) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                digest.update(chunk)
                total += len(chunk)
    expected = (bytes(range(256)) * 256) * (size // 65536)
    assert (total, digest.hexdigest()) == (size, hashlib.sha256(expected).hexdigest())


async def connect_raw(url: str, target: bytes, headers: bytes = b"") -> bytes:
    """Send `CONNECT target` and read the proxy's answer to its end."""
    reader, writer = await open_raw(url)
    try:
        writer.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n" + headers + b"\r\n")
        return await read_to_eof(reader)
    finally:
        await close_raw(writer)


@pytest.mark.asyncio(loop_factories=BOTH_LOOPS)
async def test_connect_to_an_unrouted_host_403_nothing_forwarded(setup: Setup) -> None:
    answer = await connect_raw(setup.url, b"elsewhere.test:443")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert json.loads(body) == {
        "error": "forbidden", "detail": "CONNECT to elsewhere.test:443 is not allowed: no route names this host"
    }
    # The upstream's own address is not a route's host either.
    answer = await connect_raw(setup.url, setup.left.api.base_url.removeprefix("https://").encode())
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    code, _, err = await curl("--cacert", str(setup.ca_file), "-x", setup.url, "https://elsewhere.test/echo")
    assert code != 0 and "403" in err
    assert (setup.left.api.requests, setup.right.api.requests) == (0, 0)
    assert (len(setup.left.tokens.calls), len(setup.right.tokens.calls)) == (0, 0)


async def test_connect_malformed_target_400(setup: Setup) -> None:
    for target in (b"left.test", b"left.test:0", b"left.test:99999", b"-x:443", b"left.test:443/x"):
        answer = await connect_raw(setup.url, target)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), target
        assert json.loads(body)["error"] == "bad_request"
    assert setup.left.api.requests == 0


async def tunnel(url: str, host: str, ca_file: Path, server_hostname: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A CONNECT tunnel to `host:443` through the proxy, with TLS started inside it (SNI `server_hostname`)."""
    reader, writer = await open_raw(url)
    writer.write(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
    assert head == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    context = ssl.create_default_context(cafile=str(ca_file))
    if server_hostname is None:
        context.check_hostname = False
    await asyncio.wait_for(writer.start_tls(context, server_hostname=server_hostname), BOUND)
    return reader, writer


async def test_connect_inner_request_naming_another_host_400_no_token_sent(setup: Setup) -> None:
    for request in (
        b"GET /echo HTTP/1.1\r\nHost: right.test\r\nConnection: close\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: left.test:8443\r\nConnection: close\r\n\r\n",
        b"GET /echo HTTP/1.0\r\nConnection: close\r\n\r\n",
        b"GET https://right.test/echo HTTP/1.1\r\nHost: left.test\r\nConnection: close\r\n\r\n",
    ):
        reader, writer = await tunnel(setup.url, "left.test", setup.ca_file, "left.test")
        try:
            writer.write(request)
            answer = await read_to_eof(reader)
        finally:
            await close_raw(writer)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith((b"HTTP/1.1 400 Bad Request\r\n", b"HTTP/1.0 400 Bad Request\r\n")), request
        assert json.loads(body) == {
            "error": "bad_request",
            "detail": "a request inside the tunnel to left.test:443 must name that host (its Host header or absolute-form target)",
        }
    assert (setup.left.api.requests, setup.right.api.requests) == (0, 0)
    # The same tunnel, naming its host: served along the left route.
    reader, writer = await tunnel(setup.url, "left.test", setup.ca_file, "left.test")
    try:
        writer.write(b"GET /echo/ok HTTP/1.1\r\nHost: left.test\r\nConnection: close\r\n\r\n")
        answer = await read_to_eof(reader)
    finally:
        await close_raw(writer)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert (setup.left.api.requests, setup.right.api.requests) == (1, 0)
    text = setup.app[METRICS].render().decode()
    assert "tokenproxy_unrouted_requests_total 4.0" in text  # the four refused, not as the left route's
    assert 'tokenproxy_requests_total{route="left",status_class="4xx"} 0.0' in text


async def test_connect_sni_naming_another_host_fails_the_handshake(setup: Setup) -> None:
    for sni in ("right.test", None):
        reader, writer = await open_raw(setup.url)
        try:
            writer.write(b"CONNECT left.test:443 HTTP/1.1\r\nHost: left.test:443\r\n\r\n")
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection Established\r\n\r\n"
            context = ssl.create_default_context(cafile=str(setup.ca_file))
            context.check_hostname = False
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.wait_for(writer.start_tls(context, server_hostname=sni), BOUND)
        finally:
            await close_raw(writer)
    assert (setup.left.api.requests, setup.right.api.requests) == (0, 0)
    assert (len(setup.left.tokens.calls), len(setup.right.tokens.calls)) == (0, 0)


@pytest.mark.asyncio(loop_factories=BOTH_LOOPS)
async def test_connect_client_not_trusting_the_ca_gets_a_tls_error_nothing_sent(setup: Setup) -> None:
    code, out, err = await curl("-x", setup.url, "https://left.test/echo")  # the system's roots only
    assert code == 60 and out == ""
    assert "certificate" in err
    assert setup.left.api.requests == 0 and len(setup.left.tokens.calls) == 0


@pytest.mark.parametrize("setup", [{"ca": False}], indirect=True, ids=["no-ca"])
async def test_connect_without_a_local_ca_503_saying_ca_init(
    setup: Setup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    warnings = [r.getMessage() for r in caplog.get_records("setup") if r.levelno == logging.WARNING]
    assert warnings == [
        f"HTTPS_PROXY tunnels to the routes' hosts are refused (503): no local CA in {tmp_path / 'ca'}: "
        "run `tokenproxy ca init`"
    ]
    answer = await connect_raw(setup.url, b"left.test:443")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert json.loads(body) == {
        "error": "no_local_ca",
        "detail": f"cannot intercept the tunnel to left.test: no local CA in {tmp_path / 'ca'}: run `tokenproxy ca init`",
    }
    # Requests that name their upstream by Host on the proxy port are served as ever.
    async with aiohttp.ClientSession() as client, client.get(
        f"{setup.url}/echo/plain", headers={"Host": "left.test"}
    ) as resp:
        assert resp.status == 200
    assert setup.left.api.requests == 1


async def test_connect_on_a_kept_alive_connection_400_must_open_its_connection(setup: Setup) -> None:
    reader, writer = await open_raw(setup.url)
    try:
        writer.write(b"GET /echo HTTP/1.1\r\nHost: nowhere.test\r\n\r\nCONNECT left.test:443 HTTP/1.1\r\nHost: left.test:443\r\nConnection: close\r\n\r\n")
        answer = await read_to_eof(reader)
    finally:
        await close_raw(writer)
    first, _, rest = answer.partition(b"HTTP/1.1 400 Bad Request\r\n")
    assert first.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert rest.endswith(b'{"error": "bad_request", "detail": "CONNECT must open its connection: send it on a new connection"}')


async def test_no_token_to_an_unrouted_host_by_absolute_form_or_host_header(setup: Setup) -> None:
    async with aiohttp.ClientSession() as client:
        for url, headers in (
            (f"{setup.url}/echo", {"Host": "elsewhere.test"}),
            (f"{setup.url}/echo", {"Host": "left.test.elsewhere.test"}),
        ):
            async with client.get(url, headers=headers) as resp:
                assert resp.status == 404 and (await resp.json())["error"] == "no_route"
    reader, writer = await open_raw(setup.url)
    try:
        writer.write(b"GET http://elsewhere.test/echo HTTP/1.1\r\nHost: left.test\r\nConnection: close\r\n\r\n")
        answer = await read_to_eof(reader)
    finally:
        await close_raw(writer)
    assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert (setup.left.api.requests, setup.right.api.requests) == (0, 0)


PASSTHROUGH = {"server": {"connect_passthrough": ["127.0.0.1:*", "*.elsewhere.test"]}}


@pytest.mark.asyncio(loop_factories=BOTH_LOOPS)
@pytest.mark.parametrize("setup", [PASSTHROUGH], indirect=True, ids=["passthrough"])
async def test_passthrough_tunnel_copies_bytes_both_ways_to_a_tcp_server(setup: Setup) -> None:
    received = bytearray()
    closed = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                received.extend(data)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            closed.set()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await open_raw(setup.url)
        try:
            writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
            assert head == b"HTTP/1.1 200 Connection Established\r\n\r\n"
            payload = os.urandom(3 * 1024 * 1024)
            writer.write(payload)
            back = await asyncio.wait_for(reader.readexactly(len(payload)), BOUND)
            assert back == payload
        finally:
            await close_raw(writer)
        await asyncio.wait_for(closed.wait(), BOUND)  # the client's end closed the tunnel's far end too
    finally:
        server.close()
        await server.wait_closed()
    assert bytes(received) == payload
    assert (setup.left.api.requests, setup.right.api.requests) == (0, 0)


@pytest.mark.parametrize("setup", [PASSTHROUGH], indirect=True, ids=["passthrough"])
async def test_passthrough_tunnel_to_an_https_server_adds_no_authorization(
    setup: Setup, aiohttp_server: Any, tmp_path: Path
) -> None:
    seen: list[dict[str, str]] = []

    async def record(request: aiohttp.web.Request) -> aiohttp.web.Response:
        seen.append(dict(request.headers))
        return aiohttp.web.json_response({"ok": True})

    app = aiohttp.web.Application()
    app.router.add_get("/", record)
    (tmp_path / "other").mkdir()
    other_ca = TestCa(tmp_path / "other")
    other = await aiohttp_server(app, host="127.0.0.1", ssl=other_ca.server_context(require_client=False))
    trust = ssl.create_default_context(cafile=str(other_ca.ca_file))
    async with aiohttp.ClientSession() as client, client.get(
        f"https://127.0.0.1:{other.port}/", proxy=setup.url, ssl=trust
    ) as resp:
        assert resp.status == 200
        # The far server's own certificate: the tunnel is blind.
        assert await resp.json() == {"ok": True}
    assert len(seen) == 1
    assert "Authorization" not in seen[0] and "Proxy-Authorization" not in seen[0]
    assert (len(setup.left.tokens.calls), len(setup.right.tokens.calls)) == (0, 0)


@pytest.mark.parametrize("setup", [PASSTHROUGH], indirect=True, ids=["passthrough"])
async def test_passthrough_patterns_default_to_port_443_and_unreachable_targets_get_502(setup: Setup) -> None:
    # *.elsewhere.test names no port: only 443 passes; another port is refused like any unrouted host.
    answer = await connect_raw(setup.url, b"git.elsewhere.test:22")
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    answer = await connect_raw(setup.url, b"x.elsewhere.test:443")  # passes, but does not resolve
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert json.loads(body)["error"] == "upstream_unreachable"
    assert json.loads(body)["detail"].startswith("cannot connect to x.elsewhere.test:443 (")


@pytest.mark.parametrize("setup", [{"key_mode": 0o644}, {"key_mode": 0o666}], indirect=True, ids=["readable", "writable"])
async def test_connect_with_a_ca_key_others_can_read_or_write_is_not_used(setup: Setup, tmp_path: Path) -> None:
    answer = await connect_raw(setup.url, b"left.test:443")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    key = tmp_path / "ca" / "ca.key"
    detail = json.loads(body)["detail"]
    assert detail.startswith(f"cannot intercept the tunnel to left.test: CA key {key} is ")
    assert detail.endswith(("chmod 600 " + str(key), "chmod 600 it if you trust what it holds"))


CLIENT_TOKEN = "client-token-0123456789"


@pytest.mark.parametrize("setup", [{"server": {"client_token": CLIENT_TOKEN}}], indirect=True, ids=["client-token"])
async def test_connect_checks_the_client_token_on_the_connect(setup: Setup) -> None:
    answer = await connect_raw(setup.url, b"left.test:443")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'\r\nProxy-Authenticate: Bearer realm="tokenproxy"' in head
    assert json.loads(body)["error"] == "forbidden"
    code, out, err = await curl(
        "--cacert", str(setup.ca_file), "-x", setup.url,
        "--proxy-header", f"Proxy-Authorization: Bearer {CLIENT_TOKEN}", "https://left.test/echo/in",
    )
    assert (code, err) == (0, "")
    echo = json.loads(out)
    assert bearer_of(echo) == f"Bearer {setup.left.tokens.issued_access[-1]}"
    assert not any(name.lower() == "proxy-authorization" for name, _ in echo["headers"])
    assert setup.left.api.requests == 1


@pytest.mark.parametrize(
    "setup", [{"server": {"header_timeout": 0.2, "keepalive_timeout": 1.0}}], indirect=True, ids=["short-timeouts"]
)
async def test_a_request_whose_first_byte_looks_like_connect_is_served_and_left_alone(setup: Setup) -> None:
    reader, writer = await open_raw(setup.url)
    try:
        writer.write(b"C")  # COPY: its first byte could begin a CONNECT
        await writer.drain()
        for _ in range(3):  # the proxy runs on this loop: let it read the lone byte (no waiting on time)
            await asyncio.sleep(0)
        writer.write(b"OPY /method HTTP/1.1\r\nHost: left.test\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
        assert await reader.readexactly(length) == b"COPY"
        # Idle afterwards: closed by keepalive_timeout, with no stray 408 from a header timer of the CONNECT check.
        assert await read_to_eof(reader) == b""
    finally:
        await close_raw(writer)


@pytest.mark.parametrize("setup", [{"server": {"max_connections": 2}}], indirect=True, ids=["cap-2"])
async def test_tunnels_give_back_their_place_in_max_connections(setup: Setup) -> None:
    for _ in range(3):
        code, _, err = await curl("--cacert", str(setup.ca_file), "-x", setup.url, "https://left.test/echo/t")
        assert (code, err) == (0, "")
    assert (await connect_raw(setup.url, b"elsewhere.test:443")).startswith(b"HTTP/1.1 403 ")
    code, _, _ = await curl("-x", setup.url, "https://right.test/echo")  # the CA not trusted: handshake fails
    assert code == 60

    async def both_served() -> bool:
        connections = [await open_raw(setup.url) for _ in range(2)]
        try:
            for _, writer in connections:
                writer.write(b"GET /echo/cap HTTP/1.1\r\nHost: left.test\r\nConnection: close\r\n\r\n")
            answers = [await read_to_eof(reader) for reader, _ in connections]
        finally:
            for _, writer in connections:
                await close_raw(writer)
        return all(answer.startswith(b"HTTP/1.1 200 OK\r\n") for answer in answers)

    # The closed tunnels' places come back as their connections are lost: poll, with a deadline.
    deadline = asyncio.get_running_loop().time() + BOUND
    while not await both_served():
        assert asyncio.get_running_loop().time() < deadline, "a closed tunnel still holds its place"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("setup", [{"server": {"keepalive_timeout": 0.3}}], indirect=True, ids=["short-keepalive"])
async def test_a_connection_that_never_sends_a_byte_is_closed_after_keepalive_timeout(setup: Setup) -> None:
    reader, writer = await open_raw(setup.url)
    try:
        assert await read_to_eof(reader) == b""  # closed by the proxy, within the bound
    finally:
        await close_raw(writer)

"""Who may use the proxy: the loopback default, allow_from, the client token, a 0600 unix socket."""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import stat
from pathlib import Path

import aiohttp
import pytest

from proxy.runtime.app import METRICS
from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import CLIENT_SECRET, FakeTokenServer
from tests.helpers import ProxyFactory, read_until, run_cli, start_cli, write_config

CLIENT_TOKEN = "client-token-0123456789abcdef"


async def access_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    """The access lines logged so far, once there are `count` of them (or after a bounded wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "tokenproxy.access"]
        if len(lines) >= count or loop.time() > deadline:
            return lines
        await asyncio.sleep(0.02)


async def test_access_non_loopback_listen_without_rule_refuses_to_start(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """listen = 0.0.0.0 with no access rule: exit 2, the message names server.allow_from."""
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    path.write_text(path.read_text().replace('listen = "127.0.0.1:0"', 'listen = "0.0.0.0:0"'))
    code, _, err = await run_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    assert code == 2
    assert err.startswith("config: server.listen: 0.0.0.0 is reachable from other machines")
    assert "server.allow_from" in err and "server.client_token" in err and "server.allow_any" in err


async def test_access_allow_from_other_range_gets_403_not_forwarded(
    make_proxy: ProxyFactory, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """A client outside server.allow_from gets 403 forbidden and nothing reaches the upstream."""
    proxy = await make_proxy(server={"allow_from": ["10.0.0.0/8"]})
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 403
        assert resp.headers["X-Tokenproxy-Error"] == "forbidden"
        assert (await resp.json())["error"] == "forbidden"
    assert api.requests == 0


async def test_access_allow_from_matching_range_forwards(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A client inside server.allow_from is served."""
    proxy = await make_proxy(server={"allow_from": ["127.0.0.0/8", "::1/128"]})
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 200


async def test_access_client_token_missing_gets_407(
    make_proxy: ProxyFactory, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """With server.client_token set, a request without it gets 407 and a Proxy-Authenticate challenge."""
    proxy = await make_proxy(server={"client_token": CLIENT_TOKEN})
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 407
        assert resp.headers["Proxy-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"] == "forbidden"
    assert api.requests == 0


async def test_access_client_token_wrong_gets_403(
    make_proxy: ProxyFactory, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """A wrong client token gets 403 forbidden."""
    proxy = await make_proxy(server={"client_token": CLIENT_TOKEN})
    async with client.get(f"{proxy.url}/echo/x", headers={"Proxy-Authorization": "Bearer nope"}) as resp:
        assert resp.status == 403
        body = await resp.text()
    assert CLIENT_TOKEN not in body
    assert api.requests == 0


async def test_access_refusals_have_access_lines_and_are_counted(
    make_proxy: ProxyFactory, api: FakeApi, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A 407 (no client token) and a 403 (a wrong one) each get an access line and count as the route's 4xx
    requests in /metrics, as a forwarded request's answer would; the query string and the token are not logged."""
    caplog.set_level(logging.INFO, logger="tokenproxy.access")
    proxy = await make_proxy(server={"client_token": CLIENT_TOKEN})
    async with client.get(f"{proxy.url}/echo/none?q=1") as resp:
        assert resp.status == 407
    async with client.get(f"{proxy.url}/echo/wrong", headers={"Proxy-Authorization": "Bearer nope"}) as resp:
        assert resp.status == 403
    async with client.get(f"{proxy.url}/echo/right", headers={"Proxy-Authorization": f"Bearer {CLIENT_TOKEN}"}) as resp:
        assert resp.status == 200
    lines = await access_lines(caplog, 3)
    assert [line.split(" resent=")[0].rsplit(" ", 1)[0] for line in lines] == [
        '"GET /echo/none" 407',
        '"GET /echo/wrong" 403',
        '"GET /echo/right" 200',
    ]
    assert all(line.endswith("route=default") and "nope" not in line and "q=1" not in line for line in lines)
    text = proxy.app[METRICS].render().decode()
    assert 'tokenproxy_requests_total{route="default",status_class="4xx"} 2.0' in text
    assert 'tokenproxy_requests_total{route="default",status_class="2xx"} 1.0' in text
    assert api.requests == 1


@pytest.mark.parametrize(
    ("credentials", "status"),
    [("any-user:" + CLIENT_TOKEN, 200), (CLIENT_TOKEN + ":", 200), ("any-user:wrong", 403), ("any-user:", 403)],
    ids=["token-as-password", "token-as-user", "wrong-password", "no-password"],
)
async def test_access_client_token_in_basic_credentials(
    make_proxy: ProxyFactory, api: FakeApi, client: aiohttp.ClientSession, credentials: str, status: int
) -> None:
    """A proxy URL's `user:TOKEN@` (or `TOKEN:@`) arrives as `Proxy-Authorization: Basic`: the token in it is
    checked like a Bearer one; a 407 offers both schemes."""
    proxy = await make_proxy(server={"client_token": CLIENT_TOKEN})
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 407
        assert resp.headers.getall("Proxy-Authenticate") == ['Bearer realm="tokenproxy"', 'Basic realm="tokenproxy"']
    encoded = base64.b64encode(credentials.encode()).decode()
    async with client.get(f"{proxy.url}/echo/x", headers={"Proxy-Authorization": f"Basic {encoded}"}) as resp:
        assert resp.status == status
        if status == 200:
            seen = await resp.json()
            assert [name for name, _ in seen["headers"] if name.lower() == "proxy-authorization"] == []
    assert api.requests == (1 if status == 200 else 0)


async def test_access_client_token_right_forwards_without_it(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The right client token is accepted and not forwarded upstream."""
    proxy = await make_proxy(server={"client_token": CLIENT_TOKEN})
    async with client.get(f"{proxy.url}/echo/x", headers={"Proxy-Authorization": f"Bearer {CLIENT_TOKEN}"}) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert all(CLIENT_TOKEN not in value for _, value in seen["headers"])


async def test_access_client_token_custom_header_removed_before_forwarding(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A client token in a configured header is checked and removed before forwarding."""
    proxy = await make_proxy(server={"client_token": CLIENT_TOKEN, "client_token_header": "X-Proxy-Token"})
    async with client.get(f"{proxy.url}/echo/x", headers={"X-Proxy-Token": CLIENT_TOKEN}) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert [name for name, _ in seen["headers"] if name.lower() == "x-proxy-token"] == []


async def test_access_unix_socket_is_0600_and_serves(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """listen = unix:PATH creates the socket 0600 and serves requests over it."""
    sock = tmp_path / "tp.sock"
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    path.write_text(path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "unix:{sock}"'))
    proc = await start_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, r"listening on unix:", seen)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session:
            async with session.get("http://localhost/echo/unix") as resp:
                assert resp.status == 200
                assert (await resp.json())["raw_path"] == "/echo/unix"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0

"""A token endpoint that fails: the right 503 each time, back-off, final failures, and recovery."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.auth.endpoint import MAX_ANSWER_BYTES
from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import FakeClock, FakeTokenServer, until
from tests.helpers import saved_entry


async def assert_proxy_error(resp: aiohttp.ClientResponse, code: str, *, retry_after: bool) -> None:
    """The answer is tokenproxy's own 503 with `code` in the header and the JSON body, and no token."""
    assert resp.status == 503
    assert resp.headers["X-Tokenproxy-Error"] == code
    assert resp.content_type == "application/json"
    body = json.loads(await resp.read())
    assert body["error"] == code and body["detail"]
    assert ("Retry-After" in resp.headers) is retry_after
    if retry_after:
        assert int(resp.headers["Retry-After"]) >= 1


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_failure_token_endpoint_down_gives_token_unavailable(
    make_proxy, client: aiohttp.ClientSession
) -> None:
    """A token endpoint that refuses connections gives 503 token_unavailable with Retry-After."""
    proxy = await make_proxy(token={"token_url": f"http://127.0.0.1:{closed_port()}/oauth/token"})

    async with client.get(f"{proxy.url}/echo/x") as resp:
        await assert_proxy_error(resp, "token_unavailable", retry_after=True)


async def test_failure_token_endpoint_hangs_gives_token_unavailable(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """A token endpoint that never answers gives 503 token_unavailable after token.timeout."""
    token_server.mode = "hang"
    proxy = await make_proxy(token={"timeout": 0.3})

    async with client.get(f"{proxy.url}/echo/x") as resp:
        await assert_proxy_error(resp, "token_unavailable", retry_after=True)
    assert token_server.count == 1


@pytest.mark.parametrize("mode", ["500", "html", "garbage_json", "no_token"])
async def test_failure_token_endpoint_bad_answer_gives_token_unavailable(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, mode: str
) -> None:
    """A 500, an HTML page, or JSON without an access_token gives 503 token_unavailable."""
    token_server.mode = mode
    proxy = await make_proxy()

    async with client.get(f"{proxy.url}/echo/x") as resp:
        await assert_proxy_error(resp, "token_unavailable", retry_after=True)
    assert token_server.count == 1


async def test_failure_invalid_grant_is_final_login_required(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """A rejected refresh token gives 503 login_required, and later requests never call the endpoint again."""
    clock = FakeClock()
    token_server.mode = "invalid_grant"
    proxy = await make_proxy(clock=clock)

    async with client.get(f"{proxy.url}/echo/x") as resp:
        await assert_proxy_error(resp, "login_required", retry_after=False)
    clock.advance(3600)  # far beyond any back-off
    for _ in range(3):
        async with client.get(f"{proxy.url}/echo/x") as resp:
            await assert_proxy_error(resp, "login_required", retry_after=False)
    assert token_server.count == 1
    assert proxy.tokens.status().dead == "login_required"


async def test_failure_invalid_client_is_final_token_unavailable(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """A rejected client gives 503 token_unavailable, and later requests never call the endpoint again."""
    clock = FakeClock()
    token_server.mode = "invalid_client"
    proxy = await make_proxy(clock=clock)

    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.headers["X-Tokenproxy-Error"] == "token_unavailable"
        assert resp.status == 503
    clock.advance(3600)
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503
        assert json.loads(await resp.read())["error"] == "token_unavailable"
    assert token_server.count == 1
    assert proxy.tokens.status().dead == "token_unavailable"


async def test_failure_backoff_many_requests_one_token_call(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """After a failed refresh, requests during back-off fail fast with Retry-After, no endpoint call."""
    clock = FakeClock()
    token_server.mode = "500"
    proxy = await make_proxy(clock=clock, token={"backoff_initial": 5.0, "backoff_max": 60.0})
    async with client.get(f"{proxy.url}/echo/first") as resp:
        await assert_proxy_error(resp, "token_unavailable", retry_after=True)

    async def one(i: int) -> None:
        async with client.get(f"{proxy.url}/echo/{i}") as resp:
            await assert_proxy_error(resp, "token_unavailable", retry_after=True)
            assert int(resp.headers["Retry-After"]) == 5

    await asyncio.gather(*(one(i) for i in range(50)))
    assert token_server.count == 1


async def test_failure_backoff_grows_after_repeated_failures(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """Each failure after a back-off doubles the next wait, up to backoff_max."""
    clock = FakeClock()
    token_server.mode = "500"
    proxy = await make_proxy(clock=clock, token={"backoff_initial": 5.0, "backoff_max": 12.0})
    seen = []
    for _ in range(4):
        async with client.get(f"{proxy.url}/echo/x") as resp:
            assert resp.headers["X-Tokenproxy-Error"] == "token_unavailable"
            seen.append(int(resp.headers["Retry-After"]))
        clock.advance(60)
    assert seen == [5, 10, 12, 12]
    assert token_server.count == 4


async def test_failure_endpoint_back_after_backoff_recovers_by_itself(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """Once the endpoint is back and the back-off has passed, the next request gets a token."""
    clock = FakeClock()
    token_server.mode = "500"
    proxy = await make_proxy(clock=clock, token={"backoff_initial": 5.0})
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503
    token_server.mode = "ok"
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503  # still backing off: the endpoint is not asked
    assert token_server.count == 1

    clock.advance(6)
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 200
    assert token_server.count == 2
    assert proxy.tokens.status().failures == 0


async def test_failure_refresh_after_401_fails_returns_upstream_401_unchanged(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """A request whose 401 triggered a refresh that failed gets the upstream's own 401, body and challenge."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    api.expire_all(token_server.issued_access)
    headers = {"Authorization": f"Bearer {token_server.issued_access[0]}"}
    async with client.get(f"{api.base_url}/echo/x", headers=headers) as direct:  # type: ignore[attr-defined]
        expected_body = await direct.read()
        expected_challenge = direct.headers["WWW-Authenticate"]
    token_server.mode = "500"

    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 401
        assert await resp.read() == expected_body
        assert resp.headers["WWW-Authenticate"] == expected_challenge
        assert "X-Tokenproxy-Error" not in resp.headers
    assert token_server.count == 2


# Answers that rotate the refresh token but cannot give a usable access token, as FakeTokenServer settings.
ROTATED_BUT_BAD: dict[str, dict[str, Any]] = {
    "access_token_crlf": {"access_value": "abc\r\nX-Injected: 1"},
    "access_token_non_ascii": {"access_value": "caf\u00e9-token"},
    "no_access_token": {"mode": "no_token"},
    "expires_in_400_digits": {"lifetime": 10**400},
    "expires_in_nan": {"lifetime": float("nan")},
    "expires_in_infinity": {"lifetime": float("inf")},
    "jwt_exp_400_digits": {"lifetime": None, "jwt_exp": 10**400},
    "jwt_exp_nan": {"lifetime": None, "jwt_exp": float("nan")},
}
HEALTHY = {"access_value": None, "mode": "ok", "lifetime": 300.0, "jwt_exp": None}


def configure(token_server: FakeTokenServer, settings: dict[str, Any]) -> None:
    """Set FakeTokenServer attributes."""
    for name, value in settings.items():
        setattr(token_server, name, value)


def failure_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The token manager's `refresh failed` warnings."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "tokenproxy.tokens" and r.levelno == logging.WARNING and "refresh failed" in r.getMessage()
    ]


@pytest.mark.parametrize("bad", list(ROTATED_BUT_BAD))
async def test_failure_bad_answer_keeps_rotated_refresh_token_and_backs_off(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, bad: str
) -> None:
    """An answer that rotates the refresh token but is otherwise unusable: a logged, backed-off failure
    whose rotated refresh token is in the state file and presented next; the grant is never revoked."""
    clock = FakeClock()
    original = token_server.current_refresh
    configure(token_server, ROTATED_BUT_BAD[bad])
    proxy = await make_proxy(clock=clock, token={"backoff_initial": 5.0, "backoff_max": 60.0})

    async with client.get(f"{proxy.url}/echo/first") as resp:
        await assert_proxy_error(resp, "token_unavailable", retry_after=True)
    rotated = token_server.current_refresh
    assert rotated != original and token_server.count == 1
    saved = saved_entry(Path(proxy.config.token.state_file))
    assert saved["refresh_token"] == rotated
    assert saved["access_token"] == ""  # the unusable access token is never saved
    status = proxy.tokens.status()
    assert (status.failures, status.last_error, status.usable) == (1, "token_unavailable", False)
    assert status.backoff_until == clock.now + 5.0
    [line] = failure_lines(caplog)
    assert "failures=1" in line and "retry_in=5.0s" in line and "rotated=yes" in line

    async with client.get(f"{proxy.url}/echo/backing-off") as resp:  # backed off: no call
        await assert_proxy_error(resp, "token_unavailable", retry_after=True)
    assert token_server.count == 1

    configure(token_server, HEALTHY)
    clock.advance(6)
    async with client.get(f"{proxy.url}/echo/again") as resp:
        assert resp.status == 200
    assert token_server.calls[-1].form["refresh_token"] == rotated
    assert token_server.count == 2
    assert not token_server.reuse_detected and not token_server.revoked
    assert proxy.tokens.status().failures == 0


async def test_failure_bad_answer_during_refresh_ahead_saves_rotated_with_current_token(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """A refresh-ahead whose answer is bad: the still-valid token keeps serving, and the state file
    holds it together with the rotated refresh token."""
    clock = FakeClock()
    token_server.lifetime = 100.0
    proxy = await make_proxy(clock=clock, token={"backoff_initial": 5.0, "backoff_max": 60.0})
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    current = token_server.issued_access[0]
    token_server.access_value = "bad token"
    clock.advance(80)
    async with client.get(f"{proxy.url}/echo/ahead") as resp:
        assert resp.status == 200
    await until(lambda: not proxy.tokens.status().refreshing)
    assert token_server.count == 2 and proxy.tokens.status().failures == 1
    saved = saved_entry(Path(proxy.config.token.state_file))
    assert (saved["access_token"], saved["refresh_token"]) == (current, token_server.current_refresh)
    assert saved["generation"] == 1


async def test_failure_bad_answer_rotated_refresh_token_survives_restart(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """A proxy restarted after such a failure presents the rotated refresh token from its state file."""
    original = token_server.current_refresh
    token_server.access_value = "line\r\nX-Injected: 1"
    first = await make_proxy(token={"refresh_token": original})
    async with client.get(f"{first.url}/echo/x") as resp:
        assert resp.status == 503
    await first.stop()
    rotated = token_server.current_refresh

    token_server.access_value = None
    second = await make_proxy(token={"refresh_token": original})  # the same login, the same state file
    async with client.get(f"{second.url}/echo/x") as resp:
        assert resp.status == 200
    assert token_server.calls[-1].form["refresh_token"] == rotated
    assert not token_server.reuse_detected and not token_server.revoked


@pytest.mark.parametrize("mode", ["huge", "huge_declared"])
@pytest.mark.parametrize("endpoint", ["oauth", "json"])
async def test_failure_huge_answer_refused_and_connection_dropped(
    make_proxy,
    token_server: FakeTokenServer,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    endpoint: str,
) -> None:
    """A token endpoint streaming an endless answer (chunked, or with a huge Content-Length): the refresh
    fails with token_unavailable after at most 1 MiB, is logged and backed off, and the connection is dropped."""
    clock = FakeClock()
    token_server.mode = mode
    token: dict[str, Any] = {"backoff_initial": 5.0, "backoff_max": 60.0}
    if endpoint == "json":
        token.update(grant="json", token_url=f"{token_server.base_url}/auth/refresh")  # type: ignore[attr-defined]
    proxy = await make_proxy(clock=clock, token=token)

    async with client.get(f"{proxy.url}/echo/x") as resp:
        await assert_proxy_error(resp, "token_unavailable", retry_after=True)
        assert "larger than 1024 KiB" in (await resp.json())["detail"]
    await asyncio.wait_for(token_server.huge_dropped.wait(), 30)  # the endpoint saw the connection go
    # What the socket buffers took before the drop, far from the 256 MiB the endpoint would send.
    assert token_server.huge_sent < 64 * MAX_ANSWER_BYTES
    [line] = failure_lines(caplog)
    assert "larger than 1024 KiB" in line and "retry_in=5.0s" in line
    async with client.get(f"{proxy.url}/echo/x") as resp:  # backed off
        await assert_proxy_error(resp, "token_unavailable", retry_after=True)
    assert token_server.count == 1

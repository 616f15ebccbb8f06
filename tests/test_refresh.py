"""Refreshing through the real proxy: one token call per expiry, refresh-ahead, and which 401s refresh."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import FakeClock, FakeTokenServer, until

STORM = 500


class HeldApi:
    """An upstream before the fake API whose `/held` answer waits for `release`, then checks the token."""

    def __init__(self, api: FakeApi) -> None:
        self.api = api
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.url = ""

    def app(self) -> web.Application:
        """`/held` (held, then echo) and `/echo...` (echo at once)."""
        app = web.Application()
        app.router.add_route("*", "/held", self.held)
        app.router.add_route("*", "/echo{tail:.*}", self.api.echo)
        return app

    async def held(self, request: web.Request) -> web.Response:
        """Note the arrival, wait to be released, then answer as the API's echo would."""
        self.arrived.set()
        await self.release.wait()
        return await self.api.echo(request)


@pytest.fixture
async def held_api(aiohttp_server: Any, api: FakeApi) -> AsyncIterator[HeldApi]:
    """A HeldApi listening on 127.0.0.1."""
    held = HeldApi(api)
    server = await aiohttp_server(held.app(), host="127.0.0.1")
    held.url = str(server.make_url("")).rstrip("/")
    yield held
    held.release.set()


def bearer_of(echo: dict[str, Any]) -> str:
    """The bearer token the API received, from an /echo answer."""
    for name, value in echo["headers"]:
        if name.lower() == "authorization":
            return str(value)[len("Bearer ") :]
    raise AssertionError("no Authorization header reached the API")


async def storm(url: str, n: int) -> list[tuple[int, dict[str, Any], bytes | None]]:
    """`n` concurrent requests through one session, half GET, half POST with distinct bodies."""
    connector = aiohttp.TCPConnector(limit=n + 10)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def one(i: int) -> tuple[int, dict[str, Any], bytes | None]:
            body = f"body-{i}-".encode() * (i % 7 + 1) if i % 2 else None
            method = "POST" if body is not None else "GET"
            async with session.request(method, f"{url}/echo/{i}?i={i}", data=body) as resp:
                data = await resp.json() if resp.status == 200 else {}
                return resp.status, data, body

        return await asyncio.gather(*(one(i) for i in range(n)))


def assert_storm_intact(results: list[tuple[int, dict[str, Any], bytes | None]]) -> None:
    """Every request got 200, reached its own path, and every POST body arrived byte for byte."""
    assert [status for status, _, _ in results] == [200] * len(results)
    for i, (_, data, body) in enumerate(results):
        assert data["raw_path"] == f"/echo/{i}?i={i}"
        if body is not None:
            assert data["method"] == "POST"
            assert data["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_refresh_storm_with_expired_token_calls_token_endpoint_once(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """500 concurrent requests on an expired token all succeed after exactly one more token call."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    api.expire_all(token_server.issued_access)

    results = await storm(proxy.url, STORM)

    assert_storm_intact(results)
    assert token_server.count == 2
    assert proxy.tokens.status().generation == 2


async def test_refresh_storm_at_cold_start_calls_token_endpoint_once(
    make_proxy, token_server: FakeTokenServer
) -> None:
    """500 concurrent requests with no token yet all succeed after exactly one token call."""
    proxy = await make_proxy()

    results = await storm(proxy.url, STORM)

    assert_storm_intact(results)
    assert token_server.count == 1


async def test_refresh_ahead_in_window_no_request_waits(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """Inside refresh_before, requests go out at once with the old token while one refresh runs behind."""
    clock = FakeClock()
    token_server.lifetime = 100.0  # expires_in; the JWT itself stays valid for an hour
    proxy = await make_proxy(clock=clock, token={"refresh_before": 30.0})
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    old = token_server.issued_access[0]
    token_server.gate = asyncio.Event()
    token_server.entered.clear()
    clock.advance(80)

    async def fetch(i: int) -> tuple[int, str]:
        async with client.get(f"{proxy.url}/echo/{i}") as resp:
            return resp.status, bearer_of(await resp.json())

    answers = await asyncio.gather(*(fetch(i) for i in range(20)))

    assert answers == [(200, old)] * 20  # all answered while the token endpoint is still held
    await token_server.entered.wait()
    assert token_server.count == 2
    assert api.rejected == 0
    token_server.gate.set()
    await until(lambda: proxy.tokens.status().generation == 2)
    status, bearer = await fetch(99)
    assert (status, bearer) == (200, token_server.issued_access[1])
    assert token_server.count == 2
    assert api.rejected == 0


async def test_refresh_ahead_failure_keeps_serving_old_token(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """A failed refresh-ahead costs no request: the still-valid token is used, back-off limits retries."""
    clock = FakeClock()
    token_server.lifetime = 100.0
    proxy = await make_proxy(clock=clock, token={"backoff_initial": 5.0})
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    token_server.mode = "500"
    clock.advance(80)

    for i in range(5):
        async with client.get(f"{proxy.url}/echo/{i}") as resp:
            assert resp.status == 200
        await until(lambda: not proxy.tokens.status().refreshing)
    assert token_server.count == 2
    assert proxy.tokens.status().failures == 1
    assert api.rejected == 0


async def test_refresh_token_expired_by_clock_waits_for_new_one(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """Past its expiry the old token is never sent: the request waits for the refresh, uses the new one."""
    clock = FakeClock()
    token_server.lifetime = 100.0
    proxy = await make_proxy(clock=clock)
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    clock.advance(150)

    async with client.get(f"{proxy.url}/echo/later") as resp:
        assert resp.status == 200
        assert bearer_of(await resp.json()) == token_server.issued_access[1]
    assert token_server.count == 2
    assert api.rejected == 0


async def test_refresh_stale_401_after_refresh_resends_without_second_refresh(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, held_api: HeldApi, client: aiohttp.ClientSession
) -> None:
    """A 401 for generation 1 arriving after generation 2 exists resends with 2, with no new token call."""
    proxy = await make_proxy(upstream={"url": held_api.url})
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    late = asyncio.create_task(client.get(f"{proxy.url}/held"))
    await held_api.arrived.wait()  # sent upstream with generation 1, answer held
    api.expire_all(token_server.issued_access)
    async with client.get(f"{proxy.url}/echo/now") as resp:
        assert resp.status == 200
    assert token_server.count == 2

    held_api.release.set()
    async with await late as resp:
        assert resp.status == 200
        assert bearer_of(await resp.json()) == token_server.issued_access[1]
    assert token_server.count == 2
    assert proxy.tokens.status().generation == 2


async def test_refresh_second_401_after_resend_returned_unchanged(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """When the new token is rejected too, that second 401 reaches the client as it is, after one refresh."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/challenge/invalid_token") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert json.loads(await resp.read()) == {"message": "invalid_token"}
        assert "X-Tokenproxy-Error" not in resp.headers
    assert token_server.count == 2
    assert api.requests == 2


async def test_refresh_401_on_young_token_passed_through_without_refresh(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """A 401 for a token younger than min_refresh_interval goes to the client; no token call."""
    proxy = await make_proxy(token={"min_refresh_interval": 60})
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    api.expire_all(token_server.issued_access)

    async with client.get(f"{proxy.url}/echo/again") as resp:
        assert resp.status == 401
        assert json.loads(await resp.read()) == {"message": "token expired"}
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert token_server.count == 1


@pytest.mark.parametrize(
    ("error", "challenge"),
    [
        ("insufficient_scope", 'Bearer error="insufficient_scope"'),
        ("use_dpop_nonce", 'DPoP error="use_dpop_nonce"'),
    ],
)
async def test_refresh_challenge_a_token_cannot_fix_passed_through_without_token_call(
    make_proxy,
    token_server: FakeTokenServer,
    api: FakeApi,
    client: aiohttp.ClientSession,
    error: str,
    challenge: str,
) -> None:
    """A 401 naming insufficient_scope or asking for a DPoP nonce is passed through, with no token call."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200

    async with client.get(f"{proxy.url}/challenge/{error}") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge
        assert json.loads(await resp.read()) == {"message": error}
    assert token_server.count == 1
    assert api.requests == 2


async def test_refresh_non_replayable_body_401_passed_through_and_retry_succeeds(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """A body too big to replay gets its 401 back, a refresh starts, the client's immediate retry succeeds."""
    proxy = await make_proxy(retry={"replay_limit": 10})
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    api.expire_all(token_server.issued_access)
    token_server.gate = asyncio.Event()
    token_server.entered.clear()
    body = bytes(range(256)) * 4

    async with client.post(f"{proxy.url}/echo/upload", data=body) as resp:
        assert resp.status == 401
        assert json.loads(await resp.read()) == {"message": "token expired"}
    await token_server.entered.wait()  # the refresh started, and is held

    retry = asyncio.create_task(client.post(f"{proxy.url}/echo/upload", data=body))
    await until(lambda: proxy.tokens.waiting == 1)
    token_server.gate.set()
    async with await retry as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert bearer_of(data) == token_server.issued_access[1]
    assert token_server.count == 2


# Token servers whose tokens are dead on arrival, or whose lifetime is no number at all.
SHORT_LIVED: dict[str, tuple[dict[str, Any], int]] = {  # FakeTokenServer settings, and what the requests get
    "expires_in_nanosecond": ({"lifetime": 1e-9}, 200),
    "expires_in_zero_jwt_exp_past": ({"lifetime": 0, "jwt_exp": time.time() - 3600}, 401),
    "jwt_exp_past": ({"lifetime": None, "jwt_exp": time.time() - 3600}, 401),
    "jwt_exp_negative": ({"lifetime": None, "jwt_exp": -5}, 401),
    "jwt_exp_nan": ({"lifetime": None, "jwt_exp": float("nan")}, 503),
    "expires_in_nan": ({"lifetime": float("nan")}, 503),
}


@pytest.mark.parametrize("case", list(SHORT_LIVED))
async def test_refresh_dead_on_arrival_tokens_cost_one_call_per_floor(
    make_proxy,
    token_server: FakeTokenServer,
    api: FakeApi,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    """10 sequential requests within min_refresh_interval cost one token call, whatever the lifetime says:
    a token dead on arrival (a nanosecond, an exp in the past) is used until the floor, with a warning
    naming the clock skew; a lifetime that is no finite number is a failure, backed off."""
    settings, expected = SHORT_LIVED[case]
    for name, value in settings.items():
        setattr(token_server, name, value)
    clock = FakeClock()
    proxy = await make_proxy(
        clock=clock, token={"min_refresh_interval": 5.0, "backoff_initial": 5.0, "backoff_max": 60.0}
    )

    statuses = []
    for i in range(10):
        async with client.get(f"{proxy.url}/echo/{i}") as resp:
            statuses.append(resp.status)
        clock.advance(0.45)  # 10 requests over 4.5 s, within the 5 s floor
    assert statuses == [expected] * 10
    assert token_server.count == 1
    if expected != 503:
        # The token went out for the whole floor: one per request, nothing else from the endpoint.
        assert api.requests == 10
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("clock skew" in w and "using it for 5s" in w for w in warnings), warnings
    else:
        assert api.requests == 0
        assert proxy.tokens.status().failures == 1

    clock.advance(1.0)  # past the floor (and the back-off): one call more
    async with client.get(f"{proxy.url}/echo/later") as resp:
        assert resp.status == expected
    assert token_server.count == 2
    assert not token_server.reuse_detected and not token_server.revoked

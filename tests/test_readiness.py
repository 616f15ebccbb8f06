"""/readyz before the first token: 503 `no_token_yet` until one has been obtained, unless readiness is lazy.

A token endpoint that answers 404 must not look ready before anyone tried
it; `server.ready_before_token = true` opts into the old guess for probes
that must pass before any traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from proxy.http.admin import build_admin_app
from tests.fakes.token_server import CLIENT_SECRET
from tests.helpers import read_until, start_cli, write_config

NO_TOKEN_YET = {
    "status": "not_ready",
    "reason": "no_token_yet",
    "detail": "no token has been obtained yet: one is fetched by the first request, or at start with "
    "server.fetch_on_start = true",
}
READY_WITH_TOKEN = {"status": "ready", "reason": "ok", "detail": "a valid token is held"}
READY_LAZILY = {"status": "ready", "reason": "ok", "detail": "a token will be obtained on the next request"}


async def start_admin(aiohttp_server, proxy, clock: Callable[[], float] = time.time) -> str:
    """The admin app for `proxy`, reading its config's `ready_before_token`, on 127.0.0.1."""
    app = build_admin_app(
        lambda: proxy.tokens, clock=clock, ready_before_token=lambda: proxy.config.server.ready_before_token
    )
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("")).rstrip("/")


async def readyz(client: aiohttp.ClientSession, admin: str) -> tuple[int, str | None, object]:
    """/readyz's status, X-Tokenproxy-Error header and JSON body."""
    async with client.get(f"{admin}/readyz") as resp:
        return resp.status, resp.headers.get("X-Tokenproxy-Error"), await resp.json()


async def test_readiness_before_first_token_not_ready_then_ready(aiohttp_server, make_proxy, token_server, client) -> None:
    """/readyz is 503 no_token_yet before any token, without calling the endpoint; 200 after the first request."""
    proxy = await make_proxy()
    admin = await start_admin(aiohttp_server, proxy)
    assert await readyz(client, admin) == (503, "no_token_yet", NO_TOKEN_YET)
    assert token_server.count == 0
    async with client.get(f"{admin}/status") as resp:
        status = await resp.json()
    assert (status["ready"], status["reason"]) == (False, "no_token_yet")
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 200
    assert await readyz(client, admin) == (200, None, READY_WITH_TOKEN)


async def test_readiness_lazy_with_ready_before_token_is_ready_before_first_token(
    aiohttp_server, make_proxy, token_server, client
) -> None:
    """With server.ready_before_token = true, /readyz is 200 before any token, and nothing is fetched for it."""
    proxy = await make_proxy(server={"ready_before_token": True})
    admin = await start_admin(aiohttp_server, proxy)
    assert await readyz(client, admin) == (200, None, READY_LAZILY)
    assert token_server.count == 0


async def test_readiness_after_first_token_expired_stays_ready(aiohttp_server, make_proxy, token_server, client) -> None:
    """Once a first token was obtained, its expiry leaves /readyz at 200: the next request fetches anew."""
    now = [time.time()]
    proxy = await make_proxy(lambda: now[0])
    admin = await start_admin(aiohttp_server, proxy, clock=lambda: now[0])
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 200
    now[0] += 3600  # the 300 s token has expired
    assert await readyz(client, admin) == (200, None, READY_LAZILY)
    assert token_server.count == 1


async def test_readiness_failed_first_fetch_not_ready_while_backing_off(aiohttp_server, make_proxy, token_server, client) -> None:
    """A first fetch that fails: 503 token_unavailable while backing off; the detail says so."""
    token_server.mode = "500"
    proxy = await make_proxy(token={"backoff_initial": 60.0, "backoff_max": 60.0})
    admin = await start_admin(aiohttp_server, proxy)
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503
    status, header, body = await readyz(client, admin)
    assert (status, header) == (503, "token_unavailable")
    assert isinstance(body, dict) and body["reason"] == "token_unavailable"


async def test_readiness_resumed_valid_token_is_ready(aiohttp_server, make_proxy, token_server, client) -> None:
    """A proxy that resumes a still-valid token from the state file is ready at once, calling nothing."""
    configured = token_server.current_refresh
    first = await make_proxy()
    async with client.get(f"{first.url}/echo/x") as resp:
        assert resp.status == 200
    await first.stop()
    second = await make_proxy(token={"refresh_token": configured})  # the same login: the saved chain is resumed
    admin = await start_admin(aiohttp_server, second)
    assert await readyz(client, admin) == (200, None, READY_WITH_TOKEN)
    assert token_server.count == 1


async def test_readiness_resumed_expired_token_says_so(make_proxy, token_server, client, caplog, tmp_path) -> None:
    """A token resumed from the state file after its expiry is logged as expired (how long ago), not as expiring
    in a negative number of seconds; the next request fetches a new one."""
    configured = token_server.current_refresh
    first = await make_proxy()
    async with client.get(f"{first.url}/echo/x") as resp:
        assert resp.status == 200
    await first.stop()
    state = tmp_path / "state" / "state.json"
    document = json.loads(state.read_text())
    for entry in document["credentials"].values():  # as if the proxy had been stopped for ten minutes
        entry["obtained_at"], entry["expires_at"] = time.time() - 900, time.time() - 600
    state.write_text(json.dumps(document))
    caplog.set_level(logging.INFO, logger="tokenproxy")
    second = await make_proxy(token={"refresh_token": configured})
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed token")]
    assert line.endswith("from state file, expired 600s ago (a new one is fetched when needed)") or line.endswith(
        "from state file, expired 601s ago (a new one is fetched when needed)"
    )
    async with client.get(f"{second.url}/echo/y") as resp:
        assert resp.status == 200
    assert token_server.count == 2


async def run_and_probe(tmp_path: Path, token_server, api, server: str) -> tuple[int, object]:
    """Start `tokenproxy run` with an admin port and `server` keys; /readyz's status and body before any request."""
    keys = f'admin_listen = "127.0.0.1:0"\n{server}'
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json", server=keys)
    proc = await start_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        admin = await read_until(proc.stderr, r"admin listening on (http://127\.0\.0\.1:\d+)", seen)
        async with aiohttp.ClientSession() as session, session.get(f"{admin.group(1)}/readyz") as resp:
            return resp.status, await resp.json()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)


async def test_readiness_run_token_url_404_not_ready_before_any_request(tmp_path: Path, token_server, api) -> None:
    """`tokenproxy run` whose token URL answers 404: /readyz is 503 no_token_yet, not 200, before any request."""
    path_404 = token_server.base_url + "/nowhere"
    token_server.base_url = path_404  # write_config names {base_url}/oauth/token: a path nothing serves
    assert await run_and_probe(tmp_path, token_server, api, "") == (503, NO_TOKEN_YET)
    assert token_server.count == 0


async def test_readiness_run_ready_before_token_from_config(tmp_path: Path, token_server, api) -> None:
    """`tokenproxy run` with server.ready_before_token = true: /readyz is 200 before any token."""
    assert await run_and_probe(tmp_path, token_server, api, "ready_before_token = true\n") == (200, READY_LAZILY)
    assert token_server.count == 0


async def test_readiness_ready_before_token_follows_a_reload(tmp_path: Path, token_server, api) -> None:
    """SIGHUP with server.ready_before_token now true: /readyz turns from 503 no_token_yet to 200, no token fetched."""
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json", server='admin_listen = "127.0.0.1:0"')
    proc = await start_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        admin = (await read_until(proc.stderr, r"admin listening on (http://127\.0\.0\.1:\d+)", seen)).group(1)
        async with aiohttp.ClientSession() as session:
            assert await readyz(session, admin) == (503, "no_token_yet", NO_TOKEN_YET)
            path.write_text(path.read_text().replace("[server]\n", "[server]\nready_before_token = true\n"))
            proc.send_signal(signal.SIGHUP)
            await read_until(proc.stderr, r"config reloaded", seen)
            assert await readyz(session, admin) == (200, None, READY_LAZILY)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
    assert token_server.count == 0

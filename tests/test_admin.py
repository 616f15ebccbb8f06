"""The admin listener: /healthz, /readyz and /status in each state, never a token value."""

from __future__ import annotations

import aiohttp

from proxy.http.admin import build_admin_app


async def start_admin(aiohttp_server, proxy) -> str:
    server = await aiohttp_server(build_admin_app(lambda: proxy.tokens), host="127.0.0.1")
    return str(server.make_url("")).rstrip("/")


async def test_admin_healthz_answers_while_serving(aiohttp_server, make_proxy, client: aiohttp.ClientSession) -> None:
    """/healthz is 200 while the process serves, whatever the token's state."""
    proxy = await make_proxy()
    admin = await start_admin(aiohttp_server, proxy)
    async with client.get(f"{admin}/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_admin_readyz_ready_with_token(aiohttp_server, make_proxy, token_server, client) -> None:
    """/readyz is 200 once a valid token is held, and /status shows its fingerprint only."""
    proxy = await make_proxy()
    admin = await start_admin(aiohttp_server, proxy)
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 200
    async with client.get(f"{admin}/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"
    async with client.get(f"{admin}/status") as resp:
        text = await resp.text()
        status = await resp.json()
    assert status["token"]["generation"] == 1
    assert len(status["token"]["fingerprint"]) == 8
    assert status["grant"] == "refresh_token"
    assert token_server.issued_access[0] not in text
    assert token_server.current_refresh not in text


async def test_admin_readyz_login_required_after_rejected_refresh(aiohttp_server, make_proxy, token_server, client) -> None:
    """/readyz is 503 login_required once the refresh token was rejected."""
    token_server.mode = "invalid_grant"
    proxy = await make_proxy()
    admin = await start_admin(aiohttp_server, proxy)
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503
    async with client.get(f"{admin}/readyz") as resp:
        assert resp.status == 503
        assert resp.headers["X-Tokenproxy-Error"] == "login_required"
        assert (await resp.json())["reason"] == "login_required"


async def test_admin_readyz_not_ready_while_backing_off(aiohttp_server, make_proxy, token_server, client) -> None:
    """/readyz is 503 token_unavailable while backing off after a failed refresh with no token held."""
    token_server.mode = "500"
    proxy = await make_proxy(token={"backoff_initial": 60.0, "backoff_max": 60.0})
    admin = await start_admin(aiohttp_server, proxy)
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503
    async with client.get(f"{admin}/readyz") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["reason"] == "token_unavailable"
    assert "backing off" in body["detail"]
    async with client.get(f"{admin}/status") as resp:
        status = await resp.json()
    assert status["failures"] == 1
    assert status["backoff_remaining"] > 0


async def test_admin_readyz_not_ready_before_first_token(aiohttp_server, make_proxy, token_server, client) -> None:
    """Before any token was obtained, /readyz is 503 no_token_yet, and nothing is fetched for it."""
    proxy = await make_proxy()
    admin = await start_admin(aiohttp_server, proxy)
    async with client.get(f"{admin}/readyz") as resp:
        assert resp.status == 503
        assert resp.headers["X-Tokenproxy-Error"] == "no_token_yet"
        assert (await resp.json())["reason"] == "no_token_yet"
    assert token_server.count == 0


async def test_admin_unknown_path_and_wrong_method_get_the_json_error(aiohttp_server, make_proxy, client) -> None:
    """An unknown path gets 404 `not_found` and a wrong method 405 `method_not_allowed` (with Allow), as JSON with
    X-Tokenproxy-Error like every answer of tokenproxy's own; the path asked for is not echoed."""
    proxy = await make_proxy()
    admin = await start_admin(aiohttp_server, proxy)
    async with client.get(f"{admin}/nope-secret-looking-path") as resp:
        assert (resp.status, resp.headers["X-Tokenproxy-Error"]) == (404, "not_found")
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["error"] == "not_found" and "nope-secret" not in body["detail"]
    async with client.post(f"{admin}/healthz", data=b"x") as resp:
        assert (resp.status, resp.headers["X-Tokenproxy-Error"]) == (405, "method_not_allowed")
        assert "GET" in resp.headers["Allow"]
        assert (await resp.json())["error"] == "method_not_allowed"

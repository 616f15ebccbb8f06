"""`token.login`: a refresh_token credential that logs in again by itself (password or client_credentials)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import PASSWORD, USERNAME, FakeTokenServer
from tests.helpers import run_cli, saved_entry

FALLBACK = "refresh token unusable ({why}); logging in again with grant {grant} (token.login)"


async def get_status(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """One request through the proxy: its status and its error code (if any)."""
    async with client.get(url) as resp:
        body = await resp.read()
        return resp.status, json.loads(body).get("error", "") if resp.status != 200 else ""


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The WARNING lines logged during the test."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_login_password_without_refresh_token_logs_in_and_continues_the_chain(
    make_proxy,
    token_server: FakeTokenServer,
    api: FakeApi,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No refresh token yet: one password login (one WARNING), then its refresh token is refreshed and saved."""
    token_server.login_refresh = True
    proxy = await make_proxy(
        token={"refresh_token": "", "login": "password", "username": USERNAME, "password": PASSWORD}
    )

    assert await get_status(client, f"{proxy.url}/echo/1") == (200, "")
    chain = token_server.current_refresh
    api.expire_all(token_server.issued_access)
    assert await get_status(client, f"{proxy.url}/echo/2") == (200, "")

    assert [call.form["grant_type"] for call in token_server.calls] == ["password", "refresh_token"]
    assert token_server.calls[1].form["refresh_token"] == chain
    assert warnings(caplog) == [FALLBACK.format(why="none is known", grant="password")]
    saved = saved_entry(Path(proxy.config.token.state_file))
    assert saved["refresh_token"] == token_server.current_refresh
    assert not token_server.reuse_detected


async def test_login_client_credentials_after_revoked_refresh_token_costs_one_login(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused refresh token (invalid_grant) is followed by one client_credentials login; the request succeeds."""
    token_server.revoked = True
    token_server.login_refresh = True
    proxy = await make_proxy(token={"login": "client_credentials"})

    assert await get_status(client, f"{proxy.url}/echo/x") == (200, "")

    assert [call.form["grant_type"] for call in token_server.calls] == ["refresh_token", "client_credentials"]
    assert warnings(caplog) == [FALLBACK.format(why="invalid_grant", grant="client_credentials")]
    assert proxy.tokens.status().generation == 1


async def test_login_unset_revoked_refresh_token_stays_login_required(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """Without token.login, a refused refresh token is login_required, and no login is tried."""
    token_server.revoked = True
    proxy = await make_proxy()

    assert await get_status(client, f"{proxy.url}/echo/x") == (503, "login_required")
    assert [call.form["grant_type"] for call in token_server.calls] == ["refresh_token"]


async def test_login_refused_gives_token_unavailable_not_a_loop(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """A login that is itself refused (wrong password) fails as that login: 503 token_unavailable, two calls only."""
    token_server.revoked = True
    proxy = await make_proxy(token={"login": "password", "username": USERNAME, "password": "wrong-password-1"})

    assert await get_status(client, f"{proxy.url}/echo/x") == (503, "token_unavailable")
    assert [call.form["grant_type"] for call in token_server.calls] == ["refresh_token", "password"]


async def test_cli_token_login_without_any_refresh_token_or_state_file(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """grant refresh_token with login and no refresh token, no state file: valid, and `token` logs in."""
    path = tmp_path / "c.toml"
    path.write_text(
        f'[upstream]\nurl = "{api.base_url}"\n[token]\nstate_file = ""\n'
        f'token_url = "{token_server.base_url}/oauth/token"\nclient_id = "test-client"\n'
        'client_secret = "${SECRET}"\nlogin = "client_credentials"\n'
    )

    code, out, err = await run_cli("token", "-c", str(path), env={"SECRET": token_server.client_secret})

    assert (code, out, err) == (0, token_server.issued_access[-1] + "\n", "")


@pytest.mark.parametrize(
    ("keys", "line"),
    [
        ('login = "device"', "config: token.login: must be one of password, client_credentials or empty, got 'device'"),
        ('login = "password"\npassword = "p"', "config: token.username: is required for login 'password'"),
        ('login = "client_credentials"\nclient_id = ""', "config: token.client_id: is required for login 'client_credentials'"),
    ],
)
async def test_cli_check_login_bad_config_exits_2_naming_the_key(tmp_path: Path, keys: str, line: str) -> None:
    """An unknown login grant, or one missing its keys: exit 2, one line naming the key."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9"\n[token]\nstate_file = ""\nrefresh_token = "r"\n'
        f'token_url = "http://127.0.0.1:9/token"\n{keys}\n'
    )

    code, out, err = await run_cli("check", "-c", str(path))

    assert (code, out, err) == (2, "", line + "\n")



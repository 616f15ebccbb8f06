"""`tokenproxy check` proves the configured credential works now: it asks the token endpoint every time.

A token in the state file proves nothing about the credential today; a
refresh `check` does is a real one, saved like any other, so a rotating
refresh token is never presented twice and a proxy sharing the state file
carries on from it.
"""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from proxy.runtime.credentials import make_token_manager
from tests.fakes.token_server import CLIENT_SECRET
from tests.helpers import run_cli, saved_entry, write_config


def ok_line(generation: int) -> str:
    """The pattern of `check`'s one line of success for a refresh_token grant."""
    return rf"ok: grant refresh_token, token [0-9a-f]{{8}} \(generation {generation}\), expires \S+ \(in \d+s\)\n"


async def test_cli_check_with_valid_state_file_calls_the_token_endpoint(tmp_path: Path, token_server, api) -> None:
    """A second `check` while the saved token is still valid calls the endpoint once more and saves the rotation."""
    state = tmp_path / "state" / "s.json"
    path = write_config(tmp_path / "c.toml", token_server, api, state)
    env = {"TEST_CLIENT_SECRET": CLIENT_SECRET}
    code, out, err = await run_cli("check", "-c", str(path), env=env)
    assert (code, err) == (0, "")
    assert re.fullmatch(ok_line(1), out)
    assert token_server.count == 1
    code, out, err = await run_cli("check", "-c", str(path), env=env)
    assert (code, err) == (0, "")
    assert re.fullmatch(ok_line(2), out)
    assert token_server.count == 2
    assert not token_server.reuse_detected  # the rotated refresh token from the state file was presented
    saved = saved_entry(state)
    assert saved["refresh_token"] == token_server.current_refresh
    assert saved["access_token"] == token_server.issued_access[-1]


async def test_cli_check_with_emptied_client_secret_fails_despite_valid_state(tmp_path: Path, token_server, api) -> None:
    """With the client secret emptied, `check` exits 1 even though the state file holds a valid token."""
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "state" / "s.json")
    code, _, err = await run_cli("check", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    assert (code, err) == (0, "")
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_CLIENT_SECRET": ""})
    assert code == 1
    assert out == ""
    assert err.startswith("check: token_unavailable: ")
    assert err.count("\n") == 1
    assert token_server.count == 2


async def test_cli_check_static_grant_says_nothing_is_contacted(tmp_path: Path) -> None:
    """For a static token `check` says plainly that there is nothing to contact, and exits 0."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9"\n[token]\ngrant = "static"\naccess_token = "${TEST_TOKEN}"\n'
        f'state_file = "{tmp_path / "state" / "s.json"}"\n'
    )
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_TOKEN": "abc.def.ghi"})
    assert (code, out, err) == (0, "ok: grant static: nothing to contact; the token is sent as configured\n", "")
    assert not (tmp_path / "state").exists()


async def test_cli_check_static_token_that_cannot_be_sent_fails(tmp_path: Path) -> None:
    """A static token with a space in it cannot go in a header: `check` exits 1 saying so, never the token."""
    path = tmp_path / "c.toml"
    path.write_text('[upstream]\nurl = "http://127.0.0.1:9"\n[token]\ngrant = "static"\naccess_token = "${TEST_TOKEN}"\n')
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_TOKEN": "abc def"})
    assert (code, out) == (1, "")
    assert err == "check: token_unavailable: the access token has characters a header cannot carry\n"


async def test_cli_check_rotation_is_picked_up_by_a_running_proxy(tmp_path: Path, make_proxy, token_server, api, client) -> None:
    """A proxy sharing the state file adopts the token `check` fetched, then refreshes with the refresh token it saved."""
    proxy = await make_proxy()
    path = write_config(tmp_path / "c.toml", token_server, api, Path(proxy.config.token.state_file))
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 200
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    assert (code, err) == (0, "")
    assert re.fullmatch(ok_line(2), out)
    assert token_server.count == 2
    api.expired.add(token_server.issued_access[0])  # the proxy's own token is refused: it takes check's
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 200
    assert token_server.count == 2
    api.expired.add(token_server.issued_access[1])  # check's token refused too: a real refresh
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 200
    assert token_server.count == 3
    assert not token_server.reuse_detected
    assert proxy.tokens.status().generation == 3


async def test_cli_check_refresh_now_fetches_even_when_a_peer_saved_a_newer_token(make_proxy, token_server, client) -> None:
    """What `check` calls asks the endpoint even when a peer saved a newer valid token, presenting the peer's refresh token."""
    proxy = await make_proxy()
    async with aiohttp.ClientSession() as session:
        manager = make_token_manager(proxy.config, session)  # resumed before the proxy saved anything
        try:
            async with client.get(f"{proxy.url}/echo/x") as resp:
                assert resp.status == 200
            assert token_server.count == 1
            token = await manager.refresh_now()
        finally:
            await manager.close()
    assert token_server.count == 2
    assert not token_server.reuse_detected
    assert token.generation == 2
    assert token.value == token_server.issued_access[-1]

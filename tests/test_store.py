"""Rotated refresh tokens survive a restart via the state file, which is private and written atomically."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import aiohttp
import pytest

from proxy.tokens.store import FileStore, SavedState
from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import FakeTokenServer


async def refresh_times(proxy, token_server: FakeTokenServer, api: FakeApi, client, times: int) -> None:
    """Expire the current token `times` times, each time sending one request that forces a refresh."""
    for i in range(times):
        api.expire_all(token_server.issued_access)
        async with client.get(f"{proxy.url}/echo/{i}") as resp:
            assert resp.status == 200


async def test_store_restart_after_rotations_resumes_rotated_refresh_token(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """A restart configured with the original, rotated-away refresh token keeps working, no reuse."""
    original = token_server.current_refresh
    first = await make_proxy(token={"refresh_token": original})
    async with client.get(f"{first.url}/echo/warm") as resp:
        assert resp.status == 200
    await refresh_times(first, token_server, api, client, 3)
    assert token_server.count == 4
    await first.stop()

    second = await make_proxy(token={"refresh_token": original})
    async with client.get(f"{second.url}/echo/resumed") as resp:  # the saved access token is still good
        assert resp.status == 200
    assert token_server.count == 4
    await refresh_times(second, token_server, api, client, 2)

    assert token_server.count == 6
    assert not token_server.reuse_detected
    assert second.tokens.status().generation == 6


async def test_store_state_file_private_and_directory_0700(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """The state file is 0600 and the directory the proxy made for it is 0700."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 200
    path = Path(proxy.config.token.state_file)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_store_after_refreshes_leaves_no_temp_files(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """Every save replaces the state file whole: after several refreshes only state.json is there."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    await refresh_times(proxy, token_server, api, client, 3)
    path = Path(proxy.config.token.state_file)

    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]
    saved = json.loads(path.read_text())
    assert saved["generation"] == 4
    assert saved["refresh_token"] == token_server.current_refresh


async def test_store_corrupt_state_file_ignored_configured_token_used(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A state file that is not valid JSON is ignored and the configured refresh token is used."""
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir(mode=0o700)
    state.write_text("{not json")
    proxy = await make_proxy()

    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 200
    assert token_server.count == 1
    assert json.loads(state.read_text())["generation"] == 1


async def test_store_new_configured_login_wins_over_saved_chain(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """A restart with a different configured refresh token (a new login) does not resume the old chain."""
    first = await make_proxy()
    async with client.get(f"{first.url}/echo/warm") as resp:
        assert resp.status == 200
    await first.stop()
    token_server.current_refresh = "rt-new-login"  # the user logged in again elsewhere

    second = await make_proxy(token={"refresh_token": "rt-new-login"})
    async with client.get(f"{second.url}/echo/x") as resp:
        assert resp.status == 200
    assert token_server.count == 2
    assert token_server.calls[-1].form["refresh_token"] == "rt-new-login"
    assert second.tokens.status().generation == 1


def test_store_save_failure_leaves_old_state_and_no_temp_file(tmp_path: Path) -> None:
    """A save that fails half-way keeps the previous state file intact and removes its temp file."""
    store = FileStore(tmp_path / "state" / "state.json")
    good = SavedState("cred", "seed", "access-1", 2.0, 1.0, "rt-1", 1)
    store.save(good)
    bad = SavedState("cred", "seed", "access-2", 2.0, 1.0, object(), 2)  # type: ignore[arg-type]

    with pytest.raises(TypeError):
        store.save(bad)
    assert store.load() == good
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["state.json"]


async def test_store_unwritable_state_file_keeps_serving(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """When the state file cannot be written, the new token is kept in memory and refreshes go on."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    proxy = await make_proxy(token={"state_file": str(blocker / "state.json")})

    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    await refresh_times(proxy, token_server, api, client, 2)
    assert token_server.count == 3
    assert not token_server.reuse_detected
    assert blocker.read_text() == ""

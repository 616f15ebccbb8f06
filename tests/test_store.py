"""Rotated refresh tokens survive a restart via the state file, which is private and written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import aiohttp
import pytest

from proxy.tokens.store import FileStore, SavedState, UnsafeStateError
from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import CLIENT_ID, FakeTokenServer
from tests.helpers import saved_entry


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
    """Every save replaces the state file whole: after several refreshes only state.json (and its lock) is there."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    await refresh_times(proxy, token_server, api, client, 3)
    path = Path(proxy.config.token.state_file)

    # The lock file stays: every process locks the same one.
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json", "state.json.lock"]
    saved = saved_entry(path)
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
    assert saved_entry(state)["generation"] == 1


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


# -- A state file or directory another user could have written is refused (never read, never written) --

OTHER_UID = 12345  # a user that is not the one running the tests (they run as root: root may chown)
PLANTED = "ATTACKER-TOKEN"


def plant(path: Path, credential: str, *, mode: int = 0o600, owner: int | None = None) -> None:
    """A state file as an attacker would write it: matching credential, no seed, a far-off expiry."""
    state = SavedState(credential, "", PLANTED, 4_000_000_000.0, 1.0, "rt-attacker", 1)
    path.write_text(json.dumps(dataclasses.asdict(state)))
    path.chmod(mode)
    if owner is not None:
        os.chown(path, owner, -1)


def safe_directory(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    return directory


def test_store_load_refuses_file_owned_by_another_uid_even_as_root(tmp_path: Path) -> None:
    """A state file owned by another uid is not read, even by a proxy running as root; the message says why."""
    path = safe_directory(tmp_path) / "state.json"
    plant(path, "cred", owner=OTHER_UID)
    store = FileStore(path)

    with pytest.raises(UnsafeStateError) as info:
        store.load()
    assert str(info.value) == (
        f"state file {path} is owned by uid {OTHER_UID}, not by this user (uid {os.geteuid()}), so it is not used: "
        "another user could have planted it; remove it"
    )
    assert PLANTED not in str(info.value)
    with pytest.raises(UnsafeStateError):
        store.check()


def test_store_owner_compared_with_effective_uid_root_file_refused_for_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner is compared with os.geteuid(): a proxy running as another user refuses a file root wrote.

    A root-owned directory is trusted (root can do anything anyway), a root-owned file is not.
    """
    path = safe_directory(tmp_path) / "state.json"
    plant(path, "cred")  # owned by root, as the tests run
    monkeypatch.setattr(os, "geteuid", lambda: OTHER_UID)

    with pytest.raises(UnsafeStateError, match=r"owned by uid 0, not by this user \(uid 12345\)"):
        FileStore(path).load()


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_store_load_refuses_file_writable_by_others(tmp_path: Path, mode: int) -> None:
    """A state file its group or other users may write is not read, whoever owns it."""
    path = safe_directory(tmp_path) / "state.json"
    plant(path, "cred", mode=mode)

    with pytest.raises(UnsafeStateError, match=rf"is writable by other users \(mode 0{mode:o}\), so it is not used"):
        FileStore(path).load()


def test_store_load_refuses_symlink_and_never_reads_its_target(tmp_path: Path) -> None:
    """A symbolic link in the state file's place is not followed (O_NOFOLLOW), even to a good state file."""
    directory = safe_directory(tmp_path)
    target = directory / "elsewhere.json"
    plant(target, "cred")
    link = directory / "state.json"
    link.symlink_to(target)

    with pytest.raises(UnsafeStateError, match="is a symbolic link, which is not followed"):
        FileStore(link).load()
    assert FileStore(target).load() is not None  # the target itself is fine: it is the link that is refused


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757])
def test_store_refuses_directory_writable_by_others_without_sticky_bit(tmp_path: Path, mode: int) -> None:
    """A directory others may write to (no sticky bit): nothing in it is read, and nothing is written to it."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(mode)
    path = directory / "state.json"
    plant(path, "cred")  # even a file of our own: someone else could have swapped it
    store = FileStore(path)

    with pytest.raises(UnsafeStateError, match=rf"state directory {directory} is writable by other users \(mode 0{mode:o}"):
        store.load()
    path.unlink()
    with pytest.raises(UnsafeStateError):
        store.check()
    with pytest.raises(UnsafeStateError):
        store.save(SavedState("cred", "seed", "access-1", 2.0, 1.0, "rt-1", 1))
    assert list(directory.iterdir()) == []  # no temp file, no state file


def test_store_refuses_directory_owned_by_another_uid(tmp_path: Path) -> None:
    """A directory another user owns (even 0700) could have its state file replaced by that user."""
    directory = safe_directory(tmp_path)
    os.chown(directory, OTHER_UID, -1)

    with pytest.raises(UnsafeStateError, match=rf"state directory {directory} is owned by uid {OTHER_UID}"):
        FileStore(directory / "state.json").load()


def test_store_sticky_world_writable_directory_accepted_for_own_file(tmp_path: Path) -> None:
    """Like /tmp (1777): nobody can remove or rename another user's file there, so one's own file is used."""
    directory = tmp_path / "tmp-like"
    directory.mkdir()
    directory.chmod(0o1777)
    store = FileStore(directory / "state.json")
    good = SavedState("cred", "seed", "access-1", 2.0, 1.0, "rt-1", 1)

    store.save(good)
    assert store.load() == good
    plant(store.path, "cred", owner=OTHER_UID)
    with pytest.raises(UnsafeStateError, match="owned by uid 12345"):
        store.load()


def test_store_existing_private_directory_and_file_still_work(tmp_path: Path) -> None:
    """The checks pass the ordinary case: a 0700 (or 0755) directory of one's own and the file it wrote."""
    for mode in (0o700, 0o755):
        directory = tmp_path / f"d{mode:o}"
        directory.mkdir()
        directory.chmod(mode)
        store = FileStore(directory / "state.json")
        assert store.load() is None
        store.check()
        state = SavedState("cred", "seed", "access-1", 2.0, 1.0, "rt-1", 1)
        store.save(state)
        store.check()
        assert store.load() == state
        assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


async def test_store_planted_state_never_reaches_upstream(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, tmp_path: Path
) -> None:
    """The attack: a planted state file for this credential, no refresh token configured. The proxy does not start.

    The planted access token is never sent upstream, and the token endpoint is never called with the
    planted refresh token.
    """
    from proxy.config import parse_config
    from proxy.runtime.credentials import credential_of

    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    path = directory / "state.json"
    raw_token = {
        "grant": "refresh_token",
        "token_url": f"{token_server.base_url}/oauth/token",
        "client_id": CLIENT_ID,
        "state_file": str(path),
    }
    config = parse_config({"upstream": {"url": api.base_url}, "token": raw_token}, {})
    plant(path, credential_of(config.token), mode=0o644, owner=OTHER_UID)

    with pytest.raises(UnsafeStateError, match="owned by uid 12345"):
        await make_proxy(token={"refresh_token": ""})
    assert api.tokens_seen == []
    assert token_server.count == 0


async def test_store_directory_made_unsafe_while_running_is_not_written(
    make_proxy,
    token_server: FakeTokenServer,
    api: FakeApi,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A state directory opened to others after start: the new token is kept in memory, never written there."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    path = Path(proxy.config.token.state_file)
    before = path.read_text()
    path.parent.chmod(0o777)

    await refresh_times(proxy, token_server, api, client, 1)
    assert token_server.count == 2
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json", "state.json.lock"]
    assert any(
        "could not write the state file (state directory" in r.getMessage() and "writable by other users" in r.getMessage()
        for r in caplog.records
    )

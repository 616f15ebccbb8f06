"""A state file or directory another user could have planted: `run`, `token` and `check` refuse it (exit 1).

The attack (issue "Hardened" #5): another user pre-creates the state directory world-writable, or plants
a state file for this credential, and the proxy, configured without a refresh token of its own, adopts
the planted access token and sends it upstream. Each case is run through the command line as a user
runs it; the tests run as root, which is not exempt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.runtime.credentials import credential_of
from proxy.tokens.store import SavedState
from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import CLIENT_SECRET, FakeTokenServer
from tests.helpers import run_cli, write_config

OTHER_UID = 12345
PLANTED = "ATTACKER-TOKEN"
ENV = {"TEST_CLIENT_SECRET": CLIENT_SECRET}
COMMANDS = ("run", "token", "check")
# What each command puts before its one-line refusal.
PREFIX = {"run": "tokenproxy", "token": "token", "check": "check"}


def config_without_refresh_token(tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, state: Path) -> Path:
    """A refresh_token grant that relies on its state file alone (no refresh token configured)."""
    path = write_config(tmp_path / "c.toml", token_server, api, state)
    path.write_text(path.read_text().replace(f'refresh_token = "{token_server.current_refresh}"\n', ""))
    path.chmod(0o600)
    return path


def plant(config: Path, state: Path, *, mode: int = 0o644, owner: int | None = OTHER_UID, token: str = PLANTED) -> None:
    """A state file for the configured credential, as whoever writes it would make it."""
    credential = credential_of(load_config(config, env=ENV).token)
    saved = SavedState(credential, "", token, 4_000_000_000.0, 1.0, "rt-planted", 1)
    state.write_text(json.dumps(dataclasses.asdict(saved)))
    state.chmod(mode)
    if owner is not None:
        os.chown(state, owner, -1)


async def refused(command: str, config: Path, token_server: FakeTokenServer, api: FakeApi) -> str:
    """Run `command`; it must exit 1 before any token is fetched or sent. Its stderr."""
    code, out, err = await run_cli(command, "-c", str(config), env=ENV, timeout=20)
    assert code == 1, out + err
    assert out == ""
    assert PLANTED not in out + err
    assert token_server.count == 0  # nothing was fetched with a planted refresh token
    assert api.tokens_seen == []  # nothing reached the upstream
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("command", COMMANDS)
async def test_cli_planted_state_in_world_writable_directory_refused(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, command: str
) -> None:
    """The reported attack: a 0777 directory made by someone else, a 0644 state file owned by another uid."""
    directory = tmp_path / "state"
    directory.mkdir()
    directory.chmod(0o777)
    state = directory / "state.json"
    config = config_without_refresh_token(tmp_path, token_server, api, state)
    plant(config, state)

    err = await refused(command, config, token_server, api)
    assert err == (
        f"{PREFIX[command]}: state directory {directory} is writable by other users (mode 0777, no sticky bit): "
        f"anyone could plant or replace the state file; chmod 700 {directory}\n"
    )


@pytest.mark.parametrize("command", COMMANDS)
async def test_cli_state_file_owned_by_another_uid_refused(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, command: str
) -> None:
    """A state file owned by another uid, in a private directory of our own: refused, even though we are root."""
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    state = directory / "state.json"
    config = config_without_refresh_token(tmp_path, token_server, api, state)
    plant(config, state, mode=0o600)

    err = await refused(command, config, token_server, api)
    assert err == (
        f"{PREFIX[command]}: state file {state} is owned by uid {OTHER_UID}, not by this user (uid {os.geteuid()}), "
        "so it is not used: another user could have planted it; remove it\n"
    )


@pytest.mark.parametrize("command", COMMANDS)
async def test_cli_state_file_writable_by_others_refused(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, command: str
) -> None:
    """A state file of our own that others may write (0666): refused, since anyone could have rewritten it."""
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    state = directory / "state.json"
    config = config_without_refresh_token(tmp_path, token_server, api, state)
    plant(config, state, mode=0o666, owner=None)

    err = await refused(command, config, token_server, api)
    assert err == (
        f"{PREFIX[command]}: state file {state} is writable by other users (mode 0666), so it is not used: "
        "another user could have changed it; remove it, or chmod 600 it if you trust what it holds\n"
    )


@pytest.mark.parametrize("command", COMMANDS)
async def test_cli_state_file_symlink_refused(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, command: str
) -> None:
    """A symbolic link in the state file's place is not followed, whatever it points to."""
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    state = directory / "state.json"
    config = config_without_refresh_token(tmp_path, token_server, api, state)
    target = tmp_path / "planted.json"
    plant(config, target, mode=0o600, owner=None)  # even a target that would pass every other check
    state.symlink_to(target)

    err = await refused(command, config, token_server, api)
    assert err == (
        f"{PREFIX[command]}: state file {state} is a symbolic link, which is not followed: "
        "set token.state_file to the real file, or remove the link\n"
    )


async def test_cli_token_resumes_own_state_file(tmp_path: Path, token_server: FakeTokenServer, api: FakeApi) -> None:
    """The control: the same state file, ours (0600 in a 0700 directory), is resumed without calling the token endpoint.

    So it is the checks above, not a mismatch of credential, that keep a planted file out.
    """
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    state = directory / "state.json"
    config = config_without_refresh_token(tmp_path, token_server, api, state)
    plant(config, state, mode=0o600, owner=None, token="OWN-SAVED-TOKEN")

    code, out, err = await run_cli("token", "-c", str(config), env=ENV)
    assert code == 0, err
    assert out == "OWN-SAVED-TOKEN\n"
    assert token_server.count == 0

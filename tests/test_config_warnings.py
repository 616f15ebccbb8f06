"""Keys of another grant in `[token]` are ignored, and `check` says so by name rather than silently."""

from __future__ import annotations

from pathlib import Path

from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET, FakeTokenServer
from tests.helpers import run_cli


async def test_config_keys_of_another_grant_warned_by_name(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """client_credentials with `username` and `password` set: `check` works and warns that both are ignored."""
    path = tmp_path / "c.toml"
    path.write_text(
        f'[upstream]\nurl = "{api.base_url}"\n'
        f'[token]\ngrant = "client_credentials"\ntoken_url = "{token_server.base_url}/oauth/token"\n'
        f'client_id = "{CLIENT_ID}"\nclient_secret = "${{TEST_SECRET}}"\n'
        'username = "someone"\npassword = "${TEST_SECRET}"\nstate_file = ""\n'
    )
    path.chmod(0o600)
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_SECRET": CLIENT_SECRET})
    assert code == 0, err
    assert err == "warning: config: token.username, token.password: not used by grant 'client_credentials', ignored\n"
    assert token_server.count == 1
    assert "username" not in token_server.calls[-1].form


async def test_config_only_the_grants_own_keys_no_warning(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """The same grant with only its own keys: `check` prints no warning."""
    path = tmp_path / "c.toml"
    path.write_text(
        f'[upstream]\nurl = "{api.base_url}"\n'
        f'[token]\ngrant = "client_credentials"\ntoken_url = "{token_server.base_url}/oauth/token"\n'
        f'client_id = "{CLIENT_ID}"\nclient_secret = "${{TEST_SECRET}}"\nscope = "read"\nstate_file = ""\n'
    )
    path.chmod(0o600)
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_SECRET": CLIENT_SECRET})
    assert code == 0, err
    assert err == ""

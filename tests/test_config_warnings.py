"""Keys of another grant in `[token]` are ignored, and `check` says so by name rather than silently."""

from __future__ import annotations

import tomllib
from pathlib import Path

from proxy.config import exposed_secrets_warning
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


async def test_config_keys_of_another_grant_in_a_credentials_table_warned_by_name(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """With routes, a `[credentials.NAME]` table's keys of another grant are named where they sit."""
    path = tmp_path / "c.toml"
    path.write_text(
        f'[credentials.main]\ngrant = "client_credentials"\ntoken_url = "{token_server.base_url}/oauth/token"\n'
        f'client_id = "{CLIENT_ID}"\nclient_secret = "${{TEST_SECRET}}"\nusername = "someone"\nstate_file = ""\n'
        f'[[route]]\nname = "api"\nurl = "{api.base_url}"\ntoken = "main"\n'
    )
    path.chmod(0o600)
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_SECRET": CLIENT_SECRET})
    assert code == 0, err
    assert err == "warning: config: credentials.main.username: not used by grant 'client_credentials', ignored\n"


def _store_config(path: Path, url: str) -> str:
    path.write_text(
        '[upstream]\nurl = "https://api.example.com"\n'
        '[token]\ngrant = "static"\naccess_token = "${TEST_SECRET}"\n'
        f'[store]\nbackend = "redis"\nurl = "{url}"\n'
    )
    path.chmod(0o644)
    return str(path)


async def test_config_store_url_is_a_literal_secret_only_with_a_literal_password(tmp_path: Path) -> None:
    """A readable file whose `store.url` names only a host is not warned about (as `run` and `check` would); a
    literal password in it is, and `config show` masks the password alone; a `${VAR}` password is neither warned
    about nor shown."""
    env = {"TEST_SECRET": "t-0123456789"}
    for url, warned, shown in (
        ("redis://127.0.0.1:6379/0", False, "redis://127.0.0.1:6379/0"),
        ("redis://app:hunter2-pw@127.0.0.1:6379/0", True, "redis://app:<set>@127.0.0.1:6379/0"),
        ("redis://:${REDIS_PW}@127.0.0.1:6379/0", False, "redis://:<set>@127.0.0.1:6379/0"),
    ):
        path = _store_config(tmp_path / "c.toml", url)
        code, out, err = await run_cli("config", "show", "-c", path, env={**env, "REDIS_PW": "from-env-pw"})
        assert code == 0, err
        assert f'url = "{shown}"' in out
        assert "hunter2" not in out and "from-env-pw" not in out
        warning = exposed_secrets_warning(path, 0o644, tomllib.loads(Path(path).read_text()))
        assert (warning is not None and "store.url" in warning) is warned, (url, warning)

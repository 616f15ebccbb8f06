"""Config errors and warnings on the command line never print a secret (issue "Hardened" #8).

Exact stderr: a secret key with the wrong type is named with its kind, an invalid JSON body template
with its parse error's position, and literal `[token.json]` header and body secrets in a file others
can read are named by key in the permission warning.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import FakeTokenServer
from tests.helpers import run_cli

HEADER_SECRET = "hdr-s3cret-4b9e1f"
BODY_SECRET = "body-s3cret-7c2d0a"


@pytest.mark.parametrize("command", ["check", "run", "token"])
async def test_cli_unquoted_password_error_shows_kind_not_value(tmp_path: Path, command: str) -> None:
    """`password = 73194628` (unquoted, so an integer): exit 2 naming the key and the kind only."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9"\n'
        '[token]\ngrant = "password"\ntoken_url = "http://127.0.0.1:9/t"\nusername = "u"\npassword = 73194628\n'
    )
    path.chmod(0o600)
    code, out, err = await run_cli(command, "-c", str(path))
    assert code == 2
    assert (out, err) == ("", "config: token.password: must be a string, got an integer\n")


async def test_cli_invalid_json_body_not_echoed(tmp_path: Path) -> None:
    """An invalid `token.json.body` holding a literal secret: the error says where, and shows none of it."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9"\n'
        '[token]\ngrant = "json"\ntoken_url = "http://127.0.0.1:9/auth"\nrefresh_token = "r"\n'
        f"[token.json]\nbody = '{{\"refreshToken\": \"{{refresh_token}}\", \"secret\": \"{BODY_SECRET}\"'\n"
    )
    path.chmod(0o600)
    code, out, err = await run_cli("check", "-c", str(path))
    assert code == 2
    assert (out, err) == (
        "",
        "config: token.json.body: must be a JSON document (Expecting ',' delimiter at line 1 column 67)\n",
    )


async def test_cli_invalid_json_body_from_environment_not_echoed(tmp_path: Path) -> None:
    """The same for a body filled in from ${VAR}: the environment's value is not printed."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9"\n'
        '[token]\ngrant = "json"\ntoken_url = "http://127.0.0.1:9/auth"\nrefresh_token = "r"\n'
        '[token.json]\nbody = "${TEST_BODY}"\n'
    )
    path.chmod(0o600)
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_BODY": f"{{{BODY_SECRET}}}"})
    assert code == 2
    assert (out, err) == (
        "",
        "config: token.json.body: must be a JSON document (Expecting property name enclosed in double quotes "
        "at line 1 column 2)\n",
    )


async def test_cli_wrong_typed_header_not_echoed(tmp_path: Path) -> None:
    """A `[token.json] headers` value of the wrong type: its name and kind, not its value."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9"\n'
        '[token]\ngrant = "json"\ntoken_url = "http://127.0.0.1:9/auth"\nrefresh_token = "r"\n'
        "[token.json]\nheaders = { X-Api-Key = 73194628 }\n"
    )
    path.chmod(0o600)
    code, out, err = await run_cli("check", "-c", str(path))
    assert code == 2
    assert (out, err) == ("", "config: token.json.headers: must be a table of strings, got an integer for 'X-Api-Key'\n")


async def test_cli_literal_json_header_and_body_secrets_warned_by_key(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """A 0644 config with a literal header value and body secret: `check` warns naming both keys, no value."""
    path = tmp_path / "c.toml"
    path.write_text(
        f'[upstream]\nurl = "{api.base_url}"\n'
        f'[token]\ngrant = "json"\ntoken_url = "{token_server.base_url}/auth/refresh"\n'
        f'refresh_token = "${{TEST_REFRESH}}"\nstate_file = ""\n'
        "[token.json]\n"
        f'headers = {{ X-Api-Key = "{HEADER_SECRET}", Accept = "application/json" }}\n'
        f"body = '{{\"refreshToken\": \"{{refresh_token}}\", \"secret\": \"{BODY_SECRET}\"}}'\n"
        'access_token_path = "data.accessToken"\nrefresh_token_path = "data.refreshToken"\n'
    )
    path.chmod(0o644)
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_REFRESH": token_server.current_refresh})
    assert code == 0, err
    assert err == (
        f"warning: config: {path} is readable by other users and holds token.json.headers.X-Api-Key, "
        "token.json.body as literal text: chmod 600 the file, or write ${VAR} there and set the variable\n"
    )
    assert HEADER_SECRET not in out + err and BODY_SECRET not in out + err
    assert token_server.calls[-1].headers["X-Api-Key"] == HEADER_SECRET  # the header itself is still sent

"""token_exchange (RFC 8693) and `[token.params]`, through the real proxy and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET, EXCHANGE_GRANT, SUBJECT_TOKEN, FakeTokenServer
from tests.helpers import run_cli


async def get_status(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """One request through the proxy: its status and its error code (if any)."""
    async with client.get(url) as resp:
        body = await resp.read()
        return resp.status, json.loads(body).get("error", "") if resp.status != 200 else ""


def exchange_section(subject_file: Path, **keys: Any) -> dict[str, Any]:
    """A token_exchange `token` section reading its subject token from `subject_file`."""
    return {"grant": "token_exchange", "subject_token_file": str(subject_file), **keys}


async def test_grant_token_exchange_rereads_subject_token_file_each_time(
    make_proxy,
    token_server: FakeTokenServer,
    api: FakeApi,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each exchange presents the subject token file's content as it is then (a rotated projected token included)."""
    subject = tmp_path / "token"
    subject.write_text(SUBJECT_TOKEN + "\n")
    token_server.subject_tokens.add("rotated-subject-token-0002")
    proxy = await make_proxy(
        token=exchange_section(
            subject,
            audience="https://api.example.com",
            resource="https://api.example.com/v1",
            requested_token_type="urn:ietf:params:oauth:token-type:access_token",
        )
    )

    assert await get_status(client, f"{proxy.url}/echo/1") == (200, "")
    subject.write_text("rotated-subject-token-0002")
    api.expire_all(token_server.issued_access)
    assert await get_status(client, f"{proxy.url}/echo/2") == (200, "")

    first, second = (call.form for call in token_server.calls)
    assert first == {
        "grant_type": EXCHANGE_GRANT,
        "subject_token": SUBJECT_TOKEN,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "resource": "https://api.example.com/v1",
        "audience": "https://api.example.com",
    }
    assert second["subject_token"] == "rotated-subject-token-0002"
    assert SUBJECT_TOKEN not in caplog.text and "rotated-subject-token-0002" not in caplog.text


async def test_grant_token_exchange_subject_token_from_env(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """`subject_token = "${VAR}"`: `tokenproxy token` exchanges it and prints the issued token."""
    path = tmp_path / "c.toml"
    path.write_text(
        f'[upstream]\nurl = "{api.base_url}"\n[token]\ngrant = "token_exchange"\nstate_file = ""\n'
        f'token_url = "{token_server.base_url}/oauth/token"\nclient_id = "{CLIENT_ID}"\n'
        'client_secret = "${SECRET}"\nsubject_token = "${SUBJECT}"\n'
    )

    code, out, err = await run_cli("token", "-c", str(path), env={"SECRET": CLIENT_SECRET, "SUBJECT": SUBJECT_TOKEN})

    assert (code, err) == (0, "")
    assert out == token_server.issued_access[-1] + "\n"
    assert token_server.calls[-1].form["subject_token"] == SUBJECT_TOKEN


async def test_grant_token_exchange_rejected_subject_token_gives_token_unavailable(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, tmp_path: Path, caplog
) -> None:
    """An endpoint refusing the subject token (invalid_grant): 503 token_unavailable, the code in the log."""
    subject = tmp_path / "token"
    subject.write_text("a-subject-token-it-does-not-know")
    proxy = await make_proxy(token=exchange_section(subject))

    assert await get_status(client, f"{proxy.url}/echo/x") == (503, "token_unavailable")
    assert "token endpoint refused: invalid_grant" in caplog.text
    assert "a-subject-token-it-does-not-know" not in caplog.text


async def test_grant_token_exchange_subject_file_gone_gives_token_unavailable(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, tmp_path: Path, caplog
) -> None:
    """A subject token file removed after start: 503 token_unavailable naming the file; nothing is sent."""
    subject = tmp_path / "token"
    subject.write_text(SUBJECT_TOKEN)
    proxy = await make_proxy(token=exchange_section(subject))
    subject.unlink()

    assert await get_status(client, f"{proxy.url}/echo/x") == (503, "token_unavailable")
    assert f"subject token file {subject}: cannot be read (No such file or directory)" in caplog.text
    assert token_server.calls == []


@pytest.mark.parametrize(
    ("keys", "line"),
    [
        ("", "config: token.subject_token_file: is required for grant 'token_exchange' (or token.subject_token)"),
        (
            'subject_token_file = "/nonexistent/token"',
            "config: token.subject_token_file: no such file, got '/nonexistent/token'",
        ),
        (
            'subject_token_file = "/etc/hostname"\nsubject_token = "x"',
            "config: token.subject_token: give token.subject_token_file or token.subject_token, not both",
        ),
    ],
    ids=["none", "missing-file", "both"],
)
async def test_cli_check_token_exchange_bad_subject_exits_2(tmp_path: Path, keys: str, line: str) -> None:
    """No subject token, a missing file, or both sources: exit 2, one line naming the key."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9"\n[token]\ngrant = "token_exchange"\nstate_file = ""\n'
        f'token_url = "http://127.0.0.1:9/token"\n{keys}\n'
    )

    code, out, err = await run_cli("check", "-c", str(path))

    assert (code, out, err) == (2, "", line + "\n")


# --- [token.params] ------------------------------------------------------------------------------


@pytest.mark.parametrize("grant", ["refresh_token", "client_credentials", "password"])
async def test_token_params_are_sent_with_every_token_request(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, grant: str
) -> None:
    """`[token.params]` adds its fields to the form of every form-based grant's token request."""
    keys: dict[str, Any] = {"grant": grant, "params": {"resource": "https://api.example.com", "organization": "org-7"}}
    if grant == "password":
        keys.update(username="alice", password="alice-password-pw")
    proxy = await make_proxy(token=keys)

    assert await get_status(client, f"{proxy.url}/echo/x") == (200, "")

    form = token_server.calls[-1].form
    assert form["grant_type"] == grant
    assert (form["resource"], form["organization"]) == ("https://api.example.com", "org-7")


async def test_token_params_values_come_from_the_environment(tmp_path: Path, token_server: FakeTokenServer, api):
    """A `[token.params]` value written `${VAR}` is the environment's value."""
    path = tmp_path / "c.toml"
    path.write_text(
        f'[upstream]\nurl = "{api.base_url}"\n[token]\ngrant = "client_credentials"\nstate_file = ""\n'
        f'token_url = "{token_server.base_url}/oauth/token"\nclient_id = "{CLIENT_ID}"\n'
        'client_secret = "${SECRET}"\n[token.params]\norganization = "${ORG}"\n'
    )

    code, _, err = await run_cli("check", "-c", str(path), env={"SECRET": CLIENT_SECRET, "ORG": "org-from-env"})

    assert (code, err) == (0, "")
    assert token_server.calls[-1].form["organization"] == "org-from-env"


@pytest.mark.parametrize(
    ("grant", "keys", "name"),
    [
        ("client_credentials", "", "grant_type"),
        ("client_credentials", "", "client_id"),
        ("client_credentials", 'scope = "read"', "scope"),
        ("refresh_token", "", "refresh_token"),
        ("token_exchange", 'subject_token = "s"', "subject_token"),
    ],
)
async def test_cli_check_token_params_colliding_with_the_grant_exit_2(
    tmp_path: Path, grant: str, keys: str, name: str
) -> None:
    """A `[token.params]` key the grant or client authentication sets itself: exit 2 naming it."""
    path = tmp_path / "c.toml"
    path.write_text(
        f'[upstream]\nurl = "http://127.0.0.1:9"\n[token]\ngrant = "{grant}"\nstate_file = ""\n'
        f'token_url = "http://127.0.0.1:9/token"\nclient_id = "c"\nrefresh_token = "r"\n{keys}\n'
        f'[token.params]\n{name} = "x"\n'
    )

    code, out, err = await run_cli("check", "-c", str(path))

    line = f"config: token.params.{name}: is set by the grant or client_auth itself; it cannot be given in [token.params]"
    assert (code, out, err) == (2, "", line + "\n")

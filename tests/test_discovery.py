"""Discovery: `token.issuer` instead of `token_url`, its RFC 8414 metadata fetched at start by run, check and token."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.auth.discovery import metadata_urls, resource_metadata_url
from proxy.config import ConfigError, parse_config
from tests.fakes.auth_server import PUBLIC_CLIENT, FakeAuthServer
from tests.helpers import read_until, run_cli, start_cli


@pytest.fixture
async def auth_server(aiohttp_server: Any) -> AsyncIterator[FakeAuthServer]:
    """The fake authorization server with metadata, on 127.0.0.1."""
    fake = FakeAuthServer()
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    yield fake


def _config(path: Path, issuer: str, state: Path, extra: str = "") -> str:
    path.write_text(
        f'[upstream]\nurl = "http://127.0.0.1:9/"\n[token]\ngrant = "refresh_token"\nissuer = "{issuer}"\n'
        f'client_id = "{PUBLIC_CLIENT}"\nclient_auth = "none"\nstate_file = "{state}"\n{extra}'
    )
    path.chmod(0o600)
    return str(path)


def test_metadata_urls_issuer_with_path_inserts_well_known() -> None:
    """RFC 8414 §3.1 puts the well-known part before the issuer's path; OpenID Connect appends it."""
    assert metadata_urls("https://auth.example.com/tenant/1/") == [
        "https://auth.example.com/.well-known/oauth-authorization-server/tenant/1",
        "https://auth.example.com/tenant/1/.well-known/openid-configuration",
    ]
    assert metadata_urls("https://auth.example.com") == [
        "https://auth.example.com/.well-known/oauth-authorization-server",
        "https://auth.example.com/.well-known/openid-configuration",
    ]


def test_resource_metadata_url_bearer_challenge_read() -> None:
    """The RFC 9728 parameter is read from a Bearer challenge, commas inside quotes included."""
    challenge = 'Bearer realm="a, b", resource_metadata="https://api.example/.well-known/oauth-protected-resource"'
    assert resource_metadata_url(challenge) == "https://api.example/.well-known/oauth-protected-resource"
    assert resource_metadata_url('Basic realm="x"') == ""


def test_config_issuer_and_token_url_both_refused() -> None:
    """An issuer takes the place of token_url: both at once is a config problem naming the key."""
    raw = {"upstream": {"url": "http://a"}, "token": {"issuer": "https://i", "token_url": "https://t/token"}}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, {})
    assert caught.value.problems == [
        "token.issuer: give token.issuer or token.token_url, not both "
        "(the token endpoint comes from the issuer's metadata)"
    ]


def test_config_issuer_without_token_url_accepted() -> None:
    """With an issuer, token_url is not required."""
    config = parse_config({"upstream": {"url": "http://a"}, "token": {"issuer": "https://i", "state_file": ""
                                                                       , "refresh_token": "r"}}, {})
    assert config.token.issuer == "https://i"


async def test_check_issuer_without_metadata_exits_1_naming_urls(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    """No metadata at either well-known URL: exit 1 naming both URLs tried."""
    auth_server.metadata_mode = "404"
    config = _config(tmp_path / "c.toml", auth_server.issuer, tmp_path / "state.json")
    code, out, err = await run_cli("check", "-c", config)
    base = auth_server.base_url
    assert (code, out) == (1, "")
    assert err == (
        f"check: discovery: no metadata for token.issuer '{base}': "
        f"{base}/.well-known/oauth-authorization-server answered 404; "
        f"{base}/.well-known/openid-configuration answered 404\n"
    )


async def test_run_issuer_mismatch_exits_1_naming_url(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    """A document naming another issuer is not used: `run` exits 1 before listening, naming the URL."""
    auth_server.metadata_mode = "mismatch"
    config = _config(tmp_path / "c.toml", auth_server.issuer, tmp_path / "state.json", "[server]\nlisten = \"127.0.0.1:0\"\n")
    code, out, err = await run_cli("run", "-c", config)
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == (
        f"tokenproxy: discovery: {auth_server.base_url}/.well-known/oauth-authorization-server: the document names "
        f"issuer 'https://elsewhere.example', not token.issuer '{auth_server.issuer}'; it is not used"
    )


async def test_token_issuer_metadata_not_json_exits_1(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    """A metadata URL answering an HTML page: exit 1 naming the URL and what came."""
    auth_server.metadata_mode = "html"
    config = _config(tmp_path / "c.toml", auth_server.issuer, tmp_path / "state.json")
    code, out, err = await run_cli("token", "-c", config)
    assert (code, out) == (1, "")
    assert err == (
        f"token: discovery: {auth_server.base_url}/.well-known/oauth-authorization-server: answered with something "
        "that is not JSON (text/html)\n"
    )


async def test_run_reload_refetches_metadata_and_keeps_old_config_when_gone(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    """SIGHUP fetches the issuer's metadata again: gone now, the reload is rejected and the old config stays."""
    config = _config(tmp_path / "c.toml", auth_server.issuer, tmp_path / "state.json",
                     '[server]\nlisten = "127.0.0.1:0"\n')
    proc = await start_cli("run", "-c", config)
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, r"tokenproxy listening on", seen)
        assert auth_server.metadata_requests == ["/.well-known/oauth-authorization-server"]
        auth_server.metadata_mode = "404"
        proc.send_signal(signal.SIGHUP)
        line = (await read_until(proc.stderr, r"config reload rejected.*", seen)).group(0)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
    base = auth_server.base_url
    assert line == (
        f"config reload rejected, the old config stays in force: discovery: no metadata for token.issuer '{base}': "
        f"{base}/.well-known/oauth-authorization-server answered 404; "
        f"{base}/.well-known/openid-configuration answered 404"
    )


async def test_run_client_auth_not_listed_warns_and_not_logged_in_says_login(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    """At start, a client_auth the metadata does not list is a warning naming both, and a refresh_token grant
    with no refresh token anywhere says to run `tokenproxy login`."""
    state = tmp_path / "state.json"
    config = _config(tmp_path / "c.toml", auth_server.issuer, state, '[server]\nlisten = "127.0.0.1:0"\n')
    Path(config).write_text(Path(config).read_text().replace('client_auth = "none"', 'client_auth = "basic"'))
    proc = await start_cli("run", "-c", config)
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, r"tokenproxy listening on", seen)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
    base = auth_server.base_url
    assert any(line.rstrip().endswith(
        f"not logged in: no token.refresh_token, and none in {state}: run `tokenproxy login`; "
        "until then requests get 503 login_required") for line in seen)
    assert any(line.rstrip().endswith(
        f"token.client_auth 'basic' (client_secret_basic) is not among the methods "
        f"{base}/.well-known/oauth-authorization-server lists: none") for line in seen)

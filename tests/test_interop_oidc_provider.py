"""Interoperability of `tokenproxy login` with oidc-provider (npm), a certified OpenID provider nobody here wrote.

The package is installed from the npm registry into a cache folder the first
time (skipped with the reason where npm is missing) and started on 127.0.0.1
by tests/fakes/oidc_provider.mjs with discovery, the device flow, dynamic
registration, PKCE required and rotating refresh tokens. The person's part
in the browser (its development login and consent pages) is played over
HTTP. Then `tokenproxy run` serves with the tokens obtained: oidc-provider's
own userinfo endpoint is the API.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import read_until, run_cli, saved_entry, start_cli

CACHE = Path(os.environ.get("TOKENPROXY_TEST_CACHE", Path.home() / ".cache" / "tokenproxy-tests")) / "npm-oidc-provider"
PACKAGE = "oidc-provider@8"
LAUNCHER = Path(__file__).parent / "fakes" / "oidc_provider.mjs"
CLIENT = "tokenproxy-interop"  # the client the launcher configures


@pytest.fixture(scope="session")
def oidc_provider_modules() -> Iterator[Path]:
    """The node_modules folder holding oidc-provider, installed once per machine."""
    modules = CACHE / "node_modules"
    if not (modules / "oidc-provider" / "package.json").exists():
        if shutil.which("npm") is None or shutil.which("node") is None:
            pytest.skip("node or npm is not installed, so oidc-provider cannot be")
        CACHE.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(CACHE), PACKAGE],
            capture_output=True, text=True, timeout=300, check=False,
        )
        if result.returncode != 0 or not (modules / "oidc-provider").exists():
            pytest.skip(f"npm could not install {PACKAGE}: {result.stderr.strip()[:200]}")
    yield modules


@pytest.fixture
async def oidc_issuer(oidc_provider_modules: Path) -> AsyncIterator[str]:
    """A running oidc-provider on a free 127.0.0.1 port: its issuer URL."""
    proc = await asyncio.create_subprocess_exec(
        "node", str(LAUNCHER), str(oidc_provider_modules),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        yield (await read_until(proc.stdout, r"listening on (http://127\.0\.0\.1:\d+)", [], timeout=30)).group(1)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.communicate(), 30)


class _Forms(HTMLParser):
    """The forms of a page: action, method and the inputs' names and values."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append((found.get("action", ""), {}))
        elif tag == "input" and self.forms and found.get("name"):
            self.forms[-1][1][found["name"]] = found.get("value", "")


async def play_the_person(url: str) -> str:
    """Open `url` as a browser would and get through oidc-provider's pages: confirm a device code, log in as
    alice, consent. Returns the last page's text."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.get(url) as resp:
            page, at = await resp.text(), resp.url
        for _ in range(8):
            parser = _Forms()
            parser.feed(page)
            if not parser.forms:
                return page
            action, fields = parser.forms[0]
            if "login" in fields or "password" in fields:
                fields.update(login="alice", password="any")
            async with browser.post(at.join(aiohttp.client.URL(action)), data=fields) as resp:
                page, at = await resp.text(), resp.url
        raise AssertionError("still on a form after 8 pages:\n" + page[:500])


def _config(path: Path, issuer: str, state: Path, client: bool) -> str:
    client_keys = f'client_id = "{CLIENT}"\nclient_auth = "none"\n' if client else ""
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[upstream]\nurl = "{issuer}"\n[token]\nissuer = "{issuer}"\n'
        f'{client_keys}scope = "openid"\nstate_file = "{state}"\n'
    )
    return str(path)


async def _run_and_ask_userinfo(config: str) -> tuple[int, dict[str, str], str]:
    """Start `tokenproxy run`, GET /me (oidc-provider's userinfo) through it, stop it: status, body, its log."""
    proc = await start_cli("run", "-c", config)
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        proxy = (await read_until(proc.stderr, r"listening on (http://127\.0\.0\.1:\d+)", seen)).group(1)
        async with aiohttp.ClientSession() as client, client.get(f"{proxy}/me") as resp:
            status, body = resp.status, await resp.json()
    finally:
        proc.terminate()
        _, rest = await asyncio.wait_for(proc.communicate(), 20)
    return status, body, "".join(seen) + rest.decode()


def _no_tokens_in(state: Path, *texts: str) -> None:
    saved = saved_entry(state)
    for value in (saved["access_token"], saved["refresh_token"]):
        assert value and all(value not in text for text in texts)


async def test_interop_oidc_provider_device_flow_then_run(oidc_issuer: str, tmp_path: Path) -> None:
    """Discovery (its OpenID Connect document) and the device flow: the person confirms the code, logs in and
    consents; `run` then serves userinfo with the token, and nothing printed holds a token."""
    state = tmp_path / "state.json"
    config = _config(tmp_path / "c.toml", oidc_issuer, state, client=True)
    proc = await start_cli("login", "-c", config, "--flow", "device", "--timeout", "60")
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        url = (await read_until(proc.stdout, r"^\(or open (\S+), which has the code in it\)$", seen)).group(1)
        assert "Sign-in Success" in await play_the_person(url)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    printed = "".join(seen) + out.decode() + err.decode()
    assert proc.returncode == 0, printed
    assert "Logged in: access token" in printed
    status, body, log = await _run_and_ask_userinfo(config)
    assert (status, body) == (200, {"sub": "alice"})
    _no_tokens_in(state, printed, log)


async def test_interop_oidc_provider_registration_code_pkce_then_run_and_logout(
    oidc_issuer: str, tmp_path: Path
) -> None:
    """No client_id: login registers a public client, then the code flow with PKCE through its login and consent
    pages to the loopback redirect; `run` serves userinfo; the refresh token rotates; logout revokes it."""
    state = tmp_path / "state.json"
    config = _config(tmp_path / "c.toml", oidc_issuer, state, client=False)
    proc = await start_cli("login", "-c", config, "--flow", "code", "--no-browser", "--timeout", "60")
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        url = (await read_until(proc.stdout, r"^(http://127\.0\.0\.1:\d+/auth\?\S+)$", seen)).group(1)
        assert "You may close this page." in await play_the_person(url)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    printed = "".join(seen) + out.decode() + err.decode()
    assert proc.returncode == 0, printed
    assert re.match(r"Registered tokenproxy as client \S+ at http://127\.0\.0\.1:\d+/reg", printed)
    first = saved_entry(state)["refresh_token"]
    code, out_check, err_check = await run_cli("check", "-c", config)  # a refresh now: the refresh token rotates
    assert (code, err_check) == (0, "")
    assert saved_entry(state)["refresh_token"] not in (first, None)
    status, body, log = await _run_and_ask_userinfo(config)
    assert (status, body) == (200, {"sub": "alice"})
    _no_tokens_in(state, printed, log, out_check)
    code, out_logout, err_logout = await run_cli("logout", "-c", config)
    assert (code, err_logout) == (0, "")
    assert out_logout.splitlines()[-1] == f"Revoked the refresh token at {oidc_issuer}/token/revocation."

"""Interoperability of `tokenproxy login` with oidc-provider (npm), a certified OpenID provider nobody here wrote.

The package is installed from the npm registry into a cache folder the first
time (skipped with the reason where npm is missing) and started on 127.0.0.1
by tests/fakes/oidc_provider.mjs with discovery, the device flow, dynamic
registration, PKCE required and rotating refresh tokens. The person's part
in the browser (its development login and consent pages) is played over
HTTP. Then `tokenproxy run` serves with the tokens obtained: oidc-provider's
own userinfo endpoint is the API.

Client authentication against it: `private_key_jwt` (a key the test
generates, its public JWK registered with the client) and `tls_client_auth`
(oidc-provider over HTTPS with a test CA, reading the client certificate
from the TLS socket), both with the client_credentials grant and a resource
indicator, for which it issues a JWT access token; httpbin is the upstream
and the token it received is checked against oidc-provider's JWKS.
oidc-provider has no RFC 8693 token exchange grant (only the means to write
one), so `token_exchange` is not tried against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.tls import TestCa
from tests.helpers import read_until, run_cli, saved_entry, start_cli

CACHE = Path(os.environ.get("TOKENPROXY_TEST_CACHE", Path.home() / ".cache" / "tokenproxy-tests")) / "npm-oidc-provider"
PACKAGE = "oidc-provider@8"
LAUNCHER = Path(__file__).parent / "fakes" / "oidc_provider.mjs"
CLIENT = "tokenproxy-interop"  # the client the launcher configures
API = "https://api.interop.test/"  # the resource indicator the launcher issues client_credentials JWTs for


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


@contextlib.asynccontextmanager
async def running_provider(modules: Path, options: Path | None = None) -> AsyncIterator[str]:
    """oidc-provider started by the launcher (with its options file, if any), stopped by PID: its issuer URL."""
    proc = await asyncio.create_subprocess_exec(
        "node", str(LAUNCHER), str(modules), *([str(options)] if options else []),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        yield (await read_until(proc.stdout, r"listening on (https?://127\.0\.0\.1:\d+)", [], timeout=30)).group(1)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.communicate(), 30)


@pytest.fixture
async def oidc_issuer(oidc_provider_modules: Path) -> AsyncIterator[str]:
    """A running oidc-provider on a free 127.0.0.1 port: its issuer URL."""
    async with running_provider(oidc_provider_modules) as issuer:
        yield issuer


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


# --- client authentication: private_key_jwt and tls_client_auth, with client_credentials ---------------------------


def _client_credentials_config(path: Path, issuer: str, upstream: str, client_keys: str, extra: str = "") -> str:
    """A client_credentials config asking oidc-provider for a token for API (a resource indicator)."""
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[upstream]\nurl = "{upstream}"\n{extra}[token]\n'
        f'grant = "client_credentials"\nissuer = "{issuer}"\nscope = "api:read"\nstate_file = ""\n{client_keys}'
        f'[token.params]\nresource = "{API}"\n'
    )
    return str(path)


async def _bearer_through(config: str) -> tuple[int, dict[str, Any], str]:
    """Start `tokenproxy run`, GET httpbin's /bearer through it, stop it: status, body, its log."""
    proc = await start_cli("run", "-c", config)
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        proxy = (await read_until(proc.stderr, r"listening on (http://127\.0\.0\.1:\d+)", seen)).group(1)
        async with aiohttp.ClientSession() as client, client.get(f"{proxy}/bearer") as resp:
            status, body = resp.status, await resp.json()
    finally:
        if proc.returncode is None:
            proc.terminate()
        _, rest = await asyncio.wait_for(proc.communicate(), 20)
    return status, body, "".join(seen) + rest.decode()


async def _verified(token: str, issuer: str, tls: ssl.SSLContext | None = None) -> dict[str, Any]:
    """The access token's claims, its signature checked against the JWKS oidc-provider's metadata names."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{issuer}/.well-known/openid-configuration", ssl=tls or True) as resp:
            jwks_uri = (await resp.json())["jwks_uri"]
        async with session.get(jwks_uri, ssl=tls or True) as resp:
            keys = (await resp.json())["keys"]
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWK(next(k for k in keys if k["kid"] == kid))
    return dict(jwt.decode(token, key.key, algorithms=[key.algorithm_name], audience=API, issuer=issuer))


async def test_interop_oidc_provider_private_key_jwt_client_credentials(
    oidc_provider_modules: Path, tmp_path: Path, httpbin: str
) -> None:
    """A client registered with the public JWK of a key the test made: `run` with client_auth = private_key_jwt
    gets a JWT access token for the API (resource indicator) and httpbin receives it, signed by oidc-provider."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "client.key"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    options = tmp_path / "provider.json"
    options.write_text(json.dumps({"clients": [{
        "client_id": "tokenproxy-pkjwt", "token_endpoint_auth_method": "private_key_jwt",
        "jwks": {"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]},
        "grant_types": ["client_credentials"], "response_types": [], "redirect_uris": [],
    }]}))
    async with running_provider(oidc_provider_modules, options) as issuer:
        config = _client_credentials_config(
            tmp_path / "c.toml", issuer, httpbin,
            f'client_id = "tokenproxy-pkjwt"\nclient_auth = "private_key_jwt"\nclient_key_file = "{key_file}"\n'
            'client_key_id = "k1"\n',
        )
        status, body, log = await _bearer_through(config)
        assert (status, body.get("authenticated")) == (200, True), log
        claims = await _verified(body["token"], issuer)
    assert (claims["client_id"], claims["scope"]) == ("tokenproxy-pkjwt", "api:read")
    assert body["token"] not in log


async def test_interop_oidc_provider_tls_client_auth_client_credentials(
    oidc_provider_modules: Path, tmp_path: Path, httpbin: str
) -> None:
    """oidc-provider over HTTPS with a test CA, reading the client certificate from the TLS socket: `run` with
    client_auth = tls_client_auth gets a JWT access token for the API and httpbin receives it."""
    ca = TestCa(tmp_path)
    server_cert, server_key = ca.issue("oidc-server", client=False)
    client_cert, client_key = ca.issue("tokenproxy-mtls", client=True)
    options = tmp_path / "provider.json"
    options.write_text(json.dumps({
        "tls": {"key": str(server_key), "cert": str(server_cert), "ca": str(ca.ca_file)},
        "clients": [{
            "client_id": "tokenproxy-mtls", "token_endpoint_auth_method": "tls_client_auth",
            "tls_client_auth_subject_dn": "CN=tokenproxy-mtls",
            "grant_types": ["client_credentials"], "response_types": [], "redirect_uris": [],
        }],
    }))
    async with running_provider(oidc_provider_modules, options) as issuer:
        assert issuer.startswith("https://")
        config = _client_credentials_config(
            tmp_path / "c.toml", issuer, httpbin,
            f'client_id = "tokenproxy-mtls"\nclient_auth = "tls_client_auth"\nclient_cert_file = "{client_cert}"\n'
            f'client_key_file = "{client_key}"\n',
            extra=f'ca_file = "{ca.ca_file}"\n',
        )
        status, body, log = await _bearer_through(config)
        assert (status, body.get("authenticated")) == (200, True), log
        claims = await _verified(body["token"], issuer, ssl.create_default_context(cafile=str(ca.ca_file)))
    assert (claims["client_id"], claims["scope"]) == ("tokenproxy-mtls", "api:read")
    assert body["token"] not in log

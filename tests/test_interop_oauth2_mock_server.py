"""Interoperability with a real authorization server nobody here wrote: oauth2-mock-server (npm).

The package is installed from the npm registry into a cache folder the first
time; without node/npm (or the registry) these tests are skipped with the
reason. Tokens are RS256 JWTs, checked here against the server's own JWKS.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests

from tests.helpers import saved_entry

CACHE = Path(os.environ.get("TOKENPROXY_TEST_CACHE", Path.home() / ".cache" / "tokenproxy-tests")) / "npm"
PACKAGE = "oauth2-mock-server@7"


@pytest.fixture(scope="session")
def oauth2_mock_server_bin() -> Iterator[Path]:
    """The oauth2-mock-server executable, installed once per machine."""
    binary = CACHE / "node_modules" / ".bin" / "oauth2-mock-server"
    if not binary.exists():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed, so oauth2-mock-server cannot be")
        CACHE.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(CACHE), PACKAGE],
            capture_output=True, text=True, timeout=300, check=False,
        )
        if result.returncode != 0 or not binary.exists():
            pytest.skip(f"npm could not install {PACKAGE}: {result.stderr.strip()[:200]}")
    yield binary


@pytest.fixture
async def oauth2_server(oauth2_mock_server_bin: Path) -> AsyncIterator[str]:
    """A running oauth2-mock-server on a free 127.0.0.1 port."""
    proc = await asyncio.create_subprocess_exec(
        str(oauth2_mock_server_bin), "-a", "127.0.0.1", "-p", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None

        async def listening() -> str:
            while True:
                line = (await proc.stdout.readline()).decode()  # type: ignore[union-attr]
                if not line:
                    raise AssertionError("oauth2-mock-server exited before listening")
                match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
                if match:
                    return match.group(1)

        yield await asyncio.wait_for(listening(), 30)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.communicate(), 30)  # reads its pipe to the end: wait() alone can hang on a full one


def verified_claims(token: str, issuer_url: str) -> dict[str, Any]:
    """The token's claims, its RS256 signature checked against the server's JWKS."""
    keys = requests.get(f"{issuer_url}/jwks", timeout=10).json()["keys"]
    header = jwt.get_unverified_header(token)
    key = next(k for k in keys if k["kid"] == header["kid"])
    return jwt.decode(token, jwt.PyJWK(key).key, algorithms=["RS256"], options={"verify_aud": False})


async def test_interop_oauth2_mock_server_client_credentials(make_proxy: Any, oauth2_server: str, httpbin: str) -> None:
    """client_credentials against oauth2-mock-server: the upstream receives its RS256 token, scope included."""
    proxy = await make_proxy(
        upstream={"url": httpbin},
        token={
            "grant": "client_credentials", "token_url": f"{oauth2_server}/token", "client_id": "tokenproxy",
            "client_secret": "s3cret-value", "scope": "read write", "refresh_token": "",
        },
    )
    resp = await asyncio.to_thread(requests.get, f"{proxy.url}/bearer", timeout=10)
    assert resp.status_code == 200
    token = resp.json()["token"]
    claims = await asyncio.to_thread(verified_claims, token, oauth2_server)
    assert claims["scope"] == "read write"
    status = proxy.tokens.status()
    assert status.generation == 1 and abs(status.expires_at - claims["exp"]) < 2  # from expires_in


async def test_interop_oauth2_mock_server_refresh_token_rotation(make_proxy: Any, oauth2_server: str, httpbin: str) -> None:
    """refresh_token grant against oauth2-mock-server: each refresh's rotated refresh token is kept and used next."""
    proxy = await make_proxy(
        upstream={"url": httpbin},
        token={
            "grant": "refresh_token", "token_url": f"{oauth2_server}/token", "client_id": "tokenproxy",
            "client_secret": "s3cret-value", "refresh_token": "initial-refresh-token",
            "min_refresh_interval": 0.0,
        },
    )
    first = await asyncio.to_thread(requests.get, f"{proxy.url}/bearer", timeout=10)
    assert first.status_code == 200
    # httpbin never rejects a bearer; its /status/401 stands in for expiry: the proxy
    # refreshes once, resends once, and hands the second 401 over.
    rejected = await asyncio.to_thread(requests.get, f"{proxy.url}/status/401", timeout=10)
    assert rejected.status_code == 401
    assert proxy.tokens.status().generation == 2
    second = await asyncio.to_thread(requests.get, f"{proxy.url}/bearer", timeout=10)
    assert second.status_code == 200
    await asyncio.to_thread(verified_claims, second.json()["token"], oauth2_server)
    saved = saved_entry(Path(proxy.config.token.state_file))
    assert saved["generation"] == 2
    assert saved["refresh_token"] and saved["refresh_token"] != "initial-refresh-token"


async def test_interop_oauth2_mock_server_password(make_proxy: Any, oauth2_server: str, httpbin: str) -> None:
    """password grant against oauth2-mock-server: the upstream receives its RS256 token."""
    proxy = await make_proxy(
        upstream={"url": httpbin},
        token={
            "grant": "password", "token_url": f"{oauth2_server}/token", "client_id": "tokenproxy",
            "client_secret": "s3cret-value", "username": "alice", "password": "alice-password-pw",
        },
    )
    resp = await asyncio.to_thread(requests.get, f"{proxy.url}/bearer", timeout=10)
    assert resp.status_code == 200
    await asyncio.to_thread(verified_claims, resp.json()["token"], oauth2_server)


async def test_interop_oauth2_mock_server_login_fallback_starts_the_refresh_chain(
    make_proxy: Any, oauth2_server: str, httpbin: str
) -> None:
    """refresh_token with login = "password" and no refresh token: one login, then its refresh token is refreshed."""
    proxy = await make_proxy(
        upstream={"url": httpbin},
        token={
            "grant": "refresh_token", "token_url": f"{oauth2_server}/token", "client_id": "tokenproxy",
            "client_secret": "s3cret-value", "refresh_token": "", "login": "password",
            "username": "alice", "password": "alice-password-pw",
        },
    )
    first = await asyncio.to_thread(requests.get, f"{proxy.url}/bearer", timeout=10)
    assert first.status_code == 200
    saved = saved_entry(Path(proxy.config.token.state_file))
    assert saved["refresh_token"]  # the login's answer began the chain
    rejected = await asyncio.to_thread(requests.get, f"{proxy.url}/status/401", timeout=10)
    assert rejected.status_code == 401
    second = await asyncio.to_thread(requests.get, f"{proxy.url}/bearer", timeout=10)
    assert second.status_code == 200
    await asyncio.to_thread(verified_claims, second.json()["token"], oauth2_server)
    after = saved_entry(Path(proxy.config.token.state_file))
    assert after["generation"] == 2 and after["refresh_token"] != saved["refresh_token"]

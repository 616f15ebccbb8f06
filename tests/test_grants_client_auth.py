"""Client authentication by private_key_jwt (RFC 7523) and tls_client_auth (RFC 8705), and mTLS to the upstream."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.fakes.api_server import FakeApi
from tests.fakes.tls import TestCa
from tests.fakes.token_server import CLIENT_ID, FakeTokenServer
from tests.helpers import read_until, run_cli, start_cli


def write_key(path: Path, key: Any) -> Path:
    """Write a private key as unencrypted PKCS#8 PEM (0600) and return its path."""
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return path


def jwt_section(key_file: Path, **keys: Any) -> dict[str, Any]:
    """A client_credentials `token` section authenticating by private_key_jwt."""
    return {"grant": "client_credentials", "client_auth": "private_key_jwt", "client_key_file": str(key_file), **keys}


async def get_status(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """One request through the proxy: its status and its error code (if any)."""
    async with client.get(url) as resp:
        body = await resp.read()
        return resp.status, json.loads(body).get("error", "") if resp.status != 200 else ""


@pytest.mark.parametrize(
    ("make_key", "alg", "expected_alg"),
    [
        (lambda: rsa.generate_private_key(65537, 2048), "", "RS256"),
        (lambda: rsa.generate_private_key(65537, 2048), "PS256", "PS256"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "", "ES256"),
    ],
    ids=["rsa-inferred", "rsa-ps256", "ec-inferred"],
)
async def test_grant_private_key_jwt_fresh_assertion_per_request(
    make_proxy,
    token_server: FakeTokenServer,
    api: FakeApi,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    make_key: Any,
    alg: str,
    expected_alg: str,
) -> None:
    """Each token request carries a newly signed assertion: iss = sub = client, aud the endpoint, new jti, 60 s exp."""
    key = make_key()
    token_server.assertion_key = key.public_key()
    section = jwt_section(write_key(tmp_path / "client.key", key), client_key_id="key-1")
    if alg:
        section["client_assertion_alg"] = alg
    proxy = await make_proxy(token=section)

    for i in range(2):
        api.expire_all(token_server.issued_access)
        assert await get_status(client, f"{proxy.url}/echo/{i}") == (200, "")

    first, second = token_server.assertions
    for claims in (first, second):
        assert claims["header"] == {"alg": expected_alg, "kid": "key-1", "typ": "JWT"}
        assert claims["iss"] == claims["sub"] == CLIENT_ID
        assert claims["aud"] == f"{token_server.base_url}/oauth/token"
        assert claims["exp"] - claims["iat"] == 60
    assert first["jti"] != second["jti"]
    form = token_server.calls[-1].form
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert "client_secret" not in form and "Authorization" not in token_server.calls[-1].headers
    assert all(call.form["client_assertion"] not in caplog.text for call in token_server.calls)


async def test_grant_private_key_jwt_assertion_audience_is_configurable(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """client_assertion_audience (say, the issuer) replaces the token endpoint as the assertion's aud."""
    key = ec.generate_private_key(ec.SECP256R1())
    token_server.assertion_key = key.public_key()
    token_server.assertion_audience = "https://issuer.example.com"
    section = jwt_section(write_key(tmp_path / "k.pem", key), client_assertion_audience="https://issuer.example.com")
    proxy = await make_proxy(token=section)

    assert await get_status(client, f"{proxy.url}/echo/x") == (200, "")
    assert token_server.assertions[0]["aud"] == "https://issuer.example.com"


async def test_grant_private_key_jwt_wrong_audience_gives_token_unavailable(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, tmp_path: Path, caplog
) -> None:
    """An endpoint expecting another aud refuses the client (invalid_client): 503 token_unavailable, logged by code."""
    key = rsa.generate_private_key(65537, 2048)
    token_server.assertion_key = key.public_key()
    token_server.assertion_audience = "https://issuer.example.com"
    proxy = await make_proxy(token=jwt_section(write_key(tmp_path / "k.pem", key)))

    assert await get_status(client, f"{proxy.url}/echo/x") == (503, "token_unavailable")
    assert token_server.assertion_errors == ["InvalidAudienceError"]
    assert "token endpoint refused: invalid_client" in caplog.text


def _small_rsa() -> Any:
    return rsa.generate_private_key(65537, 1024)


@pytest.mark.parametrize(
    ("content", "extra", "line"),
    [
        (None, "", "config: token.client_key_file: no such file, got '{path}'"),
        (b"not a key", "", "config: token.client_key_file: is not a PEM private key, got '{path}'"),
        (
            "rsa",
            'client_assertion_alg = "ES256"\n',
            "config: token.client_key_file: holds an RSA key, which cannot sign ES256 (use RS256 or PS256), got '{path}'",
        ),
        (
            "p384",
            "",
            "config: token.client_key_file: holds a key that signs none of RS256, PS256, ES256 (RSA or EC P-256), "
            "got '{path}'",
        ),
        ("rsa", 'client_assertion_alg = "HS256"\n', "config: token.client_assertion_alg: must be one of RS256, "
         "PS256, ES256, got 'HS256'"),
    ],
    ids=["missing", "not-pem", "rsa-es256", "p384", "hs256"],
)
async def test_cli_check_private_key_jwt_bad_key_exits_2_naming_the_key(
    tmp_path: Path, content: Any, extra: str, line: str
) -> None:
    """A key file that is missing, not a key, or unfit for the algorithm: exit 2, one line naming the key."""
    key_file = tmp_path / "client.key"
    if content == "rsa":
        write_key(key_file, rsa.generate_private_key(65537, 2048))
    elif content == "p384":
        write_key(key_file, ec.generate_private_key(ec.SECP384R1()))
    elif content is not None:
        key_file.write_bytes(content)
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9"\n[token]\ngrant = "client_credentials"\nstate_file = ""\n'
        f'token_url = "http://127.0.0.1:9/token"\nclient_id = "c"\nclient_auth = "private_key_jwt"\n'
        f'client_key_file = "{key_file}"\n{extra}'
    )

    code, out, err = await run_cli("check", "-c", str(path))

    assert (code, out, err) == (2, "", line.format(path=key_file) + "\n")


# --- tls_client_auth and mTLS to the upstream ----------------------------------------------------


@pytest.fixture
def ca(tmp_path: Path) -> TestCa:
    """A test CA, with its files in a directory of their own."""
    directory = tmp_path / "pki"
    directory.mkdir()
    return TestCa(directory)


@pytest.fixture
async def mtls_token_server(aiohttp_server: Any, ca: TestCa) -> AsyncIterator[FakeTokenServer]:
    """The fake token server over TLS, requiring a client certificate; the client is the certificate's name."""
    fake = FakeTokenServer(mtls=True)
    server = await aiohttp_server(fake.app(), host="127.0.0.1", ssl=ca.server_context(require_client=True))
    fake.base_url = str(server.make_url("")).rstrip("/")
    yield fake


async def test_grant_tls_client_auth_presents_certificate_to_token_endpoint(
    make_proxy, mtls_token_server: FakeTokenServer, ca: TestCa, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """tls_client_auth: the certificate goes with the TLS handshake, client_id in the form, no secret anywhere."""
    cert, key = ca.issue(CLIENT_ID, client=True)
    api.signing_key = mtls_token_server.signing_key
    proxy = await make_proxy(
        upstream={"ca_file": str(ca.ca_file)},
        token={
            "grant": "client_credentials",
            "token_url": f"{mtls_token_server.base_url}/oauth/token",
            "client_auth": "tls_client_auth",
            "client_cert_file": str(cert),
            "client_key_file": str(key),
        },
    )

    assert await get_status(client, f"{proxy.url}/echo/x") == (200, "")
    assert mtls_token_server.peer_names == [CLIENT_ID]
    call = mtls_token_server.calls[-1]
    assert call.form["client_id"] == CLIENT_ID and "client_secret" not in call.form
    assert "Authorization" not in call.headers


async def test_grant_without_client_certificate_mtls_endpoint_gives_token_unavailable(
    make_proxy, mtls_token_server: FakeTokenServer, ca: TestCa, client: aiohttp.ClientSession
) -> None:
    """The same endpoint with a client secret but no certificate: the handshake fails, 503 token_unavailable."""
    proxy = await make_proxy(
        upstream={"ca_file": str(ca.ca_file)},
        token={"grant": "client_credentials", "token_url": f"{mtls_token_server.base_url}/oauth/token"},
    )

    assert await get_status(client, f"{proxy.url}/echo/x") == (503, "token_unavailable")
    assert mtls_token_server.calls == []


@pytest.fixture
async def mtls_api(aiohttp_server: Any, ca: TestCa, token_server: FakeTokenServer) -> FakeApi:
    """The fake API over TLS, requiring a client certificate."""
    fake = FakeApi(token_server.signing_key)
    server = await aiohttp_server(fake.app(), host="127.0.0.1", ssl=ca.server_context(require_client=True))
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


async def test_upstream_client_certificate_is_presented_by_both_clients(
    make_proxy, mtls_api: FakeApi, ca: TestCa, client: aiohttp.ClientSession
) -> None:
    """upstream.client_cert_file/client_key_file: an API requiring mTLS is served (fast and session clients)."""
    cert, key = ca.issue("proxy-client", client=True)
    proxy = await make_proxy(
        upstream={
            "url": mtls_api.base_url,
            "ca_file": str(ca.ca_file),
            "client_cert_file": str(cert),
            "client_key_file": str(key),
        }
    )

    assert await get_status(client, f"{proxy.url}/echo/x") == (200, "")
    assert mtls_api.requests == 1


async def test_upstream_without_client_certificate_mtls_api_gives_502(
    make_proxy, mtls_api: FakeApi, ca: TestCa, client: aiohttp.ClientSession
) -> None:
    """Without the client certificate, the API's handshake refuses the proxy: 502, nothing served."""
    proxy = await make_proxy(upstream={"url": mtls_api.base_url, "ca_file": str(ca.ca_file)})

    status, _ = await get_status(client, f"{proxy.url}/echo/x")

    assert status == 502
    assert mtls_api.requests == 0


@pytest.mark.parametrize(
    ("keys", "line"),
    [
        ('client_cert_file = "{cert}"', "config: upstream.client_key_file: is required with upstream.client_cert_file"),
        (
            'client_cert_file = "{cert}"\nclient_key_file = "{other}"',
            "config: upstream.client_cert_file: cannot be used with upstream.client_key_file (KEY_VALUES_MISMATCH), "
            "got '{cert}'",
        ),
        (
            'client_cert_file = "{dir}/nope.crt"\nclient_key_file = "{key}"',
            "config: upstream.client_cert_file: no such file, got '{dir}/nope.crt'",
        ),
    ],
    ids=["key-missing", "mismatch", "no-file"],
)
async def test_cli_check_upstream_client_certificate_problems_exit_2(
    tmp_path: Path, ca: TestCa, keys: str, line: str
) -> None:
    """An upstream client certificate without its key, with another's key, or missing: exit 2 naming the key."""
    cert, key = ca.issue("a", client=True)
    _, other = ca.issue("b", client=True)
    fill = {"cert": cert, "key": key, "other": other, "dir": ca.directory}
    path = tmp_path / "c.toml"
    path.write_text(
        f'[upstream]\nurl = "https://127.0.0.1:9"\n{keys.format(**fill)}\n[token]\ngrant = "static"\n'
        'access_token = "abc"\nstate_file = ""\n'
    )

    code, out, err = await run_cli("check", "-c", str(path))

    assert (code, out, err) == (2, "", line.format(**fill) + "\n")


async def test_cli_run_private_key_jwt_serves_through_the_proxy(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """`tokenproxy run` with private_key_jwt: a request is served; the assertion is never in its output."""
    key = ec.generate_private_key(ec.SECP256R1())
    token_server.assertion_key = key.public_key()
    path = tmp_path / "c.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[upstream]\nurl = "{api.base_url}"\n[token]\n'
        f'grant = "client_credentials"\nstate_file = ""\ntoken_url = "{token_server.base_url}/oauth/token"\n'
        f'client_id = "{CLIENT_ID}"\nclient_auth = "private_key_jwt"\n'
        f'client_key_file = "{write_key(tmp_path / "k.pem", key)}"\n'
    )
    proc = await start_cli("run", "-c", str(path))
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        match = await read_until(proc.stderr, r"listening on (http://127\.0\.0\.1:\d+)", seen)
        async with aiohttp.ClientSession() as session, session.get(f"{match.group(1)}/echo/x") as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, rest = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    assert len(token_server.assertions) == 1
    output = "".join(seen) + out.decode() + rest.decode()
    assert token_server.calls[0].form["client_assertion"] not in output


async def test_cli_check_tls_client_auth_fetches_with_the_certificate(
    tmp_path: Path, mtls_token_server: FakeTokenServer, ca: TestCa, api: FakeApi
) -> None:
    """`tokenproxy check` with tls_client_auth: ok, the token endpoint saw the client's certificate."""
    cert, key = ca.issue(CLIENT_ID, client=True)
    path = tmp_path / "c.toml"
    path.write_text(
        f'[upstream]\nurl = "{api.base_url}"\nca_file = "{ca.ca_file}"\n[token]\n'
        f'grant = "client_credentials"\nstate_file = ""\ntoken_url = "{mtls_token_server.base_url}/oauth/token"\n'
        f'client_id = "{CLIENT_ID}"\nclient_auth = "tls_client_auth"\n'
        f'client_cert_file = "{cert}"\nclient_key_file = "{key}"\n'
    )

    code, out, err = await run_cli("check", "-c", str(path))

    assert (code, err) == (0, "")
    assert out.startswith("ok: grant client_credentials, token ")
    assert mtls_token_server.peer_names == [CLIENT_ID]

"""What tokenproxy tells a person when something fails: the target named, the cause in words, nothing secret."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.core.causes import cause_in_words, safe_url
from proxy.observe.ratelimit import LogLimiter
from tests.fakes.token_server import CLIENT_SECRET, FakeTokenServer
from tests.helpers import TOKENPROXY, run_cli, write_config


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def detail_of(resp: aiohttp.ClientResponse) -> str:
    """The `detail` of one of tokenproxy's own JSON answers."""
    body = json.loads(await resp.read())
    assert body["error"] == resp.headers["X-Tokenproxy-Error"]
    return str(body["detail"])


# --- words for causes ---------------------------------------------------------------------------


def test_safe_url_drops_userinfo_query_and_fragment_keeps_port() -> None:
    """A URL in a message is scheme://host:port/path: no user, password, query or fragment."""
    assert safe_url("https://user:pw@Login.Example.com/oauth/token?client_secret=s#x") == (
        "https://login.example.com:443/oauth/token"
    )
    assert safe_url("http://[::1]:9/t") == "http://[::1]:9/t"


def test_cause_in_words_reads_the_os_error_behind_a_wrapper() -> None:
    """A wrapped OS error is told by what it is, never by the wrapper's class name."""

    class WrapperError(Exception):
        pass

    def wrapped(inner: BaseException) -> BaseException:
        try:
            raise WrapperError("boom") from inner
        except WrapperError as exc:
            return exc

    assert cause_in_words(wrapped(ConnectionRefusedError(111, "Connect call failed"))) == "connection refused"
    assert cause_in_words(wrapped(ConnectionResetError(104, "x"))) == "connection reset"
    assert cause_in_words(wrapped(socket.gaierror(-2, "Name or service not known")), host="nosuch.invalid") == (
        "DNS lookup failed for nosuch.invalid (name or service not known)"
    )
    joined = OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 9), [Errno 111] Connect call failed")
    assert cause_in_words(joined) == "connection refused"
    assert cause_in_words(wrapped(TimeoutError()), timeout=2.5) == "timed out after 2.5 s"
    assert cause_in_words(WrapperError("nothing underneath")) is None


# --- the token endpoint ---------------------------------------------------------------------------


async def test_check_token_endpoint_refused_names_url_and_cause(tmp_path: Path, token_server, api) -> None:
    """`check` against a token URL nobody listens on says which URL and `connection refused`."""
    port = closed_port()
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    path.write_text(
        path.read_text().replace(f"{token_server.base_url}/oauth/token", f"http://127.0.0.1:{port}/oauth/token")
    )
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    assert (code, out) == (1, ""), err
    assert err == f"check: token_unavailable: token endpoint http://127.0.0.1:{port}/oauth/token: connection refused\n"


async def test_token_endpoint_dns_failure_names_the_host(make_proxy: Any, client: aiohttp.ClientSession) -> None:
    """A token URL whose host does not resolve: the 503 says the DNS lookup failed, naming the host."""
    proxy = await make_proxy(token={"token_url": "http://nosuch.invalid/oauth/token"})
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503
        detail = await detail_of(resp)
    assert detail.startswith(
        "token endpoint http://nosuch.invalid:80/oauth/token: DNS lookup failed for nosuch.invalid"
    ), detail
    assert "Client" not in detail


async def test_token_endpoint_timeout_names_seconds_and_key(
    make_proxy: Any, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """A token endpoint that never answers: the 503 says it timed out after token.timeout seconds."""
    token_server.mode = "hang"
    proxy = await make_proxy(token={"timeout": 0.3})
    async with client.get(f"{proxy.url}/echo/x") as resp:
        detail = await detail_of(resp)
    assert detail == f"token endpoint {token_server.base_url}/oauth/token: timed out after 0.3 s (token.timeout)"


async def test_token_endpoint_html_404_named_by_content_type_body_never_echoed(
    make_proxy: Any, aiohttp_server: Any, client: aiohttp.ClientSession
) -> None:
    """A token URL answering 404 with an HTML page: the status and content type are named, the page is not."""

    async def not_found(request: web.Request) -> web.Response:
        return web.Response(status=404, text="<html>no such page: pg-7f3e</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", not_found)
    server = await aiohttp_server(app)
    url = str(server.make_url("/wrong/token")).rstrip("/")
    proxy = await make_proxy(token={"token_url": url})
    async with client.get(f"{proxy.url}/echo/x") as resp:
        detail = await detail_of(resp)
    assert detail.startswith(
        f"{url.replace('http://', 'token endpoint http://')}: answered 404 with an HTML page (text/html), "
        "not an OAuth error"
    ), detail
    assert "pg-7f3e" not in detail


async def test_token_endpoint_500_names_url_and_status(
    make_proxy: Any, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """A token endpoint answering 500: the 503 names the endpoint and the status it answered."""
    token_server.mode = "500"
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/x") as resp:
        detail = await detail_of(resp)
    assert detail == f"token endpoint {token_server.base_url}/oauth/token: answered 500"


# --- the upstream -------------------------------------------------------------------------------


async def test_upstream_refused_502_names_origin_and_cause_no_path_or_query(
    make_proxy: Any, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream nobody listens on: the 502 names its origin (no base path, no query) and `connection refused`."""
    port = closed_port()
    proxy = await make_proxy(upstream={"url": f"http://127.0.0.1:{port}/base"})
    async with client.get(f"{proxy.url}/items?api_key=s3kr1t") as resp:
        assert resp.status == 502
        detail = await detail_of(resp)
    assert detail == f"the upstream http://127.0.0.1:{port} could not be reached: connection refused"
    warnings = [r.getMessage() for r in caplog.records if r.name == "tokenproxy.forward"]
    assert warnings == [detail]
    assert [r.levelno for r in caplog.records if r.name == "tokenproxy.forward"] == [logging.WARNING]
    assert not [r for r in caplog.records if "s3kr1t" in r.getMessage()]


async def test_upstream_failures_logged_once_per_reason_not_a_flood(
    make_proxy: Any, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Twenty refused requests in a row give twenty 502s and one warning line, not twenty."""
    port = closed_port()
    proxy = await make_proxy(upstream={"url": f"http://127.0.0.1:{port}"})
    for _ in range(20):
        async with client.get(f"{proxy.url}/x") as resp:
            assert resp.status == 502
    assert len([r for r in caplog.records if r.name == "tokenproxy.forward"]) == 1


def test_log_limiter_counts_the_lines_left_out_in_the_next_one() -> None:
    """Within the window a reason is written once; after it, the next line says how many were left out."""
    now = [0.0]
    limiter = LogLimiter(window=10.0, clock=lambda: now[0])
    assert limiter.line("refused") == "refused"
    assert [limiter.line("refused") for _ in range(3)] == [None, None, None]
    assert limiter.line("reset") == "reset"  # another reason has its own window
    now[0] = 10.0
    assert limiter.line("refused") == "refused (3 more like it since the last such line)"
    assert limiter.line("refused") is None


async def test_upstream_read_timeout_504_names_seconds_and_key(
    make_proxy: Any, api: Any, client: aiohttp.ClientSession
) -> None:
    """An upstream that does not answer in time: the 504 names its origin, the seconds and the key."""
    proxy = await make_proxy(upstream={"read_timeout": 0.3})
    async with client.get(f"{proxy.url}/hang") as resp:
        assert resp.status == 504
        detail = await detail_of(resp)
    origin = api.base_url
    assert detail == f"the upstream {origin} did not answer: timed out after 0.3 s (upstream.read_timeout)"


async def test_upstream_dns_failure_502_names_the_host(make_proxy: Any, client: aiohttp.ClientSession) -> None:
    """An upstream host that does not resolve: the 502 says the DNS lookup failed, naming the host."""
    proxy = await make_proxy(upstream={"url": "http://nosuch.invalid:8080"})
    async with client.get(f"{proxy.url}/x") as resp:
        assert resp.status == 502
        detail = await detail_of(resp)
    assert detail.startswith(
        "the upstream http://nosuch.invalid:8080 could not be reached: DNS lookup failed for nosuch.invalid ("
    ), detail


# --- the command line ------------------------------------------------------------------------------


async def test_run_listen_address_in_use_names_the_address(tmp_path: Path, token_server, api) -> None:
    """`run` on a port another socket holds: exit 1, `cannot listen on HOST:PORT: address already in use`."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
        path.write_text(path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
        code, _, err = await run_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    assert code == 1, err
    assert err.splitlines()[-1] == f"tokenproxy: cannot listen on 127.0.0.1:{port}: address already in use"


async def test_run_admin_address_in_use_names_the_admin_address(tmp_path: Path, token_server, api) -> None:
    """`run` whose admin port another socket holds: the message names the admin address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = write_config(
            tmp_path / "c.toml", token_server, api, tmp_path / "s.json", server=f'admin_listen = "127.0.0.1:{port}"'
        )
        code, _, err = await run_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    assert code == 1, err
    assert err.splitlines()[-1] == f"tokenproxy: cannot listen on 127.0.0.1:{port}: address already in use"


async def test_run_without_config_file_says_none_was_found_and_where_it_looked(tmp_path: Path) -> None:
    """`run` in a folder without tokenproxy.toml: the first line says no config file was found and where it looked."""
    env = {"TOKENPROXY_CONFIG": ""}
    proc = await asyncio.create_subprocess_exec(
        *TOKENPROXY,
        "run",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = err.decode().splitlines()
    assert (proc.returncode, out) == (2, b"")
    assert lines[0] == (
        "config: no config file found: no -c FILE given, $TOKENPROXY_CONFIG is not set, "
        f"and there is no tokenproxy.toml in {tmp_path}"
    )
    assert "config: upstream.url: is required" in lines[1:]


# --- the request names another host ------------------------------------------------------------------


async def test_client_with_proxy_as_http_proxy_and_base_url_gets_the_likely_cause(
    make_proxy: Any, api: Any, client: aiohttp.ClientSession
) -> None:
    """HTTP_PROXY and the base URL both pointing at the proxy: the 400 says so and how to fix it."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/x", proxy=proxy.url) as resp:
        assert resp.status == 400
        detail = await detail_of(resp)
    assert detail == (
        "the request names the proxy itself as its host (an absolute-form target): the client likely has the proxy "
        "both as its HTTP_PROXY and as its base URL; if the client uses the proxy as HTTP_PROXY, give it the "
        "upstream's URL as its base URL, or point the base URL at the proxy without HTTP_PROXY"
    )
    assert api.requests == 0


async def test_client_with_proxy_as_http_proxy_for_another_host_gets_the_hint(
    make_proxy: Any, api: Any, client: aiohttp.ClientSession
) -> None:
    """The proxy used as HTTP_PROXY for a host other than the upstream: the 400 adds the likely fix."""
    proxy = await make_proxy()
    async with client.get("http://other.example/echo/x?q=1", proxy=proxy.url) as resp:
        assert resp.status == 400
        detail = await detail_of(resp)
    assert detail == (
        "the request names another host than the upstream; tokenproxy forwards only there; if the client uses the "
        "proxy as HTTP_PROXY, give it the upstream's URL as its base URL, or point the base URL at the proxy without "
        "HTTP_PROXY"
    )
    assert api.requests == 0


def self_signed_tls(tmp_path: Path) -> ssl.SSLContext:
    """A server TLS context with a certificate for 127.0.0.1 that no one trusts (self-signed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


async def test_upstream_untrusted_certificate_502_says_so(
    make_proxy: Any, aiohttp_server: Any, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An https upstream whose certificate is not trusted: the 502 says `TLS certificate not trusted`."""
    app = web.Application()
    server = await aiohttp_server(app, ssl=self_signed_tls(tmp_path))
    proxy = await make_proxy(upstream={"url": f"https://127.0.0.1:{server.port}"})
    async with client.get(f"{proxy.url}/x") as resp:
        assert resp.status == 502
        detail = await detail_of(resp)
    assert detail == (
        f"the upstream https://127.0.0.1:{server.port} could not be reached: "
        "TLS certificate not trusted (self-signed certificate)"
    )

"""Safe by default: the token goes to the upstream only, limits hold against hostile clients, secrets stay in their file.

Real HTTP over 127.0.0.1. A `Canary` listener stands for "another host":
requests name it every way a client can, and it must never see a connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from yarl import URL

from proxy.config import exposed_secrets_warning, literal_secrets
from proxy.upstream.model import Upstream
from tests.fakes.api_server import FakeApi
from tests.fakes.canary import Canary
from tests.fakes.counting_upstream import CountingUpstream
from tests.fakes.token_server import CLIENT_SECRET, FakeTokenServer
from tests.helpers import (
    BOTH_LOOPS,
    RAW_BOUND,
    ProxyFactory,
    assert_proxy_error,
    close_raw,
    no_tracebacks,
    open_raw,
    parse_response,
    raw_exchange,
    read_one_answer,
    read_to_eof,
    read_until,
    run_cli,
    start_cli,
    write_config,
)

# --- the token goes to the upstream and nowhere else -----------------------------------------

# (request target, Host header); {canary} is filled in with the canary's host:port.
DESTINATION_CASES = [
    ("/echo/x", "{canary}"),
    ("/echo/x", "evil.example"),
    ("//{canary}/echo", "c"),
    ("//user@{canary}/echo", "{canary}"),
    ("/../echo", "c"),
    ("/echo/../../../etc", "c"),
    ("/%2F..%2Fecho", "c"),
    ("/echo/%2e%2e/%2F%2F{canary}", "c"),
    ("/@{canary}/echo", "c"),
    ("/echo@{canary}", "{canary}"),
    ("/echo?next=http://{canary}/&u=@{canary}", "{canary}"),
]


@pytest.mark.parametrize(("target", "host"), DESTINATION_CASES)
async def test_destination_hostile_target_or_host_reaches_configured_upstream_path_unchanged(
    make_proxy: ProxyFactory, upstream: CountingUpstream, canary: Canary, target: str, host: str
) -> None:
    """A Host naming another host, `//`, `/../`, `%2F..` or `@` in the path: forwarded to the upstream, path exactly as sent."""
    proxy = await make_proxy(upstream={"url": upstream.url})
    target = target.format(canary=canary.authority)
    host = host.format(canary=canary.authority)
    resp = await raw_exchange(
        proxy.url, f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    )
    assert resp.status == 200
    seen = resp.json()
    assert seen["raw_path"] == target
    assert seen["host"] == upstream.authority
    assert upstream.hosts == [upstream.authority]
    assert canary.connections == 0


# --- redirects -------------------------------------------------------------------------------


async def _redirect_location(proxy_url: str, location: str) -> str:
    resp = await raw_exchange(
        proxy_url,
        f"GET /redirect?to={quote(location, safe='')} HTTP/1.1\r\nHost: {URL(proxy_url).raw_authority}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert resp.status == 302
    (value,) = resp.all("Location")
    return value


async def test_redirect_upstream_origin_left_alone_by_default(make_proxy: ProxyFactory, upstream: CountingUpstream) -> None:
    """Without rewrite_redirects, a Location naming the upstream reaches the client as the upstream sent it."""
    proxy = await make_proxy(upstream={"url": upstream.url})
    location = f"{upstream.url}/echo/next?a=1"
    assert await _redirect_location(proxy.url, location) == location


async def test_redirect_rewrite_true_points_upstream_origin_at_proxy(make_proxy: ProxyFactory, upstream: CountingUpstream) -> None:
    """With rewrite_redirects = true, a Location naming the upstream's origin names the proxy instead."""
    proxy = await make_proxy(upstream={"url": upstream.url, "rewrite_redirects": True})
    assert await _redirect_location(proxy.url, f"{upstream.url}/echo/next?a=1#f") == f"{proxy.url}/echo/next?a=1#f"


async def test_redirect_rewrite_true_leaves_other_origins_and_relative_alone(
    make_proxy: ProxyFactory, upstream: CountingUpstream, canary: Canary
) -> None:
    """rewrite_redirects never touches a Location naming another host, or a relative one."""
    proxy = await make_proxy(upstream={"url": upstream.url, "rewrite_redirects": True})
    for location in (f"http://{canary.authority}/x", "https://login.example/authorize?x=1", "/relative/path"):
        assert await _redirect_location(proxy.url, location) == location


async def test_redirect_rewrite_true_maps_base_path(make_proxy: ProxyFactory, upstream: CountingUpstream) -> None:
    """Under a base path, a Location inside it maps back to the client's path, also when it is path-absolute
    (`/api/...`, which the client would otherwise resolve against the proxy and send to `/api/api/...`); one
    outside it is left alone."""
    proxy = await make_proxy(upstream={"url": upstream.url + "/api", "rewrite_redirects": True})
    assert await _redirect_location(proxy.url, f"{upstream.url}/api/v2/item") == f"{proxy.url}/v2/item"
    assert await _redirect_location(proxy.url, "/api/v2/item?a=1") == f"{proxy.url}/v2/item?a=1"
    assert await _redirect_location(proxy.url, f"{upstream.url}/other") == f"{upstream.url}/other"
    assert await _redirect_location(proxy.url, "/other") == "/other"


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("https://api.example.com/v1/x?q=1", "http://127.0.0.1:8080/x?q=1"),
        ("HTTPS://API.EXAMPLE.COM:443/v1", "http://127.0.0.1:8080/"),
        ("https://api.example.com/v1?q", "http://127.0.0.1:8080/?q"),
        ("https://api.example.com/v10/x", None),
        ("https://api.example.com/x", None),
        ("http://api.example.com/v1/x", None),
        ("https://api.example.com:8443/v1/x", None),
        ("https://user@api.example.com/v1/x", None),
        ("https://api.example.com.evil/v1/x", None),
        ("/v1/x?q=1", "http://127.0.0.1:8080/x?q=1"),
        ("/v10/x", None),
        ("/x", None),
        ("//api.example.com/v1/x", None),
    ],
)
def test_redirect_client_location_pure(location: str, expected: str | None) -> None:
    """The rewrite decision: only the upstream's own scheme, host, port and base path are re-pointed."""
    upstream = Upstream.parse("https://api.example.com/v1")
    assert upstream.client_location(location, "http://127.0.0.1:8080") == expected


@pytest.mark.parametrize(
    ("url", "location", "expected"),
    [
        ("https://api.example.com/v1", "https://api.example.com/v1/x", "http://p/api/x"),
        ("https://api.example.com/v1", "/v1/x?q", "http://p/api/x?q"),
        ("https://api.example.com/v1", "/x", None),
        ("https://api.example.com", "/x", "http://p/api/x"),
        ("https://api.example.com", "https://api.example.com/", "http://p/api/"),
        ("https://api.example.com", "//api.example.com/x", None),
    ],
)
def test_redirect_client_location_with_a_stripped_prefix(url: str, location: str, expected: str | None) -> None:
    """With a route's stripped prefix, it is put back in front of the client's path, also for a path-absolute
    Location with no base path (which would otherwise leave the route)."""
    assert Upstream.parse(url).client_location(location, "http://p", "/api") == expected


# --- server limits ---------------------------------------------------------------------------

OVERSIZED = [
    # (config, request bytes, status, code)
    (
        {"max_headers": 10},
        b"GET /echo HTTP/1.1\r\nHost: c\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(20)) + b"\r\n",
        431,
        "headers_too_large",
    ),
    (
        {"max_headers": 10},  # a head that never ends: refused at the header over the limit, not at its end
        b"GET /echo HTTP/1.1\r\nHost: c\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(20)),
        431,
        "headers_too_large",
    ),
    (
        {"max_header_size": 256},
        b"GET /echo HTTP/1.1\r\nHost: c\r\nX-Big: " + b"a" * 1000 + b"\r\n\r\n",
        431,
        "headers_too_large",
    ),
    (
        {"max_request_line": 256},
        b"GET /echo/" + b"a" * 1000 + b" HTTP/1.1\r\nHost: c\r\n\r\n",
        414,
        "target_too_long",
    ),
    (
        {},  # the defaults: 8190 bytes for both, told apart by what the line looks like
        b"GET /echo/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: c\r\n\r\n",
        414,
        "target_too_long",
    ),
    (
        {},
        b"GET /echo HTTP/1.1\r\nHost: c\r\nCookie: " + b"a" * 9000 + b"\r\n\r\n",
        431,
        "headers_too_large",
    ),
]


# The limits are the proxy's own code on the event loop's transports: every limit test runs on
# asyncio's loop and on uvloop (the default, `server.loop`), whose transports differ.
on_both_loops = pytest.mark.asyncio(loop_factories=BOTH_LOOPS)


@on_both_loops
@pytest.mark.parametrize(("server", "request_bytes", "status", "code"), OVERSIZED)
async def test_limits_over_limit_gets_json_error_others_unaffected(
    make_proxy: ProxyFactory,
    upstream: CountingUpstream,
    caplog: pytest.LogCaptureFixture,
    server: dict[str, int],
    request_bytes: bytes,
    status: int,
    code: str,
) -> None:
    """Too many headers, a header or request line too long: 431/414 JSON, not forwarded, no traceback; other clients go on."""
    proxy = await make_proxy(upstream={"url": upstream.url}, server=server)
    other_reader, other_writer = await open_raw(proxy.url)
    try:
        other_writer.write(b"GET /echo/before HTTP/1.1\r\nHost: c\r\n\r\n")
        assert parse_response(await read_one_answer(other_reader)).status == 200

        reader, writer = await open_raw(proxy.url)
        try:
            writer.write(request_bytes)
            resp = parse_response(await read_to_eof(reader))
        finally:
            await close_raw(writer)
        assert_proxy_error(resp.status, resp.all, resp.body, status, code)
        assert b"Traceback" not in resp.body

        other_writer.write(b"GET /echo/after HTTP/1.1\r\nHost: c\r\n\r\n")
        assert parse_response(await read_one_answer(other_reader)).json()["raw_path"] == "/echo/after"
    finally:
        await close_raw(other_writer)
    assert upstream.requests == 2
    no_tracebacks(caplog)


@on_both_loops
async def test_limits_slowloris_headers_cut_after_header_timeout_others_served(
    make_proxy: ProxyFactory, upstream: CountingUpstream
) -> None:
    """A client sending its headers one byte per second gets 408 (or is cut off) while a normal client is served."""
    proxy = await make_proxy(upstream={"url": upstream.url}, server={"header_timeout": 1.0})
    reader, writer = await open_raw(proxy.url)
    answer = asyncio.ensure_future(read_to_eof(reader))
    sent = 0
    try:
        writer.write(b"GET /echo/slow HTTP/1.1\r\n")
        for byte in b"Host: slow.example\r\n"[:6]:  # bounded: a few bytes, one a second
            if answer.done():
                break
            writer.write(bytes([byte]))
            sent += 1
            if sent == 1:
                # Meanwhile a normal client is served at once.
                fast = await raw_exchange(proxy.url, b"GET /echo/fast HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
                assert fast.status == 200
            await asyncio.wait({answer}, timeout=1.0)
        data = await asyncio.wait_for(answer, RAW_BOUND)
    finally:
        await close_raw(writer)
    # The headers were never complete, so only the header time limit can have ended this.
    if data:
        resp = parse_response(data)
        assert_proxy_error(resp.status, resp.all, resp.body, 408, "request_timeout")
    assert upstream.hosts == [upstream.authority]  # only the fast request was forwarded


@on_both_loops
async def test_limits_idle_keepalive_connection_closed_after_timeout(make_proxy: ProxyFactory, upstream: CountingUpstream) -> None:
    """A kept-alive connection that stays idle is closed after server.keepalive_timeout."""
    proxy = await make_proxy(upstream={"url": upstream.url}, server={"keepalive_timeout": 0.5})
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(b"GET /echo HTTP/1.1\r\nHost: c\r\n\r\n")
        assert parse_response(await read_one_answer(reader)).status == 200
        assert await asyncio.wait_for(reader.read(), RAW_BOUND) == b""
    finally:
        await close_raw(writer)


@on_both_loops
async def test_limits_max_connections_new_ones_get_503_existing_keep_working(
    make_proxy: ProxyFactory, upstream: CountingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Beyond server.max_connections a new connection gets 503 JSON and is closed; the open ones keep working."""
    proxy = await make_proxy(upstream={"url": upstream.url}, server={"max_connections": 2})
    held = [await open_raw(proxy.url) for _ in range(2)]
    try:
        for reader, writer in held:
            writer.write(b"GET /echo/held HTTP/1.1\r\nHost: c\r\n\r\n")
            assert parse_response(await read_one_answer(reader)).status == 200

        refused = await raw_exchange(proxy.url, b"GET /echo/third HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
        assert_proxy_error(refused.status, refused.all, refused.body, 503, "too_many_connections")
        assert refused.all("Retry-After") == ["1"]

        for reader, writer in held:
            writer.write(b"GET /echo/again HTTP/1.1\r\nHost: c\r\n\r\n")
            assert parse_response(await read_one_answer(reader)).status == 200
    finally:
        for _, writer in held:
            await close_raw(writer)
    assert upstream.requests == 4  # the refused request never reached the upstream
    # Once the held connections are gone, new ones are served again.
    for attempt in range(50):  # bounded; each attempt is a full exchange with the proxy
        resp = await raw_exchange(proxy.url, b"GET /echo/later HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
        if resp.status == 200:
            break
    assert resp.status == 200
    reached = [r for r in caplog.records if "max_connections" in r.getMessage()]
    assert len(reached) == 1 and reached[0].levelno == logging.WARNING


# --- the config file -------------------------------------------------------------------------


def _config_with_literal_secret(tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, mode: int) -> Path:
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    path.write_text(path.read_text().replace('"${TEST_CLIENT_SECRET}"', json.dumps(CLIENT_SECRET)))
    path.chmod(mode)
    return path


async def test_config_file_readable_by_others_with_literal_secret_check_warns(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """`check` on a 0644 file holding a literal client_secret warns, naming the key and not the value."""
    path = _config_with_literal_secret(tmp_path, token_server, api, 0o644)
    code, out, err = await run_cli("check", "-c", str(path))
    assert code == 0, err
    assert "readable by other users" in err
    assert "token.client_secret" in err and "token.refresh_token" in err
    assert CLIENT_SECRET not in out + err
    assert token_server.current_refresh not in out + err


async def test_config_file_0600_with_literal_secret_check_does_not_warn(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """A 0600 file may hold literal secrets: no warning."""
    path = _config_with_literal_secret(tmp_path, token_server, api, 0o600)
    code, _, err = await run_cli("check", "-c", str(path))
    assert code == 0, err
    assert "readable by other users" not in err


async def test_config_file_0644_with_env_references_only_check_does_not_warn(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """A 0644 file whose secrets are all `${VAR}` references: no warning."""
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    path.write_text(path.read_text().replace(f'"{token_server.current_refresh}"', '"${TEST_REFRESH}"'))
    path.chmod(0o644)
    env = {"TEST_CLIENT_SECRET": CLIENT_SECRET, "TEST_REFRESH": token_server.current_refresh}
    code, _, err = await run_cli("check", "-c", str(path), env=env)
    assert code == 0, err
    assert "readable by other users" not in err


async def test_config_file_readable_by_others_with_literal_secret_run_warns(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """`run` with a 0644 file holding a literal client_secret warns at start, naming the key and not the value."""
    path = _config_with_literal_secret(tmp_path, token_server, api, 0o644)
    proc = await start_cli("run", "-c", str(path))
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, r"readable by other users", seen)
        await read_until(proc.stderr, r"listening on", seen)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 20)
    (warning,) = [line for line in seen if "readable by other users" in line]
    assert "WARNING" in warning and "token.client_secret" in warning
    assert CLIENT_SECRET not in "".join(seen) + rest.decode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"token": {"client_secret": "abc"}}, ["token.client_secret"]),
        ({"token": {"client_secret": "${CS}"}}, []),
        ({"token": {"client_secret": "${CS:-}", "refresh_token": "${RT:-rt-literal}"}}, ["token.refresh_token"]),
        ({"token": {"password": "pre${X}"}}, ["token.password"]),
        ({"server": {"client_token": "0123456789abcdef0"}}, ["server.client_token"]),
        ({"token": {"client_id": "not-a-secret", "access_token": ""}}, []),
    ],
)
def test_config_literal_secrets_pure(raw: dict[str, Any], expected: list[str]) -> None:
    """Which keys count as literal secrets: text left over once `${VAR}` references are taken out."""
    assert literal_secrets(raw) == expected


def test_config_exposed_secrets_warning_pure_mode_decides() -> None:
    """Group- or other-readable with a literal secret warns (naming the key); owner-only does not."""
    raw = {"token": {"client_secret": "s3cr3t-value"}}
    for mode in (0o644, 0o640, 0o604):
        warning = exposed_secrets_warning("c.toml", mode, raw)
        assert warning is not None and "token.client_secret" in warning and "s3cr3t-value" not in warning
    assert exposed_secrets_warning("c.toml", 0o600, raw) is None
    assert exposed_secrets_warning("c.toml", 0o644, {"token": {"client_secret": "${CS}"}}) is None

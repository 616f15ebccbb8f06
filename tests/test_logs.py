"""What the logs tell a person: access durations, refresh lines with structured fields, debug lines."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.core.renewal import Renewal
from proxy.core.token import fingerprint, make_token
from proxy.observe.log import JsonFormatter
from proxy.tokens.explain import renewal_reason
from tests.fakes.token_server import CLIENT_SECRET, FakeClock
from tests.helpers import read_until, start_cli, write_config


async def test_logs_run_access_durations_have_tenths_of_a_millisecond(tmp_path: Path, token_server, api) -> None:
    """`tokenproxy run` (uvloop, whose clock ticks in whole milliseconds) logs durations to 0.1 ms, as the demo does."""
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json", server='loop = "uvloop"')
    proc = await start_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        match = await read_until(proc.stderr, r"listening on http://127\.0\.0\.1:(\d+).*uvloop loop", seen)
        url = f"http://127.0.0.1:{match.group(1)}"
        async with aiohttp.ClientSession() as session:
            for i in range(20):
                async with session.get(f"{url}/echo/{i}") as resp:
                    assert resp.status == 200
        durations = [
            (await read_until(proc.stderr, rf'"GET /echo/{i}" 200 (\d+\.\d)ms resent=no gen=1', seen)).group(1)
            for i in range(20)
        ]
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
    # Whole milliseconds all twenty times would mean the clock read has millisecond resolution.
    assert any(not d.endswith(".0") for d in durations), durations
    assert all(re.fullmatch(r"\d+\.\d", d) for d in durations)


def json_lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[dict[str, Any]]:
    """The records of `logger`, as `log.format = "json"` writes them."""
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == logger]


# The keys of every refresh line's JSON object (README, Logs).
REFRESH_KEYS = {
    "grant", "result", "fingerprint", "generation", "expires_in", "duration_ms", "rotated", "reason", "failures",
    "retry_in",
}


async def test_logs_json_refresh_ok_line_has_structured_fields(tmp_path: Path, token_server, api) -> None:
    """`tokenproxy run` with JSON logs: the `refresh ok` line carries grant, result, fingerprint, generation,
    expires_in and duration_ms as keys, and the token only as its fingerprint."""
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json", extra='[log]\nformat = "json"\n')
    proc = await start_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        match = await read_until(proc.stderr, r"listening on http://127\.0\.0\.1:(\d+)", seen)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{match.group(1)}/echo/x") as resp:
                assert resp.status == 200
        await read_until(proc.stderr, r'"message": "refresh ok ', seen)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
    [line] = [json.loads(text) for text in seen if '"refresh ok ' in text]
    assert line["level"] == "info" and line["logger"] == "tokenproxy.tokens"
    [token] = token_server.issued_access
    assert {k: line[k] for k in ("grant", "result", "fingerprint", "generation", "rotated")} == {
        "grant": "refresh_token",
        "result": "ok",
        "fingerprint": fingerprint(token),
        "generation": 1,
        "rotated": True,
    }
    assert token_server.lifetime is not None and 0 < line["expires_in"] <= token_server.lifetime
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    # Every refresh line has the same keys: a failure's are there, null.
    assert set(line) >= REFRESH_KEYS
    assert (line["reason"], line["failures"], line["retry_in"]) == (None, None, None)
    assert re.fullmatch(
        rf"refresh ok grant=refresh_token token={fingerprint(token)} generation=1 expires_in=\d+s rotated=yes "
        r"duration=\d+\.\dms",
        line["message"],
    )
    assert token not in "".join(seen)


async def test_logs_json_refresh_failed_line_has_structured_fields(
    make_proxy, token_server, client, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed refresh's warning carries grant, result (the error code), reason, failures, retry_in and
    duration_ms as JSON keys; fingerprint and generation are null (no token came of it)."""
    token_server.mode = "500"
    proxy = await make_proxy(token={"backoff_initial": 5.0, "backoff_max": 60.0})
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503
    [line] = [r for r in json_lines(caplog, "tokenproxy.tokens") if r["message"].startswith("refresh failed")]
    assert line["level"] == "warning"
    assert {k: line[k] for k in ("grant", "result", "fingerprint", "generation", "expires_in", "failures")} == {
        "grant": "refresh_token",
        "result": "token_unavailable",
        "fingerprint": None,
        "generation": None,
        "expires_in": None,
        "failures": 1,
    }
    assert line["retry_in"] == 5.0 and line["rotated"] is False
    assert line["reason"] and line["reason"] in line["message"]
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert set(line) >= REFRESH_KEYS


def debug_lines(caplog: pytest.LogCaptureFixture, *prefixes: str) -> list[str]:
    """The messages of tokenproxy's DEBUG records that start with one of `prefixes`, in order."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("tokenproxy") and r.levelno == logging.DEBUG and r.getMessage().startswith(prefixes)
    ]


async def wait_for_line(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    """Poll the captured records, for at most 10 s, until a DEBUG line starting with `prefix` is there."""
    for _ in range(1000):
        if lines := debug_lines(caplog, prefix):
            return lines
        await asyncio.sleep(0.01)
    raise AssertionError(f"no debug line starting with {prefix!r} within 10 s")


async def test_logs_debug_first_token_rejection_and_resend(make_proxy, token_server, api, client, caplog) -> None:
    """At debug: why each refresh starts (no token yet; the upstream rejected one, with its error) and the
    resend, naming tokens by fingerprint and generation only."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/a") as resp:
        assert resp.status == 200
    api.expire_all(token_server.issued_access)
    async with client.get(f"{proxy.url}/echo/b?q=secret") as resp:
        assert resp.status == 200
    first, second = (fingerprint(t) for t in token_server.issued_access)
    assert debug_lines(caplog, "refresh starts", "the upstream rejected", "resending", "not resending") == [
        "refresh starts grant=refresh_token: no token yet",
        f"the upstream rejected token {first} generation 1 (error=invalid_token): refreshing",
        f"refresh starts grant=refresh_token: the upstream rejected token {first} generation 1",
        f"resending GET /echo/b (route default) with token {second} generation 2 after 401 to generation 1",
    ]


async def test_logs_debug_refresh_ahead_says_when_the_token_expires(make_proxy, token_server, client, caplog) -> None:
    """At debug: a refresh-ahead says which token expires in how many seconds, and the setting that started it."""
    clock = FakeClock()
    proxy = await make_proxy(clock=clock)
    async with client.get(f"{proxy.url}/echo/a") as resp:
        assert resp.status == 200
    [token] = token_server.issued_access
    clock.advance(token_server.lifetime - 20)
    async with client.get(f"{proxy.url}/echo/b") as resp:
        assert resp.status == 200
    for _ in range(1000):  # at most 10 s: the refresh-ahead ends before the proxy stops
        if proxy.tokens.status().generation == 2:
            break
        await asyncio.sleep(0.01)
    assert debug_lines(caplog, "refresh starts") == [
        "refresh starts grant=refresh_token: no token yet",
        f"refresh starts grant=refresh_token: token {fingerprint(token)} generation 1 expires in 20s "
        "(token.refresh_before 30s)",
    ]


async def test_logs_debug_challenge_not_refreshed_is_passed_on(make_proxy, token_server, client, caplog) -> None:
    """At debug: a challenge a new token would not answer says so, and that the 401 is passed on unresent."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/challenge/insufficient_scope?x=1") as resp:
        assert resp.status == 401
    [token] = token_server.issued_access
    assert debug_lines(caplog, "the upstream rejected", "resending", "not resending") == [
        f"the upstream rejected token {fingerprint(token)} generation 1 (error=insufficient_scope): not refreshing: "
        "a new token would not answer this challenge; the answer is passed on",
        "not resending GET /challenge/insufficient_scope (route default): no new token to resend with; "
        "the 401 is passed on",
    ]


async def test_logs_debug_back_off_says_why_no_refresh(make_proxy, token_server, client, caplog) -> None:
    """At debug: a request refused while backing off says for how long, after how many failures, and why."""
    token_server.mode = "500"
    proxy = await make_proxy(clock=FakeClock(), token={"backoff_initial": 5.0, "backoff_max": 60.0})
    for path in ("a", "b"):
        async with client.get(f"{proxy.url}/echo/{path}") as resp:
            assert resp.status == 503
    assert token_server.count == 1
    assert debug_lines(caplog, "refresh starts", "no refresh") == [
        "refresh starts grant=refresh_token: no token yet",
        f"no refresh: backing off for 5.0s after 1 failed refreshes (token endpoint {token_server.base_url}/oauth/token: answered 500)",
    ]


@pytest.mark.parametrize("upstream_client", ["fast"])
async def test_logs_debug_pool_events_name_the_upstream_and_why(make_proxy, api, client, caplog) -> None:
    """At debug (fast client): a new upstream connection is logged with the pool's use (a kept-alive one is not
    logged again), a dropped one with why."""
    proxy = await make_proxy(upstream={"read_timeout": 0.5})
    where = api.base_url.removeprefix("http://")
    async with client.get(f"{proxy.url}/echo/a") as resp:
        assert resp.status == 200
    async with client.get(f"{proxy.url}/echo/b") as resp:  # the same connection, kept alive: no new line
        assert resp.status == 200
    async with client.get(f"{proxy.url}/hang") as resp:
        assert resp.status == 504
    closed = await wait_for_line(caplog, f"upstream connection to {where} closed")
    assert debug_lines(caplog, "upstream connection to") == [
        f"upstream connection to {where} opened (1 of 100 in use)",
        f"upstream connection to {where} closed: the upstream {api.base_url} did not answer: timed out after 0.5 s"
        " (upstream.read_timeout)",
    ]
    assert len(closed) == 1


def test_logs_renewal_reason_already_renewed_and_too_young() -> None:
    """The words for the two other answers to a refresh status: already renewed, and a token too young to replace."""
    seen = make_token("seen-token-value", 2000.0, 1000.0, 3, 30.0, 1.0)
    current = make_token("current-token-value", 2100.0, 1100.0, 4, 30.0, 1.0)
    used = renewal_reason(Renewal.USE_CURRENT, seen, current, "invalid_token", 5.0)
    assert used == (
        f"the upstream rejected token {seen.fingerprint} generation 3 (error=invalid_token): "
        f"already renewed: generation 4 ({current.fingerprint}) is used instead"
    )
    young = renewal_reason(Renewal.GIVE_UP, seen, seen, None, 5.0)
    assert young == (
        f"the upstream rejected token {seen.fingerprint} generation 3 (no error given): "
        "not refreshing: the token is younger than token.min_refresh_interval (5s); the answer is passed on"
    )


async def _send_raw(url: str, request: bytes) -> bytes:
    """Send one request on a connection of its own and read the answer to the close."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


ABSOLUTE_WITH_USERINFO = (
    b"GET http://user:PASSWD-1@%s/echo/ui?token=QUERY-SECRET HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
)


async def test_logs_run_absolute_target_access_line_without_userinfo_or_query(
    tmp_path: Path, token_server, api
) -> None:
    """`tokenproxy run` (lines written by the access writer thread): an absolute-form target's
    `user:password@` and query string are not in its access line; scheme, host and path are."""
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    proc = await start_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    seen: list[str] = []
    authority = api.base_url.removeprefix("http://").encode()
    try:
        assert proc.stderr is not None
        match = await read_until(proc.stderr, r"listening on http://127\.0\.0\.1:(\d+)", seen)
        answer = await _send_raw(f"http://127.0.0.1:{match.group(1)}", ABSOLUTE_WITH_USERINFO % (authority, authority))
        assert answer.startswith(b"HTTP/1.1 ")
        line = (await read_until(proc.stderr, r"tokenproxy\.access: .*", seen)).group(0)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 20)
    assert f'"GET http://{authority.decode()}/echo/ui" ' in line
    everything = "".join(seen) + rest.decode()
    assert "PASSWD-1" not in everything and "QUERY-SECRET" not in everything and "user:" not in everything


async def test_logs_absolute_target_access_line_without_userinfo_in_process(
    make_proxy, api, caplog: pytest.LogCaptureFixture
) -> None:
    """The same without the writer thread (the line written where the request ends), and for a host no one
    serves (400 naming another host)."""
    caplog.set_level(logging.INFO, logger="tokenproxy.access")
    proxy = await make_proxy()
    for authority in (api.base_url.removeprefix("http://").encode(), b"elsewhere.test"):
        answer = await _send_raw(proxy.url, ABSOLUTE_WITH_USERINFO % (authority, authority))
        assert answer.startswith(b"HTTP/1.1 ")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(lines := [r.getMessage() for r in caplog.records if r.name == "tokenproxy.access"]) < 2:
        assert loop.time() < deadline, lines
        await asyncio.sleep(0.02)
    assert [line.split('" ')[0] for line in lines] == [
        f'"GET http://{api.base_url.removeprefix("http://")}/echo/ui',
        '"GET http://elsewhere.test/echo/ui',
    ]
    assert not any("PASSWD-1" in line or "QUERY-SECRET" in line for line in lines)

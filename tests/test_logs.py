"""What the logs tell a person: access durations, refresh lines with structured fields, debug lines."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.core.token import fingerprint
from proxy.observe.log import JsonFormatter
from tests.fakes.token_server import CLIENT_SECRET
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

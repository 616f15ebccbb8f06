"""What the logs tell a person: access durations, refresh lines with structured fields, debug lines."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import aiohttp

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

"""`tokenproxy demo` as a person sees it: what it prints, with and without a burst, and how it stops."""

from __future__ import annotations

import asyncio
import re
import signal

import pytest

from tests.helpers import read_until, run_cli, start_cli

HEADER = [
    "tokenproxy demo",
    r"  token server  http://127\.0\.0\.1:\d+/oauth/token  \(tokens live 2s, refresh tokens rotate\)",
    r"  demo API      http://127\.0\.0\.1:\d+/  \(answers 401 without a valid token\)",
    r"  proxy         http://127\.0\.0\.1:\d+/",
    "",
]


@pytest.mark.timeout(60)
async def test_demo_burst_piped_prints_no_try_block_and_no_redraws() -> None:
    """`demo --burst` into a pipe: no `Try:` block, no "Press Ctrl-C", no `\\r` redraws; one line per stage."""
    code, out, err = await run_cli("demo", "--burst", "20", "--lifetime", "2", timeout=50)
    assert code == 0, out + err
    assert err == ""
    assert "\r" not in out
    expected = [
        *HEADER,
        r"waiting 2\.\ds for the token to expire",
        r"waiting for the token to expire \[#{30}\] expired",
        r"burst                        \[#{30}\] 20/20",
        r"requests 20  ok 20  failed 0  refreshes 1  p50 \d+\.\dms  p99 \d+\.\dms",
        "PASS: every request succeeded with one refresh",
    ]
    lines = out.splitlines()
    assert len(lines) == len(expected), out
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)


@pytest.mark.timeout(60)
async def test_demo_try_block_comments_are_aligned() -> None:
    """Without a burst, the `Try:` block's comments start in one column, and Ctrl-C then stops the demo with 0."""
    proc = await start_cli("demo", "--lifetime", "2")
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        await read_until(proc.stdout, r"^Press Ctrl-C to stop\.$", seen)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    block = seen[seen.index("Try:\n") + 1 : seen.index("Try:\n") + 4]
    assert [line.split("#")[0].rstrip().split()[0] for line in block] == ["curl", "curl", "sleep"]
    assert len({line.index("#") for line in block}) == 1, block
    assert [line.split("# ")[1].rstrip("\n") for line in block] == [
        "straight to the API: 401",
        "through the proxy: 200",
        "after expiry: still 200",
    ]


@pytest.mark.timeout(60)
async def test_demo_burst_ctrl_c_during_countdown_exits_130_quietly() -> None:
    """Ctrl-C while `demo --burst` waits for the token to expire: exit status 130, nothing on stderr (no "Aborted!")."""
    proc = await start_cli("demo", "--burst", "5", "--lifetime", "30")
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        await read_until(proc.stdout, r"^waiting 30\.\ds for the token to expire$", seen)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 130
    assert err.decode() == ""
    assert out.decode() == ""  # nothing after the countdown's first line: no summary, no PASS or FAIL

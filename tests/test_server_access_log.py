"""The access log is written off the request path: a log reader that stalls does not stall the proxy."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from tests.fakes.token_server import CLIENT_SECRET
from tests.helpers import read_until, start_cli, write_config

# More access lines than the stderr pipe and the reading side's buffer hold together (about 200 KB).
REQUESTS = 3000
CLIENTS = 8


async def test_server_access_log_unread_stderr_requests_still_answered_and_no_line_lost(
    tmp_path: Path, token_server, api
) -> None:
    """With nobody reading its stderr, `tokenproxy run` answers 3000 requests; once read, every access line is there."""
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    proc = await start_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        match = await read_until(proc.stderr, r"listening on http://127\.0\.0\.1:(\d+)", seen)
        url = f"http://127.0.0.1:{match.group(1)}"
        # From here nobody reads stderr until every request is answered.
        statuses: list[int] = []
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def client(first: int) -> None:
                for i in range(first, REQUESTS, CLIENTS):
                    async with session.get(f"{url}/echo/{i}") as resp:
                        await resp.read()
                        statuses.append(resp.status)

            await asyncio.gather(*(client(n) for n in range(CLIENTS)))
        assert statuses == [200] * REQUESTS
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
    lines = "".join(seen).splitlines() + rest.decode().splitlines()
    logged = {line.split('"GET /echo/', 1)[1].split('"', 1)[0] for line in lines if "tokenproxy.access:" in line}
    assert logged == {str(i) for i in range(REQUESTS)}
    assert proc.returncode == 0

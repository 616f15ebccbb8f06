"""The access log is written off the request path: a log reader that stalls does not stall the proxy."""

from __future__ import annotations

import asyncio
import signal
import sys
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


_FORKING = """
import logging, os, sys
from proxy.observe import log
log.setup_logging("info", "text")
handler = logging.getLogger().handlers[0]
handler.lock.acquire()  # the parent's writer cannot write the first line before the fork
log.access_line("GET", "/parent", 200, 0.001, False, 1)
pid = os.fork()
if pid == 0:  # the child's copy of the lock is a new, free one
    log.access_line("GET", "/child", 200, 0.001, False, 1)
    sys.exit(0)
handler.lock.release()
os.waitpid(pid, 0)
"""


async def test_server_access_log_forked_worker_writes_its_own_lines_once() -> None:
    """A forked process (a worker) writes its own access lines, and not again the lines its parent had queued."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FORKING, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = err.decode().splitlines()
    assert sum('"GET /parent"' in line for line in lines) == 1, lines
    assert sum('"GET /child"' in line for line in lines) == 1, lines
    assert proc.returncode == 0

"""`tokenproxy demo`: a demo token server, a demo API and the proxy, all on 127.0.0.1.

Owns: the wiring that starts the proxy in front of the demo's two servers
(`proxy.demo`: a token endpoint issuing short-lived JWTs and rotating refresh
tokens, an API that answers 401 once a token has expired), and the burst that
shows one refresh serving many requests. Needs no config and no network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from ..config import parse_config
from ..demo.api import DemoApi
from ..demo.token_server import TokenServer
from ..runtime.app import build_app
from ..runtime.serve import make_runner

logger = logging.getLogger("tokenproxy.demo")

DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret"


async def _start(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]


def try_block(api_port: int, proxy_port: int, lifetime: float) -> str:
    """The `Try:` lines: three commands, their comments in one column."""
    lines = [
        (f"curl -i http://127.0.0.1:{api_port}/hello", "straight to the API: 401"),
        (f"curl -i http://127.0.0.1:{proxy_port}/hello", "through the proxy: 200"),
        (f"sleep {lifetime + 1:g}; curl http://127.0.0.1:{proxy_port}/hello", "after expiry: still 200"),
    ]
    width = max(len(command) for command, _ in lines)
    return "".join(f"  {command:<{width}}   # {comment}\n" for command, comment in lines)


async def run_demo(listen: str, lifetime: float, state_dir: Path | None, *, burst: int = 0) -> int:
    """Start the three servers and print what to try; run until Ctrl-C, or fire a burst. The exit status.

    Without a burst: 0 when stopped by Ctrl-C or SIGTERM. With `burst` > 0:
    wait for the demo token to expire, send that many concurrent requests
    through the proxy, print a summary; 0 only if all succeeded with exactly
    one refresh, else 1; stopped by a signal first, 128 + its number (130 for Ctrl-C).
    """
    loop = asyncio.get_running_loop()
    stopped_by: list[int] = []
    stop = asyncio.Event()

    def on_signal(sig: int) -> None:
        stopped_by.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        passed = await _serve_demo(listen, lifetime, state_dir, burst, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if burst > 0 and stopped_by:
        return 128 + stopped_by[0]
    return 0 if passed else 1


async def _serve_demo(listen: str, lifetime: float, state_dir: Path | None, burst: int, stop: asyncio.Event) -> bool:
    """The servers, up until `stop` is set or the burst is over; True unless the burst failed."""
    ok = True
    signing_key = secrets.token_hex(32)
    auth = TokenServer(
        signing_key=signing_key,
        lifetime=lifetime,
        jwt_lifetime=lifetime,  # `exp` and expires_in agree exactly, so the API's view of expiry is the proxy's
        grants=frozenset({"refresh_token"}),
    )
    api = DemoApi(signing_key)
    runners: list[web.AppRunner] = []
    with tempfile.TemporaryDirectory(prefix="tokenproxy-demo-") as tmp:
        directory = state_dir or Path(tmp)
        try:
            auth_runner, auth_port = await _start(auth.app())
            runners.append(auth_runner)
            api_runner, api_port = await _start(api.app())
            runners.append(api_runner)
            host, _, port = listen.rpartition(":")
            config = parse_config(
                {
                    "server": {"listen": listen},
                    "upstream": {"url": f"http://127.0.0.1:{api_port}"},
                    "token": {
                        "grant": "refresh_token",
                        "token_url": f"http://127.0.0.1:{auth_port}/oauth/token",
                        "client_id": DEMO_CLIENT_ID,
                        "client_secret": DEMO_CLIENT_SECRET,
                        "refresh_token": auth.current_refresh,
                        "state_file": str(directory / "state.json"),
                        "refresh_before": 2.0,
                        "min_refresh_interval": 1.0,
                    },
                },
                {},
            )
            proxy_runner = make_runner(build_app(config), config)
            await proxy_runner.setup()
            runners.append(proxy_runner)
            site = web.TCPSite(proxy_runner, host.strip("[]") or "127.0.0.1", int(port or 0))
            await site.start()
            proxy_port = proxy_runner.addresses[0][1]
            print(
                f"tokenproxy demo\n"
                f"  token server  http://127.0.0.1:{auth_port}/oauth/token  (tokens live {lifetime:g}s, "
                f"refresh tokens rotate)\n"
                f"  demo API      http://127.0.0.1:{api_port}/  (answers 401 without a valid token)\n"
                f"  proxy         http://127.0.0.1:{proxy_port}/\n",
                flush=True,
            )
            if burst > 0:
                ok = await _until_stopped(run_burst(f"http://127.0.0.1:{proxy_port}", auth, burst, lifetime), stop)
            else:
                print(
                    f"Try:\n{try_block(api_port, proxy_port, lifetime)}\n"
                    f"PROXY_URL=http://127.0.0.1:{proxy_port}\n"
                    f"Press Ctrl-C to stop.",
                    flush=True,
                )
                await stop.wait()
            logger.info("demo stopping; token server saw %d calls", auth.count)
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
    return ok


async def _until_stopped(work: Coroutine[Any, Any, bool], stop: asyncio.Event) -> bool:
    """Run `work` to its end, or cancel it when `stop` is set first (then False)."""
    task = asyncio.create_task(work)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopper):
            pending.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)
    if task.cancelled():
        if sys.stdout.isatty():
            print(flush=True)  # end the progress line that was being drawn
        return False
    return task.result()


def progress(label: str, done: float, total: float, suffix: str = "", width: int = 30) -> None:
    """Draw (or redraw) a one-line progress bar on standard output; not a terminal: only the finished bar."""
    if done < total and not sys.stdout.isatty():
        return
    filled = int(width * min(1.0, done / total)) if total else width
    end = "\n" if done >= total else ""
    start = "\r" if sys.stdout.isatty() else ""
    print(f"{start}{label:<28} [{'#' * filled}{'.' * (width - filled)}] {suffix}", end=end, flush=True)


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


async def run_burst(proxy_url: str, auth: TokenServer, count: int, lifetime: float) -> bool:
    """Get a token, wait until it has expired, then send `count` requests at once; report and judge."""
    connector = aiohttp.TCPConnector(limit=count)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{proxy_url}/burst/warm-up") as resp:
            warm = await resp.json()
            if resp.status != 200:
                print(f"warm-up request failed: {resp.status}")
                return False
        expires_in = float(warm["token_expires_in"]) + 0.2
        if not sys.stdout.isatty():
            print(f"waiting {expires_in:.1f}s for the token to expire", flush=True)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < expires_in:
            progress("waiting for the token to expire", elapsed, expires_in, f"{expires_in - elapsed:4.1f}s")
            await asyncio.sleep(min(0.1, expires_in - elapsed))
        progress("waiting for the token to expire", expires_in, expires_in, "expired")

        calls_before = auth.count
        latencies: list[float] = []
        statuses: list[int] = []

        async def one(index: int) -> None:
            began = time.perf_counter()
            try:
                async with session.post(f"{proxy_url}/burst/{index}", data=f"request {index}".encode()) as resp:
                    body = await resp.read()
                    ok = resp.status == 200 and json.loads(body)["body_bytes"] == len(f"request {index}")
                    statuses.append(resp.status if ok else -resp.status)
            except aiohttp.ClientError:
                statuses.append(0)
            latencies.append(time.perf_counter() - began)
            progress("burst", len(statuses), count, f"{len(statuses)}/{count}")

        await asyncio.gather(*(one(i) for i in range(count)))
    refreshes = auth.count - calls_before
    succeeded = sum(1 for status in statuses if status == 200)
    print(
        f"requests {count}  ok {succeeded}  failed {count - succeeded}  refreshes {refreshes}  "
        f"p50 {percentile(latencies, 0.5) * 1000:.1f}ms  p99 {percentile(latencies, 0.99) * 1000:.1f}ms"
    )
    passed = succeeded == count and refreshes == 1
    print("PASS: every request succeeded with one refresh" if passed else "FAIL")
    return passed

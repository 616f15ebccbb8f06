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
import tempfile
import time
from pathlib import Path

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


async def run_demo(listen: str, lifetime: float, state_dir: Path | None, *, burst: int = 0) -> bool:
    """Start the three servers and print what to try; run until Ctrl-C, or fire a burst.

    With `burst` > 0: wait for the demo token to expire, send that many
    concurrent requests through the proxy, print a summary, and return True
    only if all succeeded with exactly one refresh.
    """
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
                f"  proxy         http://127.0.0.1:{proxy_port}/\n\n"
                f"Try:\n"
                f"  curl -i http://127.0.0.1:{api_port}/hello        # straight to the API: 401\n"
                f"  curl -i http://127.0.0.1:{proxy_port}/hello      # through the proxy: 200\n"
                f"  sleep {lifetime + 1:g}; curl http://127.0.0.1:{proxy_port}/hello   "
                f"# after expiry: still 200\n\n"
                f"PROXY_URL=http://127.0.0.1:{proxy_port}\n"
                f"Press Ctrl-C to stop.",
                flush=True,
            )
            if burst > 0:
                ok = await run_burst(f"http://127.0.0.1:{proxy_port}", auth, burst, lifetime)
            else:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                await stop.wait()
            logger.info("demo stopping; token server saw %d calls", auth.count)
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
    return ok


def progress(label: str, done: float, total: float, suffix: str = "", width: int = 30) -> None:
    """Draw (or redraw) a one-line progress bar on standard output."""
    filled = int(width * min(1.0, done / total)) if total else width
    end = "\n" if done >= total else ""
    print(f"\r{label:<28} [{'#' * filled}{'.' * (width - filled)}] {suffix}", end=end, flush=True)


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

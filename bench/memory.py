"""Scenario 6 of issue 6: the proxy's resident memory, idle and after many requests.

For each proxy, on a fresh process: RSS idle (after start and one
request); with `idle_connections` keep-alive connections open and idle
(each has had one request); after `memory_small` requests (wrk, 64
connections); after `memory_large` requests in all. The last run stops at
`memory_cap_s` even short of the count (the count reached is reported),
and is skipped when the throughput of the same run says it could not
finish in time. For nginx the master's and the worker's RSS are summed.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any
from urllib.parse import urlsplit

from .clients import close_all, one_request_each, open_connections
from .contenders import Running
from .procs import rss_kib
from .runner import Context, warm
from .wrk import run_wrk

CONNECTIONS = 64


def memory(ctx: Context) -> dict[str, Any]:
    """RSS at each stage for every proxy (direct has none)."""
    out: dict[str, Any] = {}
    for contender in ctx.usable():
        if not contender.proxy:
            continue
        with ctx.running(contender) as running:
            ctx.say(f"memory {contender.name}")
            out[contender.name] = _stages(ctx, running)
    return out


def _mib(running: Running) -> float:
    return rss_kib(running.pids()) / 1024


def _stages(ctx: Context, running: Running) -> dict[str, Any]:
    s = ctx.settings
    row: dict[str, Any] = {}
    warm(running.url + "/tiny", 1)
    row["idle_mib"] = _mib(running)
    parts = urlsplit(running.url)
    row["idle_connections"] = s.idle_connections
    row["with_idle_connections_mib"], row["idle_connections_ok"] = asyncio.run(
        _hold_idle(running, parts.hostname or "", parts.port or 80, s.idle_connections)
    )
    done = _load(ctx, running, s.memory_small, s.memory_cap_s)
    row["small_requests"] = done
    row["after_small_mib"] = _mib(running)
    done_before = ctx.results.get("scenarios", {}).get("throughput", {})
    rps = done_before.get("tiny", {}).get(running.contender.name, {}).get("rps")
    remaining = s.memory_large - done
    if rps and remaining / rps > s.memory_cap_s * 1.5:
        row["large_skipped"] = f"{remaining} more requests at {rps:.0f} req/s would take {remaining / rps / 60:.0f} min"
        return row
    done += _load(ctx, running, remaining, s.memory_cap_s)
    row["large_requests"] = done
    row["after_large_mib"] = _mib(running)
    row["growth_pct"] = (row["after_large_mib"] - row["after_small_mib"]) / row["after_small_mib"] * 100
    return row


async def _hold_idle(running: Running, host: str, port: int, count: int) -> tuple[float, int]:
    conns = await open_connections(host, port, count)
    try:
        ok = await one_request_each(conns, host, port, "/tiny", 60.0)
        await asyncio.sleep(0.5)  # let the proxy settle with the connections idle
        return _mib(running), ok
    finally:
        await close_all(conns)


def _load(ctx: Context, running: Running, requests: int, cap_s: int) -> int:
    """About `requests` answered requests of wrk load, stopping at `cap_s`; how many there were.

    wrk stops counting at the limit but sleeps out its duration, so the
    duration is sized from the rate of a first one-second run.
    """
    done, rate = 0, 0.0
    deadline = time.monotonic() + cap_s
    for _ in range(20):
        left, time_left = requests - done, int(deadline - time.monotonic())
        if left <= 0 or time_left < 1:
            break
        seconds = min(time_left, math.ceil(left / rate * 1.1) + 1 if rate else 1)
        result = run_wrk(ctx.stage.tools.wrk, ctx.script, running.url + "/tiny", CONNECTIONS, seconds, limit=left)
        done += result.requests
        if result.requests < left:  # not stopped by the limit: its rate is the real one
            rate = result.rps
    return done

"""Scenario 5 of issue 6: a refresh storm, for the contenders that obtain tokens.

N connections are opened first; then one request goes out on each at the
same instant, after the token stopped being good, while the token server
takes 100 ms per answer. Two ways the token stops being good:

- `rejected`: the upstream's `/storm` route answers 401 invalid_token to
  the first token (`old-1`), so every request sees the upstream reject it
  and the reactive path (renew, single refresh, resend) is measured;
- `expired`: the first token lives 1.5 s; the storm starts after that, so
  every request finds no usable token and waits for the one refresh.

For reference, the plain aiohttp proxy gets the same storms with nothing
to refresh (`reference`, to `/tiny`): the cost of N concurrent requests alone.

Reported: token-endpoint calls during the storm (must be 1), failures
(answers other than 200, must be 0), time until the last answer and the
p99 of the answer times, each the median of `repeats` storms, with a fresh
proxy each time and `queue.max_waiting` equal to N.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from .clients import close_all, one_request_each, open_connections, storm
from .contenders import Contender, Running
from .runner import Context

FIRST_LIFETIME = 1.5  # seconds the first token lives in the `expired` storm
ANSWER_TIMEOUT = 60.0


def refresh_storm(ctx: Context) -> dict[str, Any]:
    """Every storm size, both modes, for each contender that refreshes tokens."""
    out: dict[str, Any] = {}
    for contender in ctx.usable():
        modes = ("rejected", "expired") if contender.refreshes else ("reference",)
        if not contender.refreshes and contender.name != "baseline":
            continue
        rows: dict[str, Any] = {}
        for mode in modes:
            for size in ctx.settings.storm_sizes:
                ctx.say(f"storm {contender.name} {mode} x{size}")
                runs = [_one(ctx, contender, mode, size) for _ in range(ctx.settings.repeats)]
                rows[f"{mode}/{size}"] = _summary(mode, size, runs)
        out[contender.name] = rows
    return out


def _one(ctx: Context, contender: Contender, mode: str, size: int) -> dict[str, Any]:
    ctx.stage.reset_tokens(first_lifetime=FIRST_LIFETIME if mode == "expired" else 3600.0)
    with ctx.running(contender, max_waiting=size, max_client_connections=size + 64) as running:
        return asyncio.run(_storm(ctx, running, mode, size))


async def _storm(ctx: Context, running: Running, mode: str, size: int) -> dict[str, Any]:
    parts = urlsplit(running.url)
    host, port = parts.hostname or "", parts.port or 80
    conns = await open_connections(host, port, size)
    try:
        # The first token (old-1) is fetched by one request on a connection of its own.
        warmup = await open_connections(host, port, 1)
        got = await one_request_each(warmup, host, port, "/tiny", ANSWER_TIMEOUT)
        await close_all(warmup)
        if got != 1:
            raise RuntimeError(f"{running.contender.name}: the warm-up request failed")
        if mode == "expired":
            await asyncio.sleep(FIRST_LIFETIME + 0.1)
        calls_before = await asyncio.to_thread(ctx.stage.token_calls)
        path = "/tiny" if mode == "reference" else "/storm"
        answers = await storm(conns, host, port, path, ANSWER_TIMEOUT)
        calls = await asyncio.to_thread(ctx.stage.token_calls) - calls_before
    finally:
        await close_all(conns)
    times = sorted(answer.seconds for answer in answers)
    return {
        "token_calls": calls,
        "failures": sum(1 for answer in answers if answer.status != 200),
        "statuses": _count(answer.status for answer in answers),
        "last_answer_s": times[-1],
        "p50_s": times[len(times) // 2],
        "p99_s": times[min(len(times) - 1, int(len(times) * 0.99))],
    }


def _count(statuses: Iterable[int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in statuses:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return counts


def _summary(mode: str, size: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "mode": mode,
        "requests": size,
        "token_calls": max(run["token_calls"] for run in runs),
        "failures": max(run["failures"] for run in runs),
        "last_answer_s": statistics.median(run["last_answer_s"] for run in runs),
        "p99_s": statistics.median(run["p99_s"] for run in runs),
        "runs": runs,
    }

"""Scenarios 1-3 of issue 6, all driven by wrk: throughput, latency, scaling.

- throughput: 64 connections, tiny and 16 KiB bodies: requests/s and CPU per request;
- latency: 1 connection, tiny body: p50/p90/p99 and what each proxy adds over direct (the
  contenders measured in turns);
- scaling: requests/s and p99 at each connection count (1 and 64 are taken
  from the latency and throughput runs of the same run when those ran).
"""

from __future__ import annotations

import contextlib
from typing import Any

from .contenders import Running
from .runner import Context, measure, one_run, summarise, warm_up
from .wrk import WrkResult

BODIES = {"tiny": "/tiny", "16k": "/16k"}
THROUGHPUT_CONNECTIONS = 64


def throughput(ctx: Context) -> dict[str, Any]:
    """Requests/s at 64 connections for each body size."""
    out: dict[str, dict[str, Any]] = {body: {} for body in BODIES}
    for contender in ctx.usable():
        with ctx.running(contender) as running:
            for body, path in BODIES.items():
                ctx.say(f"throughput {contender.name} {body} x{THROUGHPUT_CONNECTIONS}")
                out[body][contender.name] = measure_dict(ctx, running, path, THROUGHPUT_CONNECTIONS)
    return out


def latency(ctx: Context) -> dict[str, Any]:
    """Percentiles at one connection, and the latency added over `direct` (same run).

    The contenders run side by side and are measured in turns, one wrk run
    each per round: the machine's drift over the minutes of this stage (the
    load generator straight to nginx moves by 10 µs and more) then reaches
    them all alike instead of landing in the few tens of µs a proxy adds.
    """
    with contextlib.ExitStack() as stack:
        started = [(contender, stack.enter_context(ctx.running(contender))) for contender in ctx.usable()]
        for contender, running in started:
            ctx.say(f"latency {contender.name} x1: warm-up")
            warm_up(ctx, running, "/tiny", 1)
        runs: dict[str, list[tuple[WrkResult, float | None]]] = {contender.name: [] for contender, _ in started}
        for turn in range(ctx.settings.repeats):
            for contender, running in started:
                ctx.say(f"latency {contender.name} x1: run {turn + 1}")
                runs[contender.name].append(one_run(ctx, running, "/tiny", 1))
    out = {name: summarise(done).as_dict() for name, done in runs.items()}
    direct = out.get("direct")
    if direct is not None:
        for row in out.values():
            for q in ("p50", "p90", "p99"):
                row[f"added_{q}_us"] = row[f"{q}_us"] - direct[f"{q}_us"]
    return out


def scaling(ctx: Context) -> dict[str, Any]:
    """Requests/s and p99 at each connection count of the settings."""
    out: dict[str, dict[str, Any]] = {}
    done = ctx.results.get("scenarios", {})
    earlier = {1: done.get("latency", {}), THROUGHPUT_CONNECTIONS: done.get("throughput", {}).get("tiny", {})}
    for contender in ctx.usable():
        rows: dict[str, Any] = {}
        with ctx.running(contender) as running:
            for level in ctx.settings.levels:
                reused = earlier.get(level, {}).get(contender.name)
                if reused is not None:
                    rows[str(level)] = {**_slim(reused), "from": "latency" if level == 1 else "throughput"}
                    continue
                ctx.say(f"scaling {contender.name} x{level}")
                rows[str(level)] = _slim(measure_dict(ctx, running, "/tiny", level))
        out[contender.name] = rows
    return out


def measure_dict(ctx: Context, running: Running, path: str, connections: int) -> dict[str, Any]:
    """`runner.measure` as a JSON-ready dict."""
    return measure(ctx, running, path, connections).as_dict()


def _slim(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("rps", "p50_us", "p99_us", "errors", "timeouts", "non_2xx", "socket_errors", "cpu_us_per_request")
    return {key: row[key] for key in keep if key in row}

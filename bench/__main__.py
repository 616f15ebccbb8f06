"""`python -m bench [--quick] [--out DIR] [--only S,..] [--contenders C,..] [--no-install]`.

Sets up what the bench needs, runs the scenarios of issue 6 against every
contender, and writes latest.md, latest.json and latest.png into the
output folder (bench/results by default). Exit status: 0 when every
scenario ran, 1 when one failed (the others are still reported), 3 when
wrk or nginx is missing and cannot be installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import https_proxy, load, memory, plot, report, storm, streaming
from .contenders import BY_NAME, CONTENDERS, Stage
from .runner import Context, Settings
from .tools import BENCH_DIR, ToolMissing, ensure_tools, machine, versions

SCENARIOS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "throughput": load.throughput,
    "latency": load.latency,
    "scaling": load.scaling,
    "streaming": streaming.streaming,
    "storm": storm.refresh_storm,
    "memory": memory.memory,
    "https_proxy": https_proxy.https_proxy,
}

NOTES = [
    "Upstream: one nginx (1 worker) serving fixed files; the upload sink reads the whole body "
    "(proxy_request_buffering into tmpfs) before answering 200. Every proxy runs one process "
    "(nginx: 1 worker), except tokenproxy-w2 and tokenproxy-wN (server.workers 2 and one per CPU; "
    "their CPU/req counts the parent and every worker, log.level info). "
    "Load generator: wrk, 1 thread for 1 connection, else 2.",
    "tokenproxy runs as `python -m proxy run -c <generated toml>` with log.level = warning and "
    "log.access_log = false, upstream.max_connections at its default, server.max_connections raised to "
    "2048 (storm: N + 64) where it exists; the plain aiohttp proxy uses aiohttp's default pool (100). "
    "nginx: keepalive 128 to the upstream, proxy_buffering and proxy_request_buffering off, "
    "proxy_buffer_size 64k. mitmdump: reverse mode, stream_large_bodies=1m.",
    "The floor (bench/floor_proxy.py) is not a product: httptools on raw asyncio protocols (uvloop), one "
    "kept-alive upstream connection per client, the head rebuilt with the token, the answer relayed as it "
    "comes; no refresh, limits, timeouts, errors or logs. It shows what a Python proxy costs at least; the "
    "targets of issue 18 are ratios to it.",
    "The load average above counts everything on the machine: other work running at the same time "
    "lowers every figure, the ratios less so.",
]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="about a second per scenario, tiny counts")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="where latest.* go")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios, comma-separated")
    parser.add_argument(
        "--contenders",
        default=",".join(c.name for c in CONTENDERS if c.default),
        help="comma-separated; also: " + ", ".join(c.name for c in CONTENDERS if not c.default),
    )
    parser.add_argument("--no-install", action="store_true", help="use what is installed, install nothing")
    parser.add_argument("--seconds", type=int, help="length of each measured wrk run (exploring; the table uses 10)")
    parser.add_argument("--repeats", type=int, help="runs per median (exploring; the table uses 3)")
    parser.add_argument("--levels", help="scaling connection counts, comma-separated (exploring)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other scenarios of the latest.json in --out and replace only those run now",
    )
    args = parser.parse_args(argv)
    for name in args.only.split(","):
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    for name in args.contenders.split(","):
        if name not in BY_NAME:
            parser.error(f"unknown contender {name!r}; known: {', '.join(BY_NAME)}")
    return args


def _write(results: dict[str, Any], out: Path, plotting: bool, plotting_missing: str) -> list[Path]:
    """latest.json, latest.md and latest.png, each written to a .tmp file and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    png = out / "latest.png"
    why_not = plotting_missing if not plotting else plot.draw(results, out / "latest.png.tmp")
    if why_not:
        results["meta"]["notes"].append(f"No latest.png: {why_not}.")
    else:
        os.replace(out / "latest.png.tmp", png)
    written = [png] if not why_not else []
    for name, text in (("latest.json", None), ("latest.md", report.markdown(results))):
        tmp = out / f"{name}.tmp"
        if text is None:
            report.write_json(results, tmp)
        else:
            tmp.write_text(text)
        os.replace(tmp, out / name)
        written.append(out / name)
    return written


def _merge_into_previous(results: dict[str, Any], previous_path: Path) -> bool:
    """Put this run's scenarios into the previous results, in place; False when there are none to match.

    Only results of the same mode on the same machine are merged into.
    """
    try:
        previous = json.loads(previous_path.read_text())
    except (OSError, ValueError):
        return False
    now = results["meta"]
    if previous["meta"]["quick"] != now["quick"] or previous["meta"]["machine"] != now["machine"]:
        now["notes"].append(f"Not merged with {previous_path}: another machine or mode.")
        return False
    redone = sorted(results["scenarios"])
    merged = {**previous["scenarios"], **results["scenarios"]}
    previous["meta"]["notes"].append(
        f"Re-measured at {now['started']} with tokenproxy {now['versions']['tokenproxy']}: {', '.join(redone)}; "
        "the ratios of each scenario come from the run that measured it."
    )
    previous["scenarios"] = merged
    previous["errors"] = {
        **{k: v for k, v in previous.get("errors", {}).items() if k not in redone},
        **results["errors"],
    }
    previous["skipped"] = {**previous.get("skipped", {}), **results.get("skipped", {})}
    results.clear()
    results.update(previous)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the bench; the exit status."""
    args = _parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so everything is stopped by PID
    settings = Settings.quick_run() if args.quick else Settings.full()
    if args.seconds is not None:
        settings = dataclasses.replace(settings, seconds=args.seconds)
    if args.repeats is not None:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    if args.levels:
        settings = dataclasses.replace(settings, levels=tuple(int(n) for n in args.levels.split(",")))
    started = time.time()
    try:
        tools = ensure_tools(install=not args.no_install)
    except ToolMissing as missing:
        print(f"bench: {missing}", file=sys.stderr)
        return 3
    chosen = [BY_NAME[name] for name in args.contenders.split(",")]
    results: dict[str, Any] = {
        "meta": {
            "quick": settings.quick,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "machine": machine(),
            "versions": versions(tools),
            "settings": settings.__dict__,
            "contenders": [{"name": c.name, "label": c.label} for c in chosen],
            "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "notes": list(NOTES),
        },
        "scenarios": {},
        "errors": {},
    }
    with Stage(tools, settings.stream_size) as stage:
        ctx = Context(stage, settings, chosen, results)
        for name in args.only.split(","):
            ctx.say(f"scenario {name}")
            try:
                results["scenarios"][name] = SCENARIOS[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one failed scenario must not lose the others
                traceback.print_exc()
                results["errors"][name] = f"{type(exc).__name__}: {exc}"
    if not (args.merge and _merge_into_previous(results, args.out / "latest.json")):
        results["meta"]["duration_s"] = time.time() - started
        results["meta"]["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["ratios"] = report.ratios(results)
    for path in _write(results, args.out, tools.plotting, tools.plotting_missing):
        print(f"bench: wrote {path}", file=sys.stderr)
    print(report.markdown(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""What every scenario shares: the settings of a run, the context, and a measured wrk run.

Owns: `Settings` (full or quick), `Context` (stage, settings, the
contenders chosen, results so far, progress output), the warm-up, and
`measure`, which gives the median of repeated wrk runs together with the
proxy's CPU time per request.
"""

from __future__ import annotations

import http.client
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .contenders import Contender, Running, Stage
from .procs import cpu_seconds
from .wrk import WrkResult, run_wrk, write_script

GIB = 1024 * 1024 * 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """How long and how big: the full run of issue 6, or `--quick` (about a second a scenario)."""

    quick: bool
    seconds: int  # each measured run
    warmup: int  # seconds of load before the measured runs (0: a few requests only)
    repeats: int  # the median of this many runs is reported
    levels: tuple[int, ...]  # connection counts of the scaling scenario
    stream_size: int
    storm_sizes: tuple[int, ...]
    idle_connections: int
    memory_small: int
    memory_large: int
    memory_cap_s: int  # the long memory run stops here even short of memory_large

    @classmethod
    def full(cls) -> Settings:
        """The run the issue asks for: 10 s after a warm-up, median of 3."""
        return cls(False, 10, 2, 3, (1, 16, 64, 256, 1024), GIB, (1000, 5000, 10000), 1000, 10_000, 1_000_000, 600)

    @classmethod
    def quick_run(cls) -> Settings:
        """Every scenario for about a second, tiny counts: proves the bench works, not how fast."""
        return cls(True, 1, 0, 1, (1, 16, 64, 256, 1024), MIB, (200,), 200, 200, 600, 10)


@dataclass
class Context:
    """A run in progress: where, how, who, and what was measured so far."""

    stage: Stage
    settings: Settings
    contenders: list[Contender]
    results: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.script = write_script(self.stage.run_dir)

    def say(self, message: str) -> None:
        """Progress on stderr (stdout stays free for the final summary)."""
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    @contextmanager
    def running(self, contender: Contender, **options: Any) -> Iterator[Running]:
        """Start a contender for the length of a `with` block; stopped by PID at its end."""
        proc = self.stage.start(contender, **options)
        try:
            yield proc
        finally:
            proc.close()

    def usable(self) -> Iterator[Contender]:
        """The chosen contenders that can run here; the others are noted once in the results."""
        skipped = self.results.setdefault("skipped", {})
        for contender in self.contenders:
            reason = self.stage.available(contender)
            if reason:
                skipped[contender.name] = reason
                continue
            yield contender


def warm(url: str, count: int = 20) -> None:
    """A few requests on one keep-alive connection: token fetched, pools opened."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        for _ in range(count):
            conn.request("GET", parts.path)
            conn.getresponse().read()
    finally:
        conn.close()


@dataclass(frozen=True)
class Measured:
    """The median of repeated runs at one load, plus each run."""

    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    errors: int  # the worst run's; so are the next three
    timeouts: int
    non_2xx: int
    socket_errors: int
    cpu_us_per_request: float | None  # the proxy's user+system CPU per answered request
    runs: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def measure(ctx: Context, running: Running, path: str, connections: int) -> Measured:
    """Warm up, then `repeats` wrk runs of `seconds` at `connections`; medians of each figure."""
    warm_up(ctx, running, path, connections)
    return summarise([one_run(ctx, running, path, connections) for _ in range(ctx.settings.repeats)])


def warm_up(ctx: Context, running: Running, path: str, connections: int) -> None:
    """A few requests (token fetched, pools opened), then the settings' warm-up run of wrk."""
    url = running.url + path
    warm(url)
    if ctx.settings.warmup:
        run_wrk(ctx.stage.tools.wrk, ctx.script, url, connections, ctx.settings.warmup)


def one_run(ctx: Context, running: Running, path: str, connections: int) -> tuple[WrkResult, float | None]:
    """One measured wrk run of `seconds`, and the proxy's CPU per answered request during it."""
    pids = running.pids()
    cpu_before = cpu_seconds(pids) if pids else 0.0
    result = run_wrk(ctx.stage.tools.wrk, ctx.script, running.url + path, connections, ctx.settings.seconds)
    cpu = (cpu_seconds(pids) - cpu_before) / result.requests * 1e6 if pids and result.requests else None
    return result, cpu


def summarise(runs: list[tuple[WrkResult, float | None]]) -> Measured:
    """The median of each figure over `runs` (the worst run's error counts)."""
    cpus = [cpu for _, cpu in runs if cpu is not None]
    return Measured(
        rps=statistics.median(r.rps for r, _ in runs),
        p50_us=statistics.median(r.p50_us for r, _ in runs),
        p90_us=statistics.median(r.p90_us for r, _ in runs),
        p99_us=statistics.median(r.p99_us for r, _ in runs),
        errors=max(r.errors for r, _ in runs),
        timeouts=max(r.timeouts for r, _ in runs),
        non_2xx=max(r.non_2xx for r, _ in runs),
        socket_errors=max(r.socket_errors for r, _ in runs),
        cpu_us_per_request=statistics.median(cpus) if cpus else None,
        runs=[{**asdict(r), "cpu_us_per_request": cpu} for r, cpu in runs],
    )

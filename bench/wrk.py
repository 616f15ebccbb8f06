"""Running wrk and reading its results.

Owns: the Lua script that makes wrk print one JSON line (requests, errors,
latency percentiles in microseconds) and optionally stop each thread after
a number of responses, and `run_wrk`, which is bounded in time.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

_MARK = "WRKJSON "
_LUA = r"""
local limit = tonumber(os.getenv("BENCH_WRK_LIMIT") or "0")
local seen = 0
if limit > 0 then
  function response(status, headers, body)
    seen = seen + 1
    if seen >= limit then wrk.thread:stop() end
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}\n',
    "WRKJSON ", summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run. Latencies in microseconds; errors are wrk's (non-2xx/3xx answers count as `status`)."""

    requests: int
    duration_s: float
    rps: float
    errors: int  # all of the three below
    timeouts: int
    non_2xx: int  # answers that were not 2xx or 3xx
    socket_errors: int  # connect, read and write errors
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    mean_us: float


def write_script(folder: Path) -> Path:
    """Write the Lua script into `folder` and return its path."""
    path = folder / "bench-report.lua"
    path.write_text(_LUA)
    return path


def run_wrk(
    wrk: str,
    script: Path,
    url: str,
    connections: int,
    seconds: int,
    *,
    limit: int = 0,
    timeout_s: int = 2,
) -> WrkResult:
    """Load `url` with `connections` keep-alive connections for `seconds` (or until `limit` answers).

    wrk's own request timeout (`timeout_s`) counts a request that took
    longer as a timeout. Raises RuntimeError when wrk fails or prints no result.
    """
    threads = 1 if connections < 2 else 2
    env = {**os.environ, "BENCH_WRK_LIMIT": str(max(1, limit // threads) if limit else 0)}
    args = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, seconds)}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(_MARK):
            data = json.loads(line[len(_MARK) :])
            break
    else:
        raise RuntimeError(f"wrk printed no result (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    duration = data["duration_us"] / 1e6
    errors = data["connect"] + data["read"] + data["write"] + data["status"] + data["timeout"]
    return WrkResult(
        requests=data["requests"],
        duration_s=duration,
        rps=data["requests"] / duration if duration > 0 else 0.0,
        errors=errors,
        timeouts=data["timeout"],
        non_2xx=data["status"],
        socket_errors=data["connect"] + data["read"] + data["write"],
        p50_us=data["p50"],
        p90_us=data["p90"],
        p99_us=data["p99"],
        max_us=data["max"],
        mean_us=data["mean"],
    )

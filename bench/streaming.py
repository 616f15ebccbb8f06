"""Scenario 4 of issue 6: one large download and one large upload through each contender.

MB/s (10^6 bytes per second, from the request to the complete answer) and
the proxy's peak RSS and its growth over the RSS before the transfer. The
peak is VmHWM after resetting it (clear_refs), or the largest VmRSS seen by
a 20 ms poll where the kernel refuses the reset, whichever is larger.
"""

from __future__ import annotations

import http.client
import statistics
from typing import Any

from .clients import Transfer, download, upload
from .contenders import Running
from .procs import RssSampler, peak_rss_kib, reset_peak, rss_kib
from .runner import Context, warm

SOCKET_TIMEOUT = 120.0  # seconds one send or receive may block


def streaming(ctx: Context) -> dict[str, Any]:
    """Download and upload `stream_size` bytes through every contender."""
    out: dict[str, Any] = {"download": {}, "upload": {}, "bytes": ctx.settings.stream_size}
    for contender in ctx.usable():
        with ctx.running(contender) as running:
            warm(running.url + "/tiny")
            for direction in ("download", "upload"):
                ctx.say(f"streaming {contender.name} {direction} {ctx.settings.stream_size >> 20} MiB")
                runs = [_one(ctx, running, direction) for _ in range(ctx.settings.repeats)]
                out[direction][contender.name] = _summary(runs)
    return out


def _one(ctx: Context, running: Running, direction: str) -> dict[str, Any]:
    size = ctx.settings.stream_size
    pids = running.pids()
    before = rss_kib(pids)
    hwm_reset = reset_peak(pids) if pids else False
    error = ""
    with RssSampler(pids) as sampler:
        try:
            if direction == "download":
                transfer = download(running.url + "/large", SOCKET_TIMEOUT)
            else:
                transfer = upload(running.url + "/upload", size, SOCKET_TIMEOUT)
        except (OSError, http.client.HTTPException) as exc:
            transfer, error = Transfer(0, 0.0, 0), f"{type(exc).__name__}: {exc}"
    peak = max(sampler.max_kib, peak_rss_kib(pids) if hwm_reset else 0)
    ok = transfer.status == 200 and transfer.nbytes == size
    return {
        "ok": ok,
        "status": transfer.status,
        "bytes": transfer.nbytes,
        "seconds": transfer.seconds,
        "mb_s": transfer.mb_per_s,
        "rss_before_mib": before / 1024 if pids else None,
        "peak_rss_mib": peak / 1024 if pids else None,
        "rss_growth_mib": (peak - before) / 1024 if pids else None,
        "peak_from": "VmHWM" if hwm_reset else "VmRSS poll",
        "error": error,
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [run for run in runs if run["ok"]]
    growth = [run["rss_growth_mib"] for run in runs if run["rss_growth_mib"] is not None]
    peaks = [run["peak_rss_mib"] for run in runs if run["peak_rss_mib"] is not None]
    return {
        "mb_s": statistics.median(run["mb_s"] for run in good) if good else None,
        "failures": len(runs) - len(good),
        "peak_rss_mib": max(peaks) if peaks else None,
        "rss_growth_mib": max(growth) if growth else None,
        "runs": runs,
    }

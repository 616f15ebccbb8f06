"""The benchmark harness (bench/) runs end to end in its quick form, so it never rots.

It asserts that every scenario produced numbers for every contender that
could run, not how big they are: speed is the bench's report, not a test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PROXIES = ("nginx", "mitmdump", "floor", "baseline", "tokenproxy-static", "tokenproxy-cc")
CONTENDERS = ("direct", *PROXIES)


def _skip_without_tools() -> None:
    """Skip when wrk, nginx or hey is missing and the bench could not install it (it needs root and apt-get)."""
    missing = [
        t for t in ("wrk", "nginx", "hey") if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin")
    ]
    if missing and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip(f"{' and '.join(missing)} not installed, and installing needs root with apt-get")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _assert_numbers(row: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        assert _is_number(row.get(key)), f"{where}: {key} is {row.get(key)!r}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One `python -m bench --quick` run, shared by the tests of this module."""
    _skip_without_tools()
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    if done.returncode == 3:
        pytest.skip(f"the bench's tools are missing: {done.stderr.strip()[-500:]}")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-4000:]}"
    return json.loads((out / "latest.json").read_text()), out


@pytest.mark.timeout(300)
def test_quick_bench_measures_every_scenario(quick_run: tuple[dict[str, Any], Path]) -> None:
    """Every scenario has numbers for every contender that ran; only mitmdump may be skipped, with a reason."""
    results, _ = quick_run
    assert results["errors"] == {}
    skipped = results.get("skipped", {})
    assert set(skipped) <= {"mitmdump"} and all(skipped.values())
    ran = [name for name in CONTENDERS if name not in skipped]
    proxies = [name for name in ran if name != "direct"]
    scen = results["scenarios"]
    for body in ("tiny", "16k"):
        for name in ran:
            _assert_numbers(scen["throughput"][body][name], ("rps", "p50_us", "p99_us"), f"throughput {body} {name}")
        for name in proxies:
            _assert_numbers(scen["throughput"][body][name], ("cpu_us_per_request",), f"throughput {body} {name}")
    for name in ran:
        _assert_numbers(scen["latency"][name], ("p50_us", "p90_us", "p99_us", "added_p50_us"), f"latency {name}")
        levels = scen["scaling"][name]
        assert sorted(int(level) for level in levels) == [1, 16, 64, 256, 1024]
        for level, row in levels.items():
            _assert_numbers(row, ("rps", "p99_us"), f"scaling {name} x{level}")
        for direction in ("download", "upload"):
            _assert_numbers(scen["streaming"][direction][name], ("mb_s",), f"streaming {direction} {name}")
    for name in proxies:
        for direction in ("download", "upload"):
            _assert_numbers(scen["streaming"][direction][name], ("peak_rss_mib",), f"{direction} {name}")
        _assert_numbers(
            scen["memory"][name],
            ("idle_mib", "with_idle_connections_mib", "after_small_mib", "after_large_mib"),
            f"memory {name}",
        )
    storms = scen["storm"]["tokenproxy-cc"]
    assert {row["mode"] for row in storms.values()} == {"rejected", "expired"}
    for key, row in [*storms.items(), *scen["storm"]["baseline"].items()]:
        _assert_numbers(row, ("token_calls", "failures", "last_answer_s", "p99_s"), f"storm {key}")


@pytest.mark.timeout(300)
def test_quick_bench_writes_the_report(quick_run: tuple[dict[str, Any], Path]) -> None:
    """latest.md names the machine, the versions, the ratios and each scenario; latest.png exists or says why not."""
    results, out = quick_run
    text = (out / "latest.md").read_text()
    for heading in ("Ratios", "Throughput", "Latency", "Scaling", "Streaming", "Refresh storm", "Memory", "HTTPS_PROXY"):
        assert heading in text
    assert results["meta"]["machine"]["cores"] >= 1
    assert {"python", "aiohttp", "nginx", "wrk", "mitmproxy"} <= set(results["meta"]["versions"])
    _assert_numbers(
        results["ratios"]["tokenproxy-static"],
        ("rps_vs_floor_tiny", "rps_vs_floor_16k", "cpu_vs_floor", "added_p50_vs_floor", "rps_vs_nginx_tiny"),
        "ratios",
    )
    png = out / "latest.png"
    assert png.exists() or any("No latest.png" in note for note in results["meta"]["notes"])


@pytest.mark.timeout(300)
def test_quick_bench_measures_the_https_proxy_mode(quick_run: tuple[dict[str, Any], Path]) -> None:
    """Through intercepted tunnels every request was answered 200 by the https upstream (which answers 401
    without the bearer), at each connection count, one after another on one tunnel, and on new tunnels; the
    figures and the ratios to mitmdump are there."""
    results, out = quick_run
    skipped = results.get("skipped", {})
    ran = [name for name in ("direct", "mitmdump", "tokenproxy-static", "tokenproxy-cc") if name not in skipped]
    https = results["scenarios"]["https_proxy"]
    assert https["levels"] == [1, 16, 64]
    for name in ran:
        for level, row in https["throughput"][name].items():
            where = f"https_proxy {name} x{level}"
            _assert_numbers(row, ("rps", "p50_us", "load_tool_cpu_us_per_request"), where)
            assert row["rps"] > 0 and row["non_2xx"] == 0 and row["errors"] == 0, f"{where}: {row}"
        latency, tunnels = https["latency"][name], https["new_tunnel"][name]
        _assert_numbers(latency, ("p50_us", "p99_us", "added_p50_us"), f"https_proxy latency {name}")
        _assert_numbers(tunnels, ("median_ms", "p99_ms", "added_median_ms"), f"https_proxy new tunnels {name}")
        assert latency["failures"] == 0 and latency["requests"] > 0, latency
        assert tunnels["failures"] == 0 and tunnels["tunnels"] > 0, tunnels
        if name != "direct":
            _assert_numbers(https["throughput"][name]["64"], ("cpu_us_per_request",), f"https_proxy {name}")
            _assert_numbers(tunnels, ("cpu_ms_per_tunnel",), f"https_proxy new tunnels {name}")
    if "mitmdump" in ran:
        _assert_numbers(
            results["ratios"]["tokenproxy-static"],
            ("https_rps_vs_mitmdump_x1", "https_rps_vs_mitmdump_x64", "https_added_p50_vs_mitmdump"),
            "https ratios",
        )
        assert "req/s vs mitmdump's" in (out / "latest.md").read_text()


def test_instructions_drives_both_paths_and_prints_the_ratio() -> None:
    """`python -m bench.instructions --timeit` runs tokenproxy's request path and the floor's in-process (no
    nginx, no valgrind needed) and prints a figure for each and the ratio."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--timeit"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("GET /tiny, Python path only, commit ")
    figures = {line.split()[0]: float(line.split()[1].replace(",", "")) for line in lines[1:3]}
    assert set(figures) == {"tokenproxy", "floor"}
    assert all(value > 0 for value in figures.values())
    assert lines[3].strip().startswith("tokenproxy / floor: ")
    assert "Traceback" not in done.stderr and "ERROR" not in done.stderr

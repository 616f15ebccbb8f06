"""The results as people read them: `latest.md` (tables and ratios) and `latest.json`.

Owns: the ratios between contenders measured in the same run, and the
Markdown layout. Reads only the results dictionary; measures nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENPROXIES = ("tokenproxy-static", "tokenproxy-cc")
NONE = "-"  # a figure that was not measured


def _get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Each tokenproxy variant against the others, from this run's medians."""
    scen = results.get("scenarios", {})
    out: dict[str, dict[str, float | None]] = {}
    for tp in TOKENPROXIES:
        row: dict[str, float | None] = {}
        for other in ("floor", "nginx", "mitmdump", "baseline"):
            for body in ("tiny", "16k"):
                row[f"rps_vs_{other}_{body}"] = _ratio(
                    _get(scen, "throughput", body, tp, "rps"), _get(scen, "throughput", body, other, "rps")
                )
            row[f"cpu_vs_{other}"] = _ratio(
                _get(scen, "throughput", "tiny", tp, "cpu_us_per_request"),
                _get(scen, "throughput", "tiny", other, "cpu_us_per_request"),
            )
            if other == "floor":
                row["cpu_vs_floor_16k"] = _ratio(
                    _get(scen, "throughput", "16k", tp, "cpu_us_per_request"),
                    _get(scen, "throughput", "16k", other, "cpu_us_per_request"),
                )
            row[f"added_p50_vs_{other}"] = _ratio(
                _get(scen, "latency", tp, "added_p50_us"), _get(scen, "latency", other, "added_p50_us")
            )
        https = _get(scen, "https_proxy") or {}
        for level in https.get("levels", []):
            row[f"https_rps_vs_mitmdump_x{level}"] = _ratio(
                _get(https, "throughput", tp, str(level), "rps"),
                _get(https, "throughput", "mitmdump", str(level), "rps"),
            )
        row["https_added_p50_vs_mitmdump"] = _ratio(
            _get(https, "latency", tp, "added_p50_us"), _get(https, "latency", "mitmdump", "added_p50_us")
        )
        row["https_tunnel_cpu_vs_mitmdump"] = _ratio(
            _get(https, "new_tunnel", tp, "cpu_ms_per_tunnel"),
            _get(https, "new_tunnel", "mitmdump", "cpu_ms_per_tunnel"),
        )
        for direction in ("download", "upload"):
            row[f"{direction}_vs_nginx"] = _ratio(
                _get(scen, "streaming", direction, tp, "mb_s"), _get(scen, "streaming", direction, "nginx", "mb_s")
            )
        if any(value is not None for value in row.values()):
            out[tp] = row
    return out


def write_json(results: dict[str, Any], path: Path) -> None:
    """All figures, every run included."""
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


# -- Markdown ---------------------------------------------------------------------


def _n(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return NONE
    return f"{value:,.{digits}f}{suffix}".replace(",", " ")


def _x(value: float | None) -> str:
    return NONE if value is None else f"{value:.2f}x"


def _ms(us: float | None) -> str:
    return NONE if us is None else f"{us / 1000:.2f} ms"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _names(section: dict[str, Any], order: list[str]) -> list[str]:
    return [name for name in order if name in section]


def markdown(results: dict[str, Any]) -> str:
    """The whole report."""
    meta = results["meta"]
    scen = results.get("scenarios", {})
    order = [c["name"] for c in meta["contenders"]]
    lines = [f"# tokenproxy benchmark ({'quick' if meta['quick'] else 'full'} run)", ""]
    m, v = meta["machine"], meta["versions"]
    lines += [
        f"- When: {meta['started']}, {meta['duration_s'] / 60:.1f} min. "
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}. "
        f"Load average before/after: {meta['loadavg_before']} / {meta['loadavg_after']}.",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"- Each figure: the median of {meta['settings']['repeats']} runs of {meta['settings']['seconds']} s"
        + (f" after a {meta['settings']['warmup']} s warm-up" if meta["settings"]["warmup"] else "")
        + "; wrk counts a request slower than 2 s as a timeout. CPU/req is the proxy's user+system time "
        "over the measured run divided by its answers (nginx: master and worker).",
        "",
        "Contenders: " + "; ".join(f"**{c['name']}** = {c['label']}" for c in meta["contenders"]) + ".",
        "",
    ]
    for name, reason in results.get("skipped", {}).items():
        lines += [f"- **{name}** skipped: {reason}"]
    for note in meta.get("notes", []):
        lines += [f"- {note}"]
    lines += [""]
    lines += _ratio_section(results)
    if "throughput" in scen:
        lines += _throughput(scen["throughput"], order)
    if "latency" in scen:
        lines += _latency(scen["latency"], order)
    if "scaling" in scen:
        lines += _scaling(scen["scaling"], order)
    if "streaming" in scen:
        lines += _streaming(scen["streaming"], order)
    if "storm" in scen:
        lines += _storm(scen["storm"])
    if "memory" in scen:
        lines += _memory(scen["memory"], order)
    if "https_proxy" in scen:
        lines += _https_proxy(scen["https_proxy"], order, results.get("ratios", {}))
    for name, error in results.get("errors", {}).items():
        lines += [f"- scenario **{name}** failed: `{error}`"]
    return "\n".join(lines).rstrip() + "\n"


def _ratio_section(results: dict[str, Any]) -> list[str]:
    table = results.get("ratios", {})
    if not table:
        return []
    names = list(table)
    labels = [
        ("req/s vs the floor (tiny, 64 conns; target ≥ 0.40x)", "rps_vs_floor_tiny"),
        ("req/s vs the floor (16 KiB, 64 conns; target ≥ 0.40x)", "rps_vs_floor_16k"),
        ("CPU/req vs the floor (tiny; target ≤ 2.50x)", "cpu_vs_floor"),
        ("CPU/req vs the floor (16 KiB)", "cpu_vs_floor_16k"),
        ("added p50 latency vs the floor's (target ≤ 3.00x)", "added_p50_vs_floor"),
        ("req/s vs nginx (tiny, 64 conns)", "rps_vs_nginx_tiny"),
        ("req/s vs nginx (16 KiB, 64 conns)", "rps_vs_nginx_16k"),
        ("req/s vs mitmdump (tiny)", "rps_vs_mitmdump_tiny"),
        ("req/s vs mitmdump (16 KiB)", "rps_vs_mitmdump_16k"),
        ("req/s vs plain aiohttp (tiny)", "rps_vs_baseline_tiny"),
        ("req/s vs plain aiohttp (16 KiB)", "rps_vs_baseline_16k"),
        ("CPU/req vs plain aiohttp", "cpu_vs_baseline"),
        ("CPU/req vs nginx", "cpu_vs_nginx"),
        ("added p50 latency vs nginx's", "added_p50_vs_nginx"),
        ("added p50 latency vs plain aiohttp's", "added_p50_vs_baseline"),
        ("download MB/s vs nginx", "download_vs_nginx"),
        ("upload MB/s vs nginx", "upload_vs_nginx"),
        *_https_labels(results),
    ]
    rows = [[label] + [_x(table[name].get(key)) for name in names] for label, key in labels]
    return ["## Ratios (same run)", "", *_table(["ratio", *names], rows)]


def _throughput(section: dict[str, Any], order: list[str]) -> list[str]:
    rows = []
    for name in _names(section.get("tiny", {}), order):
        tiny, med = section["tiny"][name], section.get("16k", {}).get(name, {})
        rows.append(
            [
                name,
                _n(tiny["rps"]),
                _ms(tiny["p99_us"]),
                _n(tiny["cpu_us_per_request"], 0, " µs"),
                _n(med.get("rps")),
                _ms(med.get("p99_us")),
                _n(med.get("cpu_us_per_request"), 0, " µs"),
                (_trouble(tiny).lstrip(", ") or "0") + " / " + (_trouble(med).lstrip(", ") or "0"),
            ]
        )
    header = [
        "contender",
        "tiny req/s",
        "tiny p99",
        "tiny CPU/req",
        "16 KiB req/s",
        "16 KiB p99",
        "16 KiB CPU/req",
        "errors (tiny / 16 KiB)",
    ]
    return ["## 1. Throughput at 64 connections", "", *_table(header, rows)]


def _latency(section: dict[str, Any], order: list[str]) -> list[str]:
    rows = [
        [
            name,
            _n(r["p50_us"], 0, " µs"),
            _n(r["p90_us"], 0, " µs"),
            _n(r["p99_us"], 0, " µs"),
            _n(r.get("added_p50_us"), 0, " µs"),
            _n(r.get("added_p99_us"), 0, " µs"),
            _n(r["cpu_us_per_request"], 0, " µs"),
        ]
        for name in _names(section, order)
        for r in [section[name]]
    ]
    header = ["contender", "p50", "p90", "p99", "added p50", "added p99", "CPU/req"]
    return ["## 2. Latency at 1 connection (tiny body)", "", *_table(header, rows)]


def _scaling(section: dict[str, Any], order: list[str]) -> list[str]:
    levels = sorted({int(level) for rows in section.values() for level in rows})
    rows = []
    for name in _names(section, order):
        cells = []
        for level in levels:
            r = section[name].get(str(level))
            if r is None:
                cells.append(NONE)
                continue
            cells.append(f"{_n(r['rps'])} / {_ms(r['p99_us'])}{_trouble(r)}")
        rows.append([name, *cells])
    header = ["contender", *(f"{level} conns: req/s / p99" for level in levels)]
    return ["## 3. Scaling (tiny body; see latest.png)", "", *_table(header, rows)]


def _trouble(row: dict[str, Any]) -> str:
    kinds = (("timeouts", "timeouts"), ("non_2xx", "non-2xx"), ("socket_errors", "socket errors"))
    return "".join(f", {row[key]} {label}" for key, label in kinds if row.get(key))


def _streaming(section: dict[str, Any], order: list[str]) -> list[str]:
    rows = []
    down, up = section.get("download", {}), section.get("upload", {})
    for name in _names(down, order):
        d, u = down[name], up.get(name, {})
        rows.append(
            [
                name,
                _n(d["mb_s"]),
                _n(d["peak_rss_mib"], 1, " MiB"),
                _n(d["rss_growth_mib"], 1, " MiB"),
                _n(u.get("mb_s")),
                _n(u.get("peak_rss_mib"), 1, " MiB"),
                _n(u.get("rss_growth_mib"), 1, " MiB"),
                f"{d['failures']}/{u.get('failures', NONE)}",
            ]
        )
    size = section.get("bytes", 0)
    header = ["contender", "download MB/s", "peak RSS", "RSS growth", "upload MB/s", "peak RSS", "RSS growth", "failed"]
    return [f"## 4. Streaming {size / 2**20:,.0f} MiB through each proxy", "", *_table(header, rows)]


def _storm(section: dict[str, Any]) -> list[str]:
    rows = []
    for name, storms in section.items():
        for r in storms.values():
            rows.append(
                [
                    name,
                    r["mode"],
                    _n(r["requests"]),
                    str(r["token_calls"]),
                    str(r["failures"]),
                    _n(r["last_answer_s"], 3, " s"),
                    _n(r["p99_s"], 3, " s"),
                ]
            )
    header = ["contender", "token", "concurrent requests", "token calls", "failures", "last answer", "p99"]
    intro = [
        "## 5. Refresh storm (token endpoint answers in 100 ms)",
        "",
        "`rejected`: the upstream answers 401 invalid_token to the old token, so every request is resent "
        "after the one refresh. `expired`: the old token's lifetime has passed, so every request waits "
        "for the one refresh. `reference`: the plain aiohttp proxy, the same number of concurrent requests "
        "and nothing to refresh. Times from the instant all requests were sent.",
        "",
    ]
    return intro + _table(header, rows)


def _memory(section: dict[str, Any], order: list[str]) -> list[str]:
    rows = []
    for name in _names(section, order):
        r = section[name]
        large = (
            f"{_n(r['after_large_mib'], 1, ' MiB')} ({_n(r['large_requests'])} req)"
            if "after_large_mib" in r
            else f"skipped: {r.get('large_skipped', '')}"
        )
        rows.append(
            [
                name,
                _n(r["idle_mib"], 1, " MiB"),
                f"{_n(r['with_idle_connections_mib'], 1, ' MiB')} ({r['idle_connections_ok']} ok)",
                f"{_n(r['after_small_mib'], 1, ' MiB')} ({_n(r['small_requests'])} req)",
                large,
                _n(r.get("growth_pct"), 1, " %"),
            ]
        )
    first: dict[str, Any] = next(iter(section.values()), {})
    idle = first.get("idle_connections", 0)
    header = ["contender", "idle", f"{idle} idle keep-alive conns", "after the first requests", "after all", "growth"]
    return ["## 6. Memory (RSS)", "", *_table(header, rows)]


HTTPS_TARGET = 5.0  # issue 16: at least 5x mitmdump's requests/s through intercepted tunnels


def _https_labels(results: dict[str, Any]) -> list[tuple[str, str]]:
    levels = _get(results, "scenarios", "https_proxy", "levels") or []
    return [
        *((f"HTTPS_PROXY req/s vs mitmdump ({n} conns; target ≥ {HTTPS_TARGET:.2f}x)", f"https_rps_vs_mitmdump_x{n}")
          for n in levels),
        ("HTTPS_PROXY added p50 vs mitmdump's", "https_added_p50_vs_mitmdump"),
        ("HTTPS_PROXY CPU per new tunnel vs mitmdump's", "https_tunnel_cpu_vs_mitmdump"),
    ]


def _https_proxy(section: dict[str, Any], order: list[str], ratios_table: dict[str, Any]) -> list[str]:
    levels = [str(n) for n in section.get("levels", [])]
    top = levels[-1] if levels else ""
    throughput, latency = section.get("throughput", {}), section.get("latency", {})
    tunnels = section.get("new_tunnel", {})
    rows = []
    for name in _names(throughput, order):
        cells = []
        for level in levels:
            r = throughput[name].get(level)
            cells.append(NONE if r is None else f"{_n(r['rps'])} / {_ms(r['p99_us'])}{_https_trouble(r)}")
        last = throughput[name].get(top, {})
        rows.append(
            [
                name,
                *cells,
                _n(last.get("cpu_us_per_request"), 0, " µs"),
                _n(last.get("load_tool_cpu_us_per_request"), 0, " µs"),
            ]
        )
    header = ["contender", *(f"{n} conns: req/s / p99" for n in levels), f"CPU/req ({top})", f"hey CPU/req ({top})"]
    lines = [
        "## 7. HTTPS_PROXY mode: requests inside intercepted tunnels",
        "",
        "The client asks the proxy for a tunnel (`CONNECT localhost:PORT`) and speaks TLS inside it with the proxy, "
        "which presents a certificate from its own CA (trusted by the client), adds the bearer and forwards over its "
        "own TLS connection to an nginx serving https (a bench CA; it answers 401 without a bench bearer, so only "
        "authorised requests count). tokenproxy: a `[[route]]` for `localhost` with `url = \"https://...\"` and "
        "`ca_file`, its CA from `tokenproxy ca init`; mitmdump: regular mode, the same addon, upstream verified "
        "against the bench CA. **direct**: the same clients straight to nginx over TLS. Requests/s: hey, keep-alive, "
        "one tunnel per connection for the whole run (each run opens its tunnels afresh, handshakes included); "
        "its p99 has 0.1 ms resolution; `hey CPU/req` is the load generator's own cost (it must stay far below "
        "the proxy's). Body: `/tiny`.",
        "",
        *_table(header, rows),
    ]
    pairs = []
    for tp, row in ratios_table.items():
        figures = [f"{_x(row.get(f'https_rps_vs_mitmdump_x{n}'))} ({n})" for n in levels]
        if any(not f.startswith(NONE) for f in figures):
            pairs.append(f"- **{tp}** req/s vs mitmdump's: " + ", ".join(figures) + f" (target ≥ {HTTPS_TARGET:.0f}x).")
    lines += [*pairs, ""] if pairs else []
    rows = [
        [
            name,
            _n(r["p50_us"], 0, " µs"),
            _n(r["p90_us"], 0, " µs"),
            _n(r["p99_us"], 0, " µs"),
            _n(r.get("added_p50_us"), 0, " µs"),
            _n(r.get("added_p99_us"), 0, " µs"),
            _n(r.get("cpu_us_per_request"), 0, " µs"),
            str(r.get("failures", NONE)),
        ]
        for name in _names(latency, order)
        for r in [latency[name]]
    ]
    header = ["contender", "p50", "p90", "p99", "added p50", "added p99", "CPU/req", "failed"]
    lines += ["One kept-alive tunnel, one request after another (Python's http.client, certificates verified):", ""]
    lines += _table(header, rows)
    rows = [
        [
            name,
            _n(r["tunnels"]),
            _n(r["median_ms"], 2, " ms"),
            _n(r["p99_ms"], 2, " ms"),
            _n(r.get("added_median_ms"), 2, " ms"),
            _n(r.get("cpu_ms_per_tunnel"), 2, " ms"),
            str(r["failures"]),
        ]
        for name in _names(tunnels, order)
        for r in [tunnels[name]]
    ]
    header = ["contender", "tunnels", "median", "p99", "added median", "proxy CPU/tunnel", "failed"]
    lines += [
        "A new tunnel each time, one after another: CONNECT, TLS handshake (full, no resumption), one request, close "
        "(direct: a new TLS connection):",
        "",
    ]
    return lines + _table(header, rows)


def _https_trouble(row: dict[str, Any]) -> str:
    kinds = (("non_2xx", "non-2xx"), ("errors", "errors"))
    return "".join(f", {row[key]} {label}" for key, label in kinds if row.get(key))

"""Scenario 7 (issue 16): the HTTPS_PROXY mode, tokenproxy beside mitmdump, both intercepting TLS.

The clients ask the proxy for a tunnel (`CONNECT localhost:PORT`), make a
TLS handshake inside it with the proxy (which presents a certificate minted
from its own CA, which the client trusts) and send HTTP/1.1 requests in it;
the proxy adds the bearer and forwards each over its own verified TLS
connection to one nginx serving https (`Stage.https_upstream`, a bench CA
made at stage start; it answers 401 to a request without the bearer, so
every 2xx counted is a request the proxy authorised).

- tokenproxy: a `[[route]]` with `host = "localhost"`, `url =
  "https://localhost:PORT"` and the bench CA as `ca_file`; its local CA made
  with `tokenproxy ca init` in the run folder.
- mitmdump: regular mode (an ordinary HTTP proxy intercepting TLS), its CA in
  its confdir, the same addon as in reverse mode, the upstream verified
  against the bench CA (`ssl_verify_upstream_trusted_ca`).
- direct: the same clients straight to nginx over TLS, with the header: the
  limit, and what "added" latency is counted from.

Measured:
1. `throughput`: hey (Go; honours a proxy with CONNECT, keeps connections
   alive) at each level of `LEVELS` connections, each one tunnel used for
   every request: requests/s, p50/p99 (hey's resolution: 0.1 ms), the
   proxy's CPU per request, and hey's own CPU per request (the check that
   the load generator is not the limit: it is far below the proxies').
   hey skips certificate checks (`InsecureSkipVerify`); the proxy's work is
   the same, and the two clients below do verify. At one connection hey
   runs on one thread (`GOMAXPROCS=1`), as wrk does (`-t1`): Go's idle
   threads spin while a request is out, and on a small machine they take
   the core the proxy and the upstream need.
2. `latency`: one kept-alive tunnel, sequential requests (Python's
   http.client, certificates verified): p50/p90/p99 and each minus direct's.
3. `new_tunnel`: CONNECT + TLS handshake + one request + close, one after
   the other: median and p99 milliseconds, and the proxy's CPU per tunnel.
"""

from __future__ import annotations

import http.client
import os
import re
import resource
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import nginx
from .contenders import REPO, Contender, Stage, has_key, token_table
from .procs import HOST, Proc, cpu_seconds, free_port, run_to_end, start
from .runner import Context
from .tls_material import UPSTREAM_HOST
from .tools import BENCH_DIR

SCENARIO_CONTENDERS = ("direct", "mitmdump", "tokenproxy-static", "tokenproxy-cc")
LEVELS = (1, 16, 64)
PATH = "/tiny"
REQUEST_TIMEOUT = 20.0


@dataclass
class Tunnelled:
    """A contender in HTTPS_PROXY mode: its proxy port (0 for direct), the CA its clients trust, its process."""

    contender: Contender
    proxy_port: int
    trust: Path
    proc: Proc | None

    def pids(self) -> list[int]:
        """The proxy's processes (none for `direct`)."""
        return self.proc.pids() if self.proc is not None else []


def tokenproxy_https_toml(
    port: int, upstream_port: int, ca_dir: Path, ca_file: Path, grant: str, token_port: int
) -> str:
    """tokenproxy as an HTTPS_PROXY for one routed host: quiet logs, no state file, its CA in `ca_dir`."""
    server_extra = "max_connections = 2048\n" if has_key("server", "max_connections") else ""
    if has_key("server", "loop"):
        server_extra += 'loop = "uvloop"\n'
    upstream_extra = 'client = "fast"\n' if has_key("upstream", "client") else ""
    return f"""\
[server]
listen = "{HOST}:{port}"
shutdown_timeout = 2.0
ca_dir = "{ca_dir}"
{server_extra}
[upstream]
{upstream_extra}
[queue]
max_waiting = 1000
wait_timeout = 60.0

[log]
level = "warning"
access_log = false

[[route]]
name = "bench"
host = "{UPSTREAM_HOST}"
url = "https://{UPSTREAM_HOST}:{upstream_port}"
ca_file = "{ca_file}"

[route.token]
{token_table(grant, token_port)}
state_file = ""
"""


def start_tunnelled(stage: Stage, contender: Contender) -> Tunnelled:
    """Start `contender` as an HTTPS_PROXY in front of the TLS upstream; return once it listens."""
    tls, upstream_port = stage.https_upstream()
    if contender.name == "direct":
        return Tunnelled(contender, 0, tls.ca_file, None)
    port = free_port()
    log = stage.run_dir / f"https-{contender.name}-{port}.log"
    if contender.name == "mitmdump":
        assert stage.tools.mitmdump is not None
        confdir = stage.run_dir / "mitmproxy-https"
        args = [
            stage.tools.mitmdump,
            "-q",
            "--listen-host",
            HOST,
            "--listen-port",
            str(port),
            "--mode",
            "regular",
            "-s",
            str(BENCH_DIR / "mitm_addon.py"),
            "--set",
            f"confdir={confdir}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={tls.ca_file}",
            "--set",
            "stream_large_bodies=1m",
        ]
        proc = start("mitmdump-https", args, log, port=port, env={**os.environ, "BENCH_TOKEN": nginx.STATIC_TOKEN})
        stage.adopt(proc)
        trust = confdir / "mitmproxy-ca-cert.pem"  # written at start, before it listens
    else:
        ca_dir = stage.run_dir / "tokenproxy-ca"
        config = stage.run_dir / f"https-{contender.name}-{port}.toml"
        grant = "client_credentials" if contender.refreshes else "static"
        config.write_text(tokenproxy_https_toml(port, upstream_port, ca_dir, tls.ca_file, grant, stage.token_port))
        if not (ca_dir / "ca.crt").exists():
            run_to_end([sys.executable, "-m", "proxy", "ca", "init", "-c", str(config)], "tokenproxy ca init", 60, REPO)
        proc = start(
            contender.name, [sys.executable, "-m", "proxy", "run", "-c", str(config)], log, port=port, cwd=REPO
        )
        stage.adopt(proc)
        trust = ca_dir / "ca.crt"
    return Tunnelled(contender, port, trust, proc)


@contextmanager
def running_tunnelled(stage: Stage, contender: Contender) -> Iterator[Tunnelled]:
    """`start_tunnelled` for the length of a `with` block; stopped by PID at its end."""
    tunnelled = start_tunnelled(stage, contender)
    try:
        yield tunnelled
    finally:
        if tunnelled.proc is not None:
            tunnelled.proc.stop()


# -- the clients ---------------------------------------------------------------------


def _connection(tunnelled: Tunnelled, upstream_port: int, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    """A not yet connected client: through the proxy's tunnel, or (direct) straight to the upstream."""
    if not tunnelled.proxy_port:
        return http.client.HTTPSConnection(UPSTREAM_HOST, upstream_port, timeout=REQUEST_TIMEOUT, context=context)
    conn = http.client.HTTPSConnection(HOST, tunnelled.proxy_port, timeout=REQUEST_TIMEOUT, context=context)
    conn.set_tunnel(UPSTREAM_HOST, upstream_port)
    return conn


def _headers(tunnelled: Tunnelled) -> dict[str, str]:
    # Only direct sends the bearer itself: through a proxy the upstream's 401 would show a header not added.
    return {} if tunnelled.proxy_port else {"Authorization": f"Bearer {nginx.STATIC_TOKEN}"}


def _get(conn: http.client.HTTPSConnection, headers: dict[str, str]) -> int:
    conn.request("GET", PATH, headers=headers)
    answer = conn.getresponse()
    answer.read()
    return answer.status


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]


def kept_alive_latency(tunnelled: Tunnelled, upstream_port: int, seconds: float, most: int) -> dict[str, Any]:
    """Sequential requests on one kept-alive tunnel for `seconds` (at most `most`): percentiles in µs, CPU/req."""
    context = ssl.create_default_context(cafile=str(tunnelled.trust))
    conn = _connection(tunnelled, upstream_port, context)
    headers = _headers(tunnelled)
    times: list[float] = []
    failures = 0
    try:
        for _ in range(20):  # the tunnel, the proxy's upstream connection and its token
            failures += _get(conn, headers) != 200
        pids = tunnelled.pids()
        cpu_before = cpu_seconds(pids)
        deadline = time.perf_counter() + seconds
        while len(times) < most and time.perf_counter() < deadline:
            began = time.perf_counter()
            status = _get(conn, headers)
            times.append((time.perf_counter() - began) * 1e6)
            failures += status != 200
        cpu = cpu_seconds(pids) - cpu_before
    finally:
        conn.close()
    times.sort()
    return {
        "requests": len(times),
        "failures": failures,
        "p50_us": _percentile(times, 50),
        "p90_us": _percentile(times, 90),
        "p99_us": _percentile(times, 99),
        "cpu_us_per_request": cpu / len(times) * 1e6 if pids else None,
    }


def new_tunnels(tunnelled: Tunnelled, upstream_port: int, seconds: float, most: int) -> dict[str, Any]:
    """One tunnel after another (CONNECT, handshake, one request, close) for `seconds`, at most `most`."""
    context = ssl.create_default_context(cafile=str(tunnelled.trust))
    headers = _headers(tunnelled)
    warm = _connection(tunnelled, upstream_port, context)  # the leaf certificate minted, the token fetched
    try:
        _get(warm, headers)
    finally:
        warm.close()
    pids = tunnelled.pids()
    cpu_before = cpu_seconds(pids)
    times: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds
    while len(times) < most and time.perf_counter() < deadline:
        began = time.perf_counter()
        conn = _connection(tunnelled, upstream_port, context)
        try:
            status = _get(conn, headers)
        except (OSError, http.client.HTTPException):
            status = 0
        finally:
            conn.close()
        times.append((time.perf_counter() - began) * 1e3)
        failures += status != 200
    cpu = cpu_seconds(pids) - cpu_before
    times.sort()
    return {
        "tunnels": len(times),
        "failures": failures,
        "median_ms": statistics.median(times),
        "p99_ms": _percentile(times, 99),
        "cpu_ms_per_tunnel": cpu / len(times) * 1e3 if pids else None,
    }


_HEY_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_HEY_PCT = re.compile(r"(\d+)% in ([\d.]+) secs")
_HEY_STATUS = re.compile(r"\[(\d{3})\]\s+(\d+) responses")
_HEY_ERRORS = re.compile(r"^\s+\[(\d+)\]\s+(.*)$", re.MULTILINE)


def run_hey(hey: str, tunnelled: Tunnelled, upstream_port: int, connections: int, seconds: float) -> dict[str, Any]:
    """hey at `connections` for `seconds` through the tunnel: req/s (2xx), p50/p99, proxy's and hey's CPU per request.

    Errors are counted, never printed into the results: hey's error lines may
    hold URLs.
    """
    args = [hey, "-z", f"{seconds:g}s", "-c", str(connections), "-t", str(int(REQUEST_TIMEOUT))]
    # hey gives the Host header as the TLS server name; with the port in it that is no valid SNI (the proxy
    # refuses it), so Host names the host alone (tokenproxy takes a Host without the CONNECT port).
    args += ["-host", UPSTREAM_HOST]
    if tunnelled.proxy_port:
        args += ["-x", f"http://{HOST}:{tunnelled.proxy_port}"]
    for name, value in _headers(tunnelled).items():
        args += ["-H", f"{name}: {value}"]
    args.append(f"https://{UPSTREAM_HOST}:{upstream_port}{PATH}")
    pids = tunnelled.pids()
    cpu_before = cpu_seconds(pids)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "GOMAXPROCS": "1"} if connections < 2 else None
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=False, env=env)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_seconds(pids) - cpu_before
    rps = _HEY_RPS.search(done.stdout)
    if done.returncode != 0 or rps is None:
        raise RuntimeError(f"hey printed no result (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    statuses = {int(code): int(count) for code, count in _HEY_STATUS.findall(done.stdout)}
    answered = sum(statuses.values())
    ok = sum(count for code, count in statuses.items() if 200 <= code < 300)
    errors_part = done.stdout.partition("Error distribution:")[2]
    errors = sum(int(count) for count, _ in _HEY_ERRORS.findall(errors_part))
    percentiles = {int(q): float(secs) * 1e6 for q, secs in _HEY_PCT.findall(done.stdout)}
    hey_cpu = (children.ru_utime + children.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    finished = answered + errors  # hey's Requests/sec counts the requests that failed too
    return {
        "rps": float(rps.group(1)) * ok / finished if finished else 0.0,
        "requests": answered,
        "non_2xx": answered - ok,
        "errors": errors,
        "p50_us": percentiles.get(50),
        "p99_us": percentiles.get(99),
        "cpu_us_per_request": cpu / ok * 1e6 if pids and ok else None,
        "load_tool_cpu_us_per_request": hey_cpu / answered * 1e6 if answered else None,
    }


# -- the scenario --------------------------------------------------------------------


def https_proxy(ctx: Context) -> dict[str, Any]:
    """Keep-alive throughput, latency at one connection and new-tunnel cost, for each contender of this mode."""
    hey = ctx.stage.tools.hey
    if hey is None:
        reason = f"hey (the load generator that speaks CONNECT) is missing: {ctx.stage.tools.hey_missing}"
        ctx.results.setdefault("skipped", {})["https_proxy scenario"] = reason
        return {"skipped": reason}
    s = ctx.settings
    quick = s.quick
    load_seconds = 0.5 if quick else float(s.seconds)
    repeats = 1 if quick else s.repeats
    out: dict[str, Any] = {
        "levels": list(LEVELS),
        "path": PATH,
        "throughput": {},
        "latency": {},
        "new_tunnel": {},
        "not_in_this_mode": [c.name for c in ctx.contenders if c.name not in SCENARIO_CONTENDERS],
    }
    _, upstream_port = ctx.stage.https_upstream()
    for contender in ctx.usable():
        if contender.name not in SCENARIO_CONTENDERS:
            continue
        with running_tunnelled(ctx.stage, contender) as tunnelled:
            rows: dict[str, Any] = {}
            for level in LEVELS:
                ctx.say(f"https_proxy {contender.name} x{level}")
                if not quick and s.warmup:
                    run_hey(hey, tunnelled, upstream_port, level, float(s.warmup))
                runs = [run_hey(hey, tunnelled, upstream_port, level, load_seconds) for _ in range(repeats)]
                rows[str(level)] = {**_median_run(runs), "runs": runs}
            out["throughput"][contender.name] = rows
            ctx.say(f"https_proxy {contender.name} latency x1")
            out["latency"][contender.name] = kept_alive_latency(
                tunnelled, upstream_port, load_seconds, 300 if quick else 1_000_000
            )
            ctx.say(f"https_proxy {contender.name} new tunnels")
            out["new_tunnel"][contender.name] = new_tunnels(
                tunnelled, upstream_port, load_seconds, 20 if quick else 2000
            )
    _added(out)
    return out


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the runs; the worst run's error counts."""
    row: dict[str, Any] = {}
    for key in ("rps", "p50_us", "p99_us", "cpu_us_per_request", "load_tool_cpu_us_per_request", "requests"):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    row["non_2xx"] = max(r["non_2xx"] for r in runs)
    row["errors"] = max(r["errors"] for r in runs)
    return row


def _added(out: dict[str, Any]) -> None:
    """What each contender adds over direct, in the same run."""
    direct_latency = out["latency"].get("direct")
    if direct_latency is not None:
        for row in out["latency"].values():
            for q in ("p50", "p99"):
                row[f"added_{q}_us"] = row[f"{q}_us"] - direct_latency[f"{q}_us"]
    direct_tunnel = out["new_tunnel"].get("direct")
    if direct_tunnel is not None:
        for row in out["new_tunnel"].values():
            row["added_median_ms"] = row["median_ms"] - direct_tunnel["median_ms"]

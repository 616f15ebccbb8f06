"""The contenders and the stage they run on.

Owns: the `Stage` (a run folder, the upstream nginx and the token server,
which live for the whole run) and starting each contender on a free port
in front of that upstream:

- `direct`: no proxy, the load generator talks to the upstream (the limit);
- `nginx`: nginx as a reverse proxy setting a static Authorization header;
- `mitmdump`: mitmproxy in reverse mode with a one-line addon;
- `floor`: bench/floor_proxy.py, the least a Python proxy can do (httptools on raw
  asyncio protocols; not a product): the yardstick tokenproxy's ratios are told against;
- `baseline`: bench/baseline_proxy.py, the plain aiohttp proxy;
- `tokenproxy-static`: tokenproxy with a `static` grant;
- `tokenproxy-cc`: tokenproxy with `client_credentials` against the token server;
- `tokenproxy-cc-redis` (run when named): the same with `[store] backend = "redis"`, against a
  redis-server the stage starts on first use: the store is touched only on refresh, so its
  per-request cost must match tokenproxy-cc's.
- `tokenproxy-w2`, `tokenproxy-wN`: tokenproxy-static with 2 workers, and one per CPU.

Every process is stopped by PID when its `Running` closes, and everything
left when the stage closes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import typing
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import nginx
from .procs import HOST, Proc, free_port, start
from .tls_material import UpstreamTls, make_upstream_tls
from .tools import BENCH_DIR, Tools

REPO = BENCH_DIR.parent


@dataclass(frozen=True)
class Contender:
    """One way of getting a request to the upstream."""

    name: str
    label: str
    proxy: bool = True  # False for `direct`: there is no proxy process to measure
    refreshes: bool = False  # True when it obtains tokens from the token server
    upstream_client: str = "fast"  # tokenproxy's `upstream.client`
    loop: str = "uvloop"  # tokenproxy's `server.loop`
    access_log: bool = False  # tokenproxy's `log.access_log` (its lines go to the contender's log file)
    default: bool = True  # False: run only when named in --contenders (diagnostic variants)
    store: str = "file"  # tokenproxy's `store.backend`
    workers: int = 1  # tokenproxy's `server.workers` (0: one per CPU)


CONTENDERS: tuple[Contender, ...] = (
    Contender("direct", "direct (no proxy)", proxy=False),
    Contender("nginx", "nginx reverse proxy, static header"),
    Contender("mitmdump", "mitmdump reverse mode + addon"),
    Contender("floor", "the floor: httptools on raw asyncio protocols, header swap only, not a product"),
    Contender("baseline", "plain aiohttp proxy (bench/baseline_proxy.py)"),
    Contender("tokenproxy-static", "tokenproxy, static grant"),
    Contender("tokenproxy-cc", "tokenproxy, client_credentials", refreshes=True),
    Contender(
        "tokenproxy-cc-redis",
        "tokenproxy, client_credentials, Redis store",
        refreshes=True,
        store="redis",
        default=False,
    ),
    # Variants of tokenproxy-static, to measure one choice at a time.
    Contender("tokenproxy-session", "tokenproxy, static, ClientSession path", upstream_client="session", default=False),
    Contender("tokenproxy-asyncio", "tokenproxy, static, asyncio loop", loop="asyncio", default=False),
    Contender("tokenproxy-access", "tokenproxy, static, access log on", access_log=True, default=False),
    Contender(
        "tokenproxy-session-asyncio",
        "tokenproxy, static, ClientSession path, asyncio loop",
        upstream_client="session",
        loop="asyncio",
        default=False,
    ),
    # tokenproxy-static with more processes on the one port: how throughput grows with cores.
    Contender("tokenproxy-w2", "tokenproxy, static, 2 workers", workers=2, default=False),
    Contender("tokenproxy-wN", "tokenproxy, static, one worker per CPU", workers=0, default=False),
)
BY_NAME = {c.name: c for c in CONTENDERS}


@dataclass
class Running:
    """A started contender: where to send requests, and the processes whose cost counts."""

    contender: Contender
    url: str  # base URL, no trailing slash
    proc: Proc | None

    def pids(self) -> list[int]:
        """The proxy's processes (none for `direct`)."""
        return self.proc.pids() if self.proc is not None else []

    def close(self) -> None:
        """Stop the proxy by PID."""
        if self.proc is not None:
            self.proc.stop()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tokenproxy_toml(
    port: int,
    upstream_port: int,
    grant: str,
    token_port: int,
    *,
    max_waiting: int = 1000,
    max_client_connections: int = 2048,
    refresh_before: float = 30.0,
    upstream_client: str = "fast",
    loop: str = "uvloop",
    redis_url: str = "",
    workers: int = 1,
    access_log: bool = False,
) -> str:
    """A tokenproxy config for the bench: quiet logs, no state file, short shutdown; Redis as the store if given.

    `server.max_connections` (where this tokenproxy has it) is raised to fit
    the scenario, as `queue.max_waiting` is: its default would refuse the
    1024-connection level and the larger storms with 503.
    """
    token = token_table(grant, token_port, refresh_before)
    server_extra = f"max_connections = {max_client_connections}\n" if has_key("server", "max_connections") else ""
    if has_key("server", "loop"):
        server_extra += f'loop = "{loop}"\n'
    if workers != 1:
        server_extra += f"workers = {workers}\n"
    upstream_extra = f'client = "{upstream_client}"\n' if has_key("upstream", "client") else ""
    return f"""\
[server]
listen = "{HOST}:{port}"
shutdown_timeout = 2.0
{server_extra}
[upstream]
url = "http://{HOST}:{upstream_port}"
{upstream_extra}
[token]
{token}
state_file = ""

[queue]
max_waiting = {max_waiting}
wait_timeout = 60.0

[log]
level = "{'info' if workers != 1 or access_log else 'warning'}"
access_log = {'true' if access_log else 'false'}
""" + (f'\n[store]\nbackend = "redis"\nurl = "{redis_url}"\nkey_prefix = "bench:"\n' if redis_url else "")


def token_table(grant: str, token_port: int, refresh_before: float = 30.0) -> str:
    """The keys of a bench credential (`[token]` or `[route.token]`): the static bearer, or the token server's."""
    if grant == "static":
        return f'grant = "static"\naccess_token = "{nginx.STATIC_TOKEN}"\ndefault_lifetime = 86400.0'
    return (
        'grant = "client_credentials"\n'
        f'token_url = "http://{HOST}:{token_port}/oauth/token"\n'
        'client_id = "bench"\nclient_secret = "bench-secret"\n'
        "min_refresh_interval = 0.0\n"
        f"refresh_before = {refresh_before}"
    )


@functools.cache
def has_key(section: str, key: str) -> bool:
    """Whether this checkout's tokenproxy config knows `section.key` (the config grows under us)."""
    try:
        from proxy import config
    except ImportError:
        return False
    table = typing.get_type_hints(config.Config).get(section)
    return dataclasses.is_dataclass(table) and key in {f.name for f in dataclasses.fields(table)}


@dataclass
class Stage:
    """The run folder, the upstream nginx and the token server; a context manager that cleans up."""

    tools: Tools
    stream_size: int
    token_delay: float = 0.1
    run_dir: Path = field(init=False)
    upstream_port: int = field(init=False)
    token_port: int = field(init=False)
    _body_temp: Path = field(init=False)
    _procs: list[Proc] = field(default_factory=list, init=False)
    _redis_url: str = field(default="", init=False)  # set when a contender first needs Redis
    _https: tuple[UpstreamTls, int] | None = field(default=None, init=False)  # the TLS upstream, once started

    def __enter__(self) -> Stage:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # 10 000 storm connections need it; children inherit it
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.run_dir = Path(tempfile.mkdtemp(prefix="tokenproxy-bench-"))
        self.run_dir.chmod(0o755)  # nginx's workers run as nobody when we are root
        shm = Path("/dev/shm")
        self._body_temp = Path(tempfile.mkdtemp(prefix="tokenproxy-bench-", dir=shm if shm.is_dir() else None))
        self._body_temp.chmod(0o755)
        try:
            self._start_upstreams()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_upstreams(self) -> None:
        nginx.write_bodies(self.run_dir / "www", self.stream_size)
        self.upstream_port = free_port()
        conf = nginx.upstream_conf(self.run_dir, self.run_dir / "www", self.upstream_port, self._body_temp)
        self._procs.append(nginx.start_nginx(self.tools.nginx, "upstream", conf, self.run_dir, self.upstream_port))
        self.token_port = free_port()
        self._procs.append(
            start(
                "token-server",
                [
                    sys.executable,
                    "-m",
                    "bench.token_server",
                    "--port",
                    str(self.token_port),
                    "--delay",
                    str(self.token_delay),
                ],
                self.run_dir / "token-server.log",
                port=self.token_port,
                cwd=REPO,
            )
        )

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self._procs):
            proc.stop()
        self._procs.clear()
        shutil.rmtree(self._body_temp, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    @property
    def upstream_url(self) -> str:
        """The upstream's base URL."""
        return f"http://{HOST}:{self.upstream_port}"

    def token_calls(self) -> int:
        """How many tokens the token server has issued since its last reset."""
        with urllib.request.urlopen(f"http://{HOST}:{self.token_port}/stats", timeout=10) as answer:
            return int(json.load(answer)["calls"])

    def reset_tokens(self, first_lifetime: float = 3600.0) -> None:
        """Zero the token server's counter; its next token is `old-1` living `first_lifetime` seconds."""
        request = urllib.request.Request(
            f"http://{HOST}:{self.token_port}/reset?first_lifetime={first_lifetime}", method="POST", data=b""
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

    def available(self, contender: Contender) -> str:
        """'' when the contender can run here, else why not."""
        if contender.name == "mitmdump" and self.tools.mitmdump is None:
            return self.tools.mitmdump_missing
        if contender.store == "redis" and shutil.which("redis-server") is None:
            return "redis-server not found (apt-get install redis-server)"
        if contender.name == "floor" and self.tools.floor_missing:
            return self.tools.floor_missing
        return ""

    def redis_url(self) -> str:
        """A redis-server for the stage (no persistence), started on first use and stopped with the stage."""
        if not self._redis_url:
            port = free_port()
            args = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
            args += ["--dir", str(self.run_dir)]
            self._procs.append(start("redis-server", args, self.run_dir / "redis.log", port=port))
            self._redis_url = f"redis://{HOST}:{port}/0"
        return self._redis_url

    def https_upstream(self) -> tuple[UpstreamTls, int]:
        """The TLS upstream (nginx serving /tiny and /16k for the bench's bearer only) and its port.

        Started on first use, with a test CA and a `localhost` leaf made in the
        run folder, and stopped with the stage.
        """
        if self._https is None:
            tls = make_upstream_tls(self.run_dir / "upstream-tls")
            port = free_port()
            conf = nginx.https_upstream_conf(
                self.run_dir, self.run_dir / "www", port, self._body_temp, tls.cert_file, tls.key_file
            )
            self._procs.append(nginx.start_nginx(self.tools.nginx, "https-upstream", conf, self.run_dir, port))
            self._https = (tls, port)
        return self._https

    def adopt(self, proc: Proc) -> None:
        """Stop `proc` with the stage at the latest (its `Running` normally stops it first)."""
        self._procs.append(proc)

    def start(self, contender: Contender, *, max_waiting: int = 1000, max_client_connections: int = 2048) -> Running:
        """Start `contender` on a free port and return once it listens."""
        if contender.name == "direct":
            return Running(contender, self.upstream_url, None)
        port = free_port()
        log = self.run_dir / f"{contender.name}-{port}.log"
        if contender.name == "nginx":
            conf = nginx.proxy_conf(self.run_dir, port, self.upstream_port, self._body_temp)
            proc = nginx.start_nginx(self.tools.nginx, f"proxy-{port}", conf, self.run_dir, port)
        elif contender.name == "mitmdump":
            assert self.tools.mitmdump is not None
            args = [
                self.tools.mitmdump,
                "-q",
                "--listen-host",
                HOST,
                "--listen-port",
                str(port),
                "--mode",
                f"reverse:{self.upstream_url}",
                "-s",
                str(BENCH_DIR / "mitm_addon.py"),
                "--set",
                "stream_large_bodies=1m",
                "--set",
                f"confdir={self.run_dir / 'mitmproxy'}",
            ]
            proc = start("mitmdump", args, log, port=port, env=_env(BENCH_TOKEN=nginx.STATIC_TOKEN))
        elif contender.name in ("baseline", "floor"):
            args = [
                sys.executable,
                "-m",
                f"bench.{contender.name}_proxy",
                "--port",
                str(port),
                "--upstream",
                self.upstream_url,
                "--token",
                nginx.STATIC_TOKEN,
            ]
            proc = start(contender.name, args, log, port=port, cwd=REPO)
        else:
            grant = "client_credentials" if contender.refreshes else "static"
            config = self.run_dir / f"{contender.name}-{port}.toml"
            config.write_text(
                tokenproxy_toml(
                    port,
                    self.upstream_port,
                    grant,
                    self.token_port,
                    max_waiting=max_waiting,
                    max_client_connections=max_client_connections,
                    upstream_client=contender.upstream_client,
                    loop=contender.loop,
                    redis_url=self.redis_url() if contender.store == "redis" else "",
                    workers=contender.workers,
                    access_log=contender.access_log,
                )
            )
            args = [sys.executable, "-m", "proxy", "run", "-c", str(config)]
            workers = contender.workers != 1
            proc = start(contender.name, args, log, port=port, cwd=REPO, count_children=workers)
            if workers:
                wait_logged(proc, "workers listening on")
        self._procs.append(proc)
        return Running(contender, f"http://{HOST}:{port}", proc)


def wait_logged(proc: Proc, text: str, timeout: float = 60.0) -> None:
    """Return once `text` is in the process's log (all workers listen, not only the first); stop it if not."""
    deadline = time.monotonic() + timeout
    while text not in proc.log.read_text(errors="replace"):
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"{proc.name} did not log {text!r}; see {proc.log}")
        time.sleep(0.05)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}

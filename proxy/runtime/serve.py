"""Serving until signalled: the runner and its limits, listeners, signals, reload, GC tuning."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from aiohttp import web

from ..config import Config, ConfigError, is_loopback, parse_listen, secrets_of
from ..core.causes import cause_in_words
from ..http.admin import build_admin_app
from ..http.admin_server import AdminRunner
from ..http.connect import Tunnels
from ..http.listener import BatchAcceptSite
from ..http.server import ProxyRunner, ServerLimits
from ..observe.log import flush_access_log, setup_logging
from ..upstream.model import Upstream
from .app import ENTRY, METRICS, ROUTING, TOKENS, build_app
from .reload import Reloader

logger = logging.getLogger("tokenproxy")


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    """The runner of the proxy port: the app's lifecycle, and the proxy's own server (server.py).

    A client that goes away cancels the handling of its request, which frees
    its waiting place and drops its upstream request. The limits on what a
    client may send and hold come from `[server]`. Every request goes
    straight to the app's one entry handler (no router).
    """
    return ProxyRunner(
        app,
        handler=lambda: app[ENTRY],
        first_protocol=lambda: tunnels_of(app, config),
        limits=server_limits(config),
        shutdown_timeout=config.server.shutdown_timeout,
    )


def tunnels_of(app: web.Application, config: Config) -> Tunnels:
    """What the proxy port does with CONNECT (the local CA of `server.ca_dir`), once the app's entry exists."""
    return Tunnels.load(
        app[ENTRY],
        Path(config.server.ca_dir).expanduser(),
        passthrough=config.server.connect_passthrough,
        connect_timeout=config.upstream.connect_timeout,
    )


def server_limits(config: Config) -> ServerLimits:
    """What one client may send and hold, from `[server]`: the same on the proxy and the admin port."""
    server = config.server
    return ServerLimits(
        max_connections=server.max_connections,
        header_timeout=server.header_timeout,
        body_timeout=server.body_timeout,
        keepalive_timeout=server.keepalive_timeout,
        max_headers=server.max_headers,
        max_header_size=server.max_header_size,
        max_request_line=server.max_request_line,
    )


def startup_warnings(config: Config) -> list[str]:
    """Things worth a warning at start: a token sent in clear text, TLS checks off."""
    warnings = []
    for index, route in enumerate(config.routes or (None,)):
        up = config.upstream if route is None else route.upstream
        key = "upstream" if route is None else f"route[{index}]"
        upstream = Upstream.parse(up.url)
        if upstream.scheme == "http" and not is_loopback(upstream.host):
            warnings.append(f"{key}.url uses http:// to a non-loopback host: the token travels in clear text")
        if not up.verify_tls:
            warnings.append(f"{key}.verify_tls is false: the upstream's identity is not checked")
    if config.server.allow_any:
        warnings.append("server.allow_any is true: anyone who can reach the proxy can use its token")
    return warnings


class ListenError(Exception):
    """An address the proxy or its admin port cannot listen on, and why, in words."""

    def __init__(self, address: str, cause: str) -> None:
        super().__init__(f"cannot listen on {address}: {cause}")
        self.address = address
        self.cause = cause


def refuse_live_socket(path: str) -> None:
    """Raise ListenError when another process answers on the Unix socket `path`.

    The event loop replaces a socket file that is already there, so without
    this a second proxy would silently take over a running one's socket. A
    stale file (nobody accepts on it) is left to be replaced; one that cannot
    be probed (no permission) is refused too, since it may be live.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return  # nothing there, or nobody listening: the bind goes ahead
    except BlockingIOError:
        pass  # its listen queue is full: someone listens
    except PermissionError as exc:
        cause = f"cannot tell whether another process listens there ({cause_in_words(exc)})"
        raise ListenError(f"unix:{path}", cause) from None
    except OSError:
        return  # not a socket, or a bad path: the bind itself says what is wrong
    finally:
        probe.close()
    raise ListenError(f"unix:{path}", "another process is listening on this socket")


async def start_listener(
    runner: web.BaseRunner, listen: str, socket_mode: int = 0o600, backlog: int = 128, *, reuse_port: bool = False
) -> str:
    """Listen on `listen`; `backlog` connections may wait to be accepted (the kernel caps it at somaxconn).

    `reuse_port` (a worker) shares a TCP port with the other workers, SO_REUSEPORT.
    ListenError, naming `listen` and the cause in words, when it cannot.
    """
    try:
        return await _start_listener(runner, listen, socket_mode, backlog, reuse_port)
    except OSError as exc:
        host = None if listen.startswith("unix:") else listen.rpartition(":")[0].strip("[]")
        raise ListenError(listen, cause_in_words(exc, host=host) or str(exc)) from None


async def _start_listener(runner: web.BaseRunner, listen: str, socket_mode: int, backlog: int, reuse_port: bool) -> str:
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        refuse_live_socket(path)
        # Create the socket with no access for others, then widen to socket_mode:
        # there is no moment when another user could connect.
        old_umask = os.umask(0o177)
        try:
            await web.UnixSite(runner, path, backlog=backlog).start()
        finally:
            os.umask(old_umask)
        os.chmod(path, socket_mode)
        return f"unix:{path}"
    host, port = parse_listen(listen)
    site = BatchAcceptSite(runner, host, port, backlog=backlog, reuse_port=reuse_port)
    await site.start()
    bound = runner.addresses[-1] if runner.addresses else (host, port)
    return f"http://{bound[0]}:{bound[1]}" if ":" not in str(bound[0]) else f"http://[{bound[0]}]:{bound[1]}"


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop `server.loop` names; asyncio's own where uvloop is not installed."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            return asyncio.new_event_loop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


# CPython looks for reference cycles among the young objects each time 700 more are alive, and
# among all objects whenever the survivors have grown by a quarter. Nearly everything a proxy
# allocates is freed by reference counting, but a burst of requests in flight is a large, growing,
# live heap: a storm of 10 000 paid 8 full scans (1.0 s of its 2.5 s) and found almost no garbage.
# Looking once 10 000 more are alive still collects cycles in steady load (RSS stays flat over a
# million requests) and leaves a burst unscanned.
GC_YOUNG_THRESHOLD = 10_000


@contextlib.contextmanager
def sparing_gc() -> Iterator[None]:
    """Collect reference cycles less eagerly for as long as the proxy serves (see GC_YOUNG_THRESHOLD).

    Starts with one full collection: importing the program ran the collector at its default,
    eager settings, and the count of young collections it left behind (it decides when the
    next full scan comes) would otherwise depend on how much code was imported.
    """
    gc.collect()
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], GC_YOUNG_THRESHOLD), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def serve(config: Config, reload: Callable[[], Config] | None = None, link: socket.socket | None = None) -> None:
    """Run the proxy until SIGINT or SIGTERM; a second signal stops at once; SIGHUP reloads.

    On the first signal: stop accepting, answer waiting requests with
    503 shutting_down, let in-flight requests and streams finish for up to
    `server.shutdown_timeout` seconds, then close everything.

    `link` makes this process a worker (workers.py): it shares its port
    (SO_REUSEPORT), writes `ready <url>` on the link once it listens, and
    stops as on SIGTERM when the link ends (its supervisor is gone).
    """
    with sparing_gc():
        try:
            await _serve(config, reload, link)
        finally:
            flush_access_log()  # a worker may end without atexit: its last lines are written here


async def _serve(config: Config, reload: Callable[[], Config] | None, link: socket.socket | None) -> None:
    for warning in startup_warnings(config):
        logger.warning("%s", warning)
    app = build_app(config)
    runner = make_runner(app, config)
    await runner.setup()
    admin_runner: AdminRunner | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set():
            logger.warning("second signal: stopping now")
            if main_task is not None:
                main_task.cancel()
            return
        stop.set()

    current = config  # the config in force, for what is read live (readiness before the first token)
    # Restart-only keys are compared with the config the listeners were started with.
    reloader = Reloader(app, config)

    def on_hangup() -> None:
        nonlocal current
        if reload is not None:
            current = _reload(reloader, reload) or current

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if link is not None:
        watch_supervisor(loop, link, stop)
    try:
        # A static token costs nothing to take up front: the first burst of clients finds it
        # ready instead of queueing (and overflowing queue.max_waiting) for it.
        for name, credential in app[ROUTING].credentials.items():
            if config.server.fetch_on_start or credential.token.grant == "static":
                token = await credential.manager.get()
                logger.info("first token %s obtained before listening (credential %s)", token.fingerprint, name)
        # A burst of new connections (a fleet of clients, a storm) waits in the accept queue
        # instead of having its SYNs dropped and retried a second later: as deep as we may hold.
        url = await start_listener(
            runner,
            config.server.listen,
            config.server.socket_mode,
            backlog=config.server.max_connections,
            reuse_port=link is not None,
        )
        logger.info(
            "tokenproxy listening on %s, forwarding to %s (grant %s, %s client, %s loop)",
            url,
            config.upstream.url if not config.routes else "routes " + ", ".join(r.name for r in config.routes),
            config.token.grant if not config.routes else "per route",
            config.upstream.client,
            "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio",
        )
        if config.server.admin_listen:
            # Probes and scrapes get the proxy port's limits: a slow or oversized request gets its
            # 408/431 and a flood its 503 here too.
            admin_runner = AdminRunner(
                build_admin_app(
                    lambda: app[TOKENS],
                    app[METRICS].render,
                    ready_before_token=lambda: current.server.ready_before_token,
                    routes=app[ROUTING].in_force,
                ),
                limits=server_limits(config),
                access_log=None,
                shutdown_timeout=config.server.shutdown_timeout,
            )
            await admin_runner.setup()
            admin_url = await start_listener(admin_runner, config.server.admin_listen)
            logger.info("admin listening on %s (/healthz /readyz /status /metrics)", admin_url)
        if link is not None:
            with contextlib.suppress(OSError):  # the supervisor is gone: watch_supervisor stops us
                link.sendall(f"ready {url}\n".encode())
        await stop.wait()
        logger.info("shutting down: waiting up to %gs for requests in flight", config.server.shutdown_timeout)
    finally:
        try:
            await reloader.close()
            await runner.cleanup()
            if admin_runner is not None:
                await admin_runner.cleanup()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if link is not None:
                loop.remove_reader(link.fileno())
                link.close()


def watch_supervisor(loop: asyncio.AbstractEventLoop, link: socket.socket, stop: asyncio.Event) -> None:
    """Set `stop` when the supervisor's end of `link` closes: a worker never outlives its parent.

    The kernel closes the parent's end however the parent ends (SIGKILL included), so this needs
    no signal and no polling; the worker then drains as on SIGTERM.
    """

    def on_readable() -> None:
        try:
            data = link.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(link.fileno())
            if not stop.is_set():
                logger.warning("the supervising process has gone: stopping")
                stop.set()

    link.setblocking(False)
    loop.add_reader(link.fileno(), on_readable)


def _reload(reloader: Reloader, reload: Callable[[], Config]) -> Config | None:
    """SIGHUP: read the config again; put it in force and return it if valid, else keep the old one (None)."""
    try:
        new = reload()
    except ConfigError as error:
        for problem in error.problems:
            logger.error("config reload rejected, the old config stays in force: %s", problem)
        return None
    setup_logging(new.log.level, new.log.format, secrets_of(new), access_log=new.log.access_log)
    for warning in startup_warnings(new):
        logger.warning("%s", warning)
    reloader.put(new)
    return new

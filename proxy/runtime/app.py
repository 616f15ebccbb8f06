"""The composition root: config in, running proxy out.

Owns: building the grant, store, token manager and forwarder from the
config; the shared client sessions (opened and closed in a `cleanup_ctx`);
the listener; and the serve-until-signalled lifecycle. Nothing below this
module reads the config objects directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
from aiohttp import hdrs, web

from ..auth.grants import Grant, JsonGrant, OAuthGrant, StaticGrant
from ..config.load import Config, ConfigError, TokenConfig, is_loopback, parse_listen, secrets_of
from ..core.errors import ExpectationFailed
from ..http.access import AccessRules
from ..http.admin import build_admin_app
from ..http.forward import Forwarder
from ..http.listener import BatchAcceptSite
from ..http.render import error_response
from ..http.server import ProxyRunner, ServerLimits
from ..observe.log import setup_logging
from ..observe.metrics import Metrics, TokenGauges
from ..tokens.manager import Clock, RefreshPolicy, TokenManager, credential_id
from ..tokens.store import FileStore, NullStore, Store
from ..upstream.fast_client import FastClient
from ..upstream.model import Upstream, UpstreamClient
from ..upstream.session_client import SessionClient

logger = logging.getLogger("tokenproxy")

FORWARDER = web.AppKey("forwarder", Forwarder)
TOKENS = web.AppKey("tokens", TokenManager)
METRICS = web.AppKey("metrics", Metrics)



def build_grant(token: TokenConfig) -> Grant:
    """The grant object the `token` section describes."""
    if token.grant == "static":
        return StaticGrant(token.access_token, token.default_lifetime)
    if token.grant == "json":
        spec = token.json
        return JsonGrant(
            url=spec.url or token.token_url,
            method=spec.method.upper(),
            headers=dict(spec.headers),
            body_template=None if spec.refresh_cookie else json.loads(spec.body),
            access_token_path=spec.access_token_path,
            refresh_token_path=spec.refresh_token_path,
            expires_in_path=spec.expires_in_path,
            refresh_cookie=spec.refresh_cookie,
            timeout=token.timeout,
        )
    params = {"username": token.username, "password": token.password} if token.grant == "password" else {}
    return OAuthGrant(
        name=token.grant,
        token_url=token.token_url,
        client_id=token.client_id,
        client_secret=token.client_secret,
        client_auth=token.client_auth,
        params=params,
        scope=token.scope,
        audience=token.audience,
        timeout=token.timeout,
    )


def credential_of(token: TokenConfig) -> str:
    """What identifies the credential a token belongs to: grant, endpoint, client, user."""
    return credential_id(token.grant, token.token_url or token.json.url, token.client_id, token.username)


def build_store(token: TokenConfig) -> Store:
    """The state file store, or one that keeps nothing when `state_file` is empty."""
    return FileStore(Path(token.state_file)) if token.state_file else NullStore()


def build_policy(config: Config) -> RefreshPolicy:
    """The token manager's timings and bounds."""
    tok = config.token
    return RefreshPolicy(
        refresh_before=tok.refresh_before,
        min_refresh_interval=tok.min_refresh_interval,
        default_lifetime=tok.default_lifetime,
        timeout=tok.timeout,
        backoff_initial=tok.backoff_initial,
        backoff_max=tok.backoff_max,
        max_waiting=config.queue.max_waiting,
        wait_timeout=config.queue.wait_timeout,
    )


def ssl_context(config: Config) -> ssl.SSLContext | bool:
    """TLS settings for outgoing connections: verified by default, with an optional extra CA."""
    if not config.upstream.verify_tls:
        return False
    context = ssl.create_default_context()
    if config.upstream.ca_file:
        context.load_verify_locations(str(Path(config.upstream.ca_file).expanduser()))
    return context


def upstream_client(config: Config) -> UpstreamClient:
    """The way to the upstream that `upstream.client` names, with its pool and timeouts."""
    up = config.upstream
    kind = FastClient if up.client == "fast" else SessionClient
    return kind(
        max_connections=up.max_connections,
        connect_timeout=up.connect_timeout,
        read_timeout=up.read_timeout,
        tls=ssl_context(config),
    )


def token_session(config: Config) -> aiohttp.ClientSession:
    """A small session for the token endpoint: no cookie jar, its own pool."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=4, ssl=ssl_context(config)),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def make_token_manager(
    config: Config, session: aiohttp.ClientSession, clock: Clock = time.time, metrics: Metrics | None = None
) -> TokenManager:
    """A TokenManager for the configured credential, resumed from its state file."""
    tok = config.token
    manager = TokenManager(
        build_grant(tok),
        build_store(tok),
        session,
        build_policy(config),
        refresh_token=tok.refresh_token or None,
        credential=credential_of(tok),
        clock=clock,
        metrics=metrics,
    )
    manager.resume()
    return manager


class LiveSettings:
    """The settings a reload may change that are read per request.

    Owned by the composition root: created by build_app, replaced attribute
    by attribute only by apply_reload, on the event loop.
    """

    def __init__(self, rules: AccessRules) -> None:
        self.rules = rules


LIVE = web.AppKey("live", LiveSettings)
Entry = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
ENTRY: web.AppKey[Entry] = web.AppKey("entry")

# Keys whose change needs a restart: they shape listeners, pools and TLS set up once.
RESTART_ONLY = (
    "server.listen",
    "server.admin_listen",
    "server.socket_mode",
    "server.max_connections",
    "server.header_timeout",
    "server.body_timeout",
    "server.keepalive_timeout",
    "server.max_headers",
    "server.max_header_size",
    "server.max_request_line",
    "server.loop",
    "upstream.connect_timeout",
    "upstream.read_timeout",
    "upstream.verify_tls",
    "upstream.ca_file",
    "upstream.max_connections",
    "upstream.client",
    "token.state_file",
)


def _dotted(config: Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def apply_reload(app: web.Application, old: Config, new: Config) -> list[str]:
    """Put a reloaded, valid config into force without dropping connections.

    Returns notes for the log: restart-only keys that changed (kept as they
    were) and whether the current token was kept.
    """
    notes = [
        f"{key} changed; it takes effect after a restart"
        for key in RESTART_ONLY
        if _dotted(old, key) != _dotted(new, key)
    ]
    tok = new.token
    kept = app[TOKENS].reconfigure(
        build_grant(tok),
        build_policy(new),
        refresh_token=tok.refresh_token or None,
        credential=credential_of(tok),
    )
    notes.append("current token kept" if kept else "credential changed: a new token will be fetched")
    app[FORWARDER].reconfigure(
        Upstream.parse(new.upstream.url),
        refresh_on=frozenset(tok.refresh_on),
        replay_limit=new.retry.replay_limit,
        replay_memory=new.retry.replay_memory,
        drop_headers=(new.server.client_token_header,) if new.server.client_token else (),
        rewrite_redirects=new.upstream.rewrite_redirects,
    )
    app[LIVE].rules = AccessRules.build(
        new.server.allow_from, new.server.client_token, new.server.client_token_header
    )
    return notes


def build_app(config: Config, *, clock: Clock = time.time) -> web.Application:
    """The proxy's aiohttp Application: one catch-all handler, resources in a cleanup context."""
    app = web.Application()

    def token_gauges() -> TokenGauges | None:
        manager = app.get(TOKENS)
        if manager is None:
            return None
        status = manager.status()
        expires_in = None if status.expires_at is None else status.expires_at - clock()
        return TokenGauges(status.waiting, expires_in, status.generation)

    app[METRICS] = Metrics(token_gauges)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        up = config.upstream
        metrics = app[METRICS]
        tokens_http = token_session(config)
        try:
            # Resumes from the state file first: one that is refused (UnsafeStateError) leaves nothing open.
            manager = make_token_manager(config, tokens_http, clock, metrics)
        except BaseException:
            await tokens_http.close()
            raise
        client = upstream_client(config)
        app[TOKENS] = manager
        app[FORWARDER] = Forwarder(
            client,
            Upstream.parse(up.url),
            manager,
            refresh_on=frozenset(config.token.refresh_on),
            replay_limit=config.retry.replay_limit,
            replay_memory=config.retry.replay_memory,
            # A body that finds replay_memory full waits for room as long as a stalled body is
            # tolerated (a stall attack holding it is over by then), then streams.
            replay_wait=config.server.body_timeout,
            drop_headers=(config.server.client_token_header,) if config.server.client_token else (),
            rewrite_redirects=config.upstream.rewrite_redirects,
            metrics=metrics,
        )
        try:
            yield
        finally:
            await manager.close()
            await client.close()
            await tokens_http.close()

    live = LiveSettings(AccessRules.build(
        config.server.allow_from, config.server.client_token, config.server.client_token_header
    ))
    app[LIVE] = live

    async def release_waiters(app: web.Application) -> None:
        # Runs before aiohttp waits for in-flight handlers: waiting requests
        # get 503 shutting_down at once instead of holding up the shutdown.
        await app[TOKENS].close()

    async def entry(request: web.BaseRequest) -> web.StreamResponse:
        """Every request on the proxy port: no router, since every target goes to the forwarder."""
        if request.version >= (1, 1) and hdrs.EXPECT in request.headers:
            if request.headers[hdrs.EXPECT].lower() != "100-continue":
                return error_response(ExpectationFailed("only Expect: 100-continue is understood"))
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        rules = live.rules
        if rules.active:
            refusal = rules.check(request.remote, request.headers)
            if refusal is not None:
                response = error_response(refusal)
                if refusal.status == 407:
                    response.headers["Proxy-Authenticate"] = 'Bearer realm="tokenproxy"'
                return response
        return await app[FORWARDER].handle(request)

    app[ENTRY] = entry
    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(release_waiters)
    return app


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    """An AppRunner with the server settings a proxy needs.

    `handler_cancellation` cancels a handler whose client went away, which
    frees its waiting place and drops its upstream request. The limits on
    what a client may send and hold (server.py) come from `[server]`. Every
    request goes straight to the app's one entry handler (no router).
    """
    return ProxyRunner(
        app,
        handler=app[ENTRY],
        limits=server_limits(config),
        handler_cancellation=True,
        auto_decompress=False,
        access_log=None,
        shutdown_timeout=config.server.shutdown_timeout,
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
    upstream = Upstream.parse(config.upstream.url)
    if upstream.scheme == "http" and not is_loopback(upstream.host):
        warnings.append("upstream.url uses http:// to a non-loopback host: the token travels in clear text")
    if config.server.allow_any:
        warnings.append("server.allow_any is true: anyone who can reach the proxy can use its token")
    if not config.upstream.verify_tls:
        warnings.append("upstream.verify_tls is false: the upstream's identity is not checked")
    return warnings


def refuse_live_socket(path: str) -> None:
    """Raise OSError when another process answers on the Unix socket `path`.

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
        detail = f"{path}: cannot tell whether another process listens there ({exc.strerror})"
        raise OSError(exc.errno, detail) from None
    except OSError:
        return  # not a socket, or a bad path: the bind itself says what is wrong
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path}: another process is listening on this socket")


async def start_listener(runner: web.BaseRunner, listen: str, socket_mode: int = 0o600, backlog: int = 128) -> str:
    """Listen on `listen`; `backlog` connections may wait to be accepted (the kernel caps it at somaxconn).

    OSError when it cannot, e.g. when another process listens on the same Unix socket.
    """
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
    site = BatchAcceptSite(runner, host, port, backlog=backlog)
    await site.start()
    bound = runner.addresses[-1] if runner.addresses else (host, port)
    return f"http://{bound[0]}:{bound[1]}" if ":" not in str(bound[0]) else f"http://[{bound[0]}]:{bound[1]}"


def _reload(app: web.Application, current: Config, reload: Callable[[], Config]) -> Config:
    """SIGHUP: read the config again; put it in force if valid, else keep the old one."""
    try:
        new = reload()
    except ConfigError as error:
        for problem in error.problems:
            logger.error("config reload rejected, the old config stays in force: %s", problem)
        return current
    setup_logging(new.log.level, new.log.format, secrets_of(new), access_log=new.log.access_log)
    for warning in startup_warnings(new):
        logger.warning("%s", warning)
    for note in apply_reload(app, current, new):
        logger.info("config reloaded: %s", note)
    return new


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


async def serve(config: Config, reload: Callable[[], Config] | None = None) -> None:
    """Run the proxy until SIGINT or SIGTERM; a second signal stops at once; SIGHUP reloads.

    On the first signal: stop accepting, answer waiting requests with
    503 shutting_down, let in-flight requests and streams finish for up to
    `server.shutdown_timeout` seconds, then close everything.
    """
    with sparing_gc():
        await _serve(config, reload)


async def _serve(config: Config, reload: Callable[[], Config] | None) -> None:
    for warning in startup_warnings(config):
        logger.warning("%s", warning)
    app = build_app(config)
    runner = make_runner(app, config)
    await runner.setup()
    admin_runner: ProxyRunner | None = None
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

    current = config

    def on_hangup() -> None:
        nonlocal current
        if reload is not None:
            current = _reload(app, current, reload)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        # A static token costs nothing to take up front: the first burst of clients finds it
        # ready instead of queueing (and overflowing queue.max_waiting) for it.
        if config.server.fetch_on_start or config.token.grant == "static":
            token = await app[TOKENS].get()
            logger.info("first token %s obtained before listening", token.fingerprint)
        # A burst of new connections (a fleet of clients, a storm) waits in the accept queue
        # instead of having its SYNs dropped and retried a second later: as deep as we may hold.
        url = await start_listener(
            runner, config.server.listen, config.server.socket_mode, backlog=config.server.max_connections
        )
        logger.info(
            "tokenproxy listening on %s, forwarding to %s (grant %s, %s client, %s loop)",
            url,
            config.upstream.url,
            config.token.grant,
            config.upstream.client,
            "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio",
        )
        if config.server.admin_listen:
            # Probes and scrapes get the proxy port's limits: a slow or oversized request gets its
            # 408/431 and a flood its 503 here too.
            admin_runner = ProxyRunner(
                build_admin_app(lambda: app[TOKENS], app[METRICS].render),
                limits=server_limits(config),
                access_log=None,
            )
            await admin_runner.setup()
            admin_url = await start_listener(admin_runner, config.server.admin_listen)
            logger.info("admin listening on %s (/healthz /readyz /status /metrics)", admin_url)
        await stop.wait()
        logger.info("shutting down: waiting up to %gs for requests in flight", config.server.shutdown_timeout)
    finally:
        try:
            await runner.cleanup()
            if admin_runner is not None:
                await admin_runner.cleanup()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)

"""What one request costs the proxies' own Python path, in CPU instructions: `python -m bench.instructions`.

Drives tokenproxy's request path and the floor's in one process without
sockets: a fake transport on each side, the real objects in between. For
tokenproxy: the proxy port's server, the entry handler, the forwarder and
its quick path, the fast client's pool and kept-alive connection, a static
grant, the access log off; for the floor: its client and upstream
protocols. Every request is `GET /tiny` with the headers hey sends, every
answer nginx's head with a 13-byte body.

Under valgrind's callgrind (the default when valgrind is installed) the
count moves by about half a percent from run to run, where wall-clock
figures on a shared VM move by ten: each proxy runs twice, for two numbers of
requests, with a fixed hash seed, and the difference of the totals divided by
the requests between them leaves out start-up and imports. Without valgrind (or with `--timeit`): the time per
request, the best of several timeit rounds (noisy). What it leaves out on
purpose: the event loop, the system calls and the wake-ups around them,
which cost about the same for any proxy (see README, "Against the floor").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .procs import run_to_end

REPO = Path(__file__).resolve().parent.parent

REQUEST = b"GET /tiny HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: hey/0.0.1\r\nAccept-Encoding: gzip\r\n\r\n"
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 16:04:08 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 13\r\nLast-Modified: Sun, 06 Dec 2026 16:04:05 GMT\r\n"
    b'Connection: keep-alive\r\nETag: "6b158775-d"\r\nAccept-Ranges: bytes\r\n\r\n{"ok": true}\n'
)
PROXIES = ("tokenproxy", "floor")
# Requests of the short and the long callgrind run; their difference is what is counted.
SHORT, LONG = 500, 2500
# Bound on the warm-up request through a real socket, so a broken path fails instead of hanging.
WARM_UP_BOUND = 10.0


class FakeTransport:
    """Collects what a protocol writes; never closing, never paused."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.wrote = asyncio.Event()  # set at the first write

    def write(self, data: bytes) -> None:
        """Keep the last few writes (enough to check the answers), not all of them."""
        if not self.written:
            self.wrote.set()
        self.written.append(data)
        if len(self.written) > 8:
            del self.written[:4]

    def writelines(self, lines: list[bytes]) -> None:
        """As `write`, for each."""
        for line in lines:
            self.write(line)

    def is_closing(self) -> bool:
        """Never."""
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """A loopback peer; nothing else."""
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def pause_reading(self) -> None:
        """Nothing to pause."""

    def resume_reading(self) -> None:
        """Nothing to resume."""

    def close(self) -> None:
        """Nothing to close."""

    def abort(self) -> None:
        """Nothing to abort."""

    def get_write_buffer_size(self) -> int:
        """Everything is written at once."""
        return 0


async def _upstream_server() -> asyncio.Server:
    """A socket upstream for the warm-up request: nginx's answer to every request head."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(ANSWER)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


Driven = tuple[Callable[[], None], Callable[[], bool], Callable[[], Awaitable[None]]]


async def _tokenproxy(upstream_port: int) -> Driven:
    """One request through tokenproxy's path (after a warm-up that opens the kept-alive upstream connection)."""
    from aiohttp import web

    from proxy.config.load import load_config
    from proxy.http.server import ClientConnection, ProxyServer
    from proxy.observe.log import setup_logging
    from proxy.runtime.app import ENTRY, FORWARDER, build_app
    from proxy.runtime.serve import server_limits

    config = load_config(
        None,
        {
            "upstream.url": f"http://127.0.0.1:{upstream_port}",
            "token.grant": "static",
            "token.access_token": "abc.def.ghi",
            "log.access_log": False,
        },
        env={},
    )
    setup_logging("warning", "text", access_log=False)
    app = build_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    server = ProxyServer(app[ENTRY], limits=server_limits(config), loop=asyncio.get_running_loop())
    to_client = FakeTransport()
    client = ClientConnection(server)
    client.connection_made(to_client)  # type: ignore[arg-type]
    client.data_received(REQUEST)  # no kept-alive connection yet: opens one, through the coroutine
    try:
        await asyncio.wait_for(to_client.wrote.wait(), WARM_UP_BOUND)
    except TimeoutError:
        raise RuntimeError(f"the warm-up request was not answered within {WARM_UP_BOUND:g} s") from None
    if not to_client.written or not to_client.written[-1].startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the warm-up request failed: {to_client.written[-1:]!r}")
    # The kept-alive connection now idle in the pool, reached through private names (this tool only):
    # from here on it writes to a fake transport, and its answers are fed by hand.
    clients = app[FORWARDER]._client._clients  # type: ignore[attr-defined]
    pools = next(iter(clients.values()))._pools
    upstream = next(iter(pools.values()))._idle[-1]
    real = upstream.transport
    upstream.transport = FakeTransport()

    def one() -> None:
        client.data_received(REQUEST)
        upstream.data_received(ANSWER)

    def answered() -> bool:
        return bool(to_client.written) and to_client.written[-1].endswith(b'{"ok": true}\n')

    async def stop() -> None:
        upstream.transport = real
        await runner.cleanup()

    return one, answered, stop


async def _floor() -> Driven:
    """One request through the floor's path (its upstream protocol given a fake transport at once)."""
    from bench.floor_proxy import FloorProxy, _Client, _Upstream

    proxy = FloorProxy("http://127.0.0.1:8081", "abc.def.ghi")
    to_client = FakeTransport()
    client = _Client(proxy)
    client.connection_made(to_client)  # type: ignore[arg-type]
    upstream = _Upstream(client)
    upstream.connection_made(FakeTransport())  # type: ignore[arg-type]
    client.upstream = upstream

    def one() -> None:
        client.data_received(REQUEST)
        upstream.data_received(ANSWER)

    def answered() -> bool:
        return bool(to_client.written) and to_client.written[-1] == ANSWER

    async def stop() -> None:
        """Nothing was opened."""

    return one, answered, stop


async def _drive(proxy: str, requests: int | None) -> float | None:
    """Run `requests` requests through `proxy` (for callgrind), or time them (None): µs a request."""
    upstream = await _upstream_server()
    async with upstream:
        port = upstream.sockets[0].getsockname()[1]
        one, answered, stop = await (_tokenproxy(port) if proxy == "tokenproxy" else _floor())
        try:
            for _ in range(50):
                one()
            if not answered():
                raise RuntimeError(f"{proxy}: the driven requests were not answered")
            if requests is not None:
                for _ in range(requests):
                    one()
                return None
            rounds = timeit.repeat(one, number=2000, repeat=15)
            return min(rounds) / 2000 * 1e6
        finally:
            await stop()


def _run(proxy: str, requests: int | None) -> float | None:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_drive(proxy, requests))
    return uvloop.run(_drive(proxy, requests))


def _instructions(valgrind: str, proxy: str, requests: int, out: Path) -> int:
    """Total instructions of one run of `requests` requests under callgrind."""
    run_to_end(
        [
            valgrind,
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "bench.instructions",
            "--drive",
            proxy,
            "--requests",
            str(requests),
        ],
        f"the callgrind run of {proxy}",
        600,
        REPO,
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same hashes, so the same dict and set probes, every run
    )
    for line in out.read_text().splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no total in {out}")


def main(argv: list[str] | None = None) -> int:
    """Print each proxy's cost a request and tokenproxy's ratio to the floor."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeit", action="store_true", help="time per request (noisy), even with valgrind")
    parser.add_argument("--drive", choices=PROXIES, help=argparse.SUPPRESS)  # one run, under callgrind
    parser.add_argument("--requests", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        _run(args.drive, args.requests)
        return 0
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    valgrind = None if args.timeit else shutil.which("valgrind")
    figures: dict[str, float] = {}
    if valgrind is None:
        unit = "µs a request (timeit, best of 15 rounds of 2 000)"
        if not args.timeit:
            print("valgrind is not installed (apt-get install valgrind): timing instead, which is noisy")
        for proxy in PROXIES:
            value = _run(proxy, None)
            assert value is not None
            figures[proxy] = value
    else:
        unit = f"instructions a request (callgrind, {LONG} requests less {SHORT})"
        with tempfile.TemporaryDirectory(prefix="tokenproxy-instructions-") as folder:
            for proxy in PROXIES:
                short = _instructions(valgrind, proxy, SHORT, Path(folder) / f"{proxy}.short")
                long = _instructions(valgrind, proxy, LONG, Path(folder) / f"{proxy}.long")
                figures[proxy] = (long - short) / (LONG - SHORT)
    print(f"GET /tiny, Python path only, commit {commit or 'unknown'}: {unit}")
    for proxy in PROXIES:
        print(
            f"  {proxy:<10} {figures[proxy]:>12,.2f}" if valgrind is None else f"  {proxy:<10} {figures[proxy]:>12,.0f}"
        )
    print(f"  tokenproxy / floor: {figures['tokenproxy'] / figures['floor']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

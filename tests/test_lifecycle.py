"""The process lifecycle as a platform engineer sees it: SIGTERM, SIGHUP, JSON logs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.token_server import CLIENT_SECRET
from tests.helpers import (
    RAW_BOUND,
    assert_proxy_error,
    close_raw,
    open_raw,
    parse_response,
    raw_exchange,
    read_to_eof,
    read_until,
    write_config,
)


class Running:
    """A `tokenproxy run` subprocess, its URL and everything it logged so far."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, seen: list[str]) -> None:
        self.proc, self.url, self.seen = proc, url, seen

    async def expect(self, pattern: str) -> None:
        assert self.proc.stderr is not None
        await read_until(self.proc.stderr, pattern, self.seen)

    async def finish(self) -> str:
        assert self.proc.stderr is not None
        rest = await asyncio.wait_for(self.proc.stderr.read(), 30)
        await asyncio.wait_for(self.proc.wait(), 30)
        return "".join(self.seen) + rest.decode()


@pytest.fixture
async def start_proxy(tmp_path: Path, token_server, api) -> AsyncIterator:
    procs: list[asyncio.subprocess.Process] = []

    async def start(extra_config: str = "", path: Path | None = None) -> Running:
        path = path or write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json", extra_config)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "-c", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "TEST_CLIENT_SECRET": CLIENT_SECRET},
        )
        procs.append(proc)
        seen: list[str] = []
        assert proc.stderr is not None
        match = await read_until(proc.stderr, r"listening on http://127\.0\.0\.1:(\d+)", seen)
        return Running(proc, f"http://127.0.0.1:{match.group(1)}", seen)

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            # Read the pipes to their end: a stderr pipe left full is paused and never reports it
            # closed, so wait() alone would hang.
            await asyncio.wait_for(proc.communicate(), 30)


async def test_lifecycle_sigterm_lets_a_stream_in_flight_finish(start_proxy, api) -> None:
    """SIGTERM during a streaming response: the stream completes, then the process exits 0."""
    running = await start_proxy()
    async with aiohttp.ClientSession() as session, session.get(f"{running.url}/sse") as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert first == b"data: first\n\n"
        running.proc.send_signal(signal.SIGTERM)
        await running.expect("shutting down")
        api.sse_gate.set()
        rest = await resp.content.read()
    assert rest == b"data: second\n\n"
    await running.finish()
    assert running.proc.returncode == 0


async def test_lifecycle_sigterm_answers_waiting_requests_shutting_down(start_proxy, token_server) -> None:
    """SIGTERM while requests wait for a token: they get 503 shutting_down, and the process exits 0."""
    token_server.gate = asyncio.Event()
    running = await start_proxy()
    async with aiohttp.ClientSession() as session:
        waiting = asyncio.ensure_future(session.get(f"{running.url}/echo/wait"))
        await token_server.entered.wait()
        running.proc.send_signal(signal.SIGTERM)
        resp = await waiting
        body = await resp.json()
        resp.release()
    assert resp.status == 503
    assert resp.headers["X-Tokenproxy-Error"] == "shutting_down"
    assert body["error"] == "shutting_down"
    token_server.gate.set()
    await running.finish()
    assert running.proc.returncode == 0


async def test_lifecycle_sighup_new_scope_fetches_new_token(start_proxy, token_server, api, tmp_path) -> None:
    """SIGHUP with a new scope: the log says the token request changed, the next request gets a token with the new
    scope, and the old token is not sent again."""
    running = await start_proxy("min_refresh_interval = 0.0")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{running.url}/echo/a") as resp:
            assert resp.status == 200
        path = tmp_path / "c.toml"
        path.write_text(path.read_text().replace("[token]\n", '[token]\nscope = "read write"\n'))
        running.proc.send_signal(signal.SIGHUP)
        await running.expect(r"INFO tokenproxy: config reloaded: token request changed \(scope\): a new token will be fetched")
        async with session.get(f"{running.url}/echo/b") as resp:
            assert resp.status == 200
        async with session.get(f"{running.url}/echo/c") as resp:
            assert resp.status == 200
    assert token_server.count == 2
    assert token_server.calls[-1].form["scope"] == "read write"
    old, new = token_server.issued_access
    assert api.tokens_seen == [old, new, new]
    running.proc.send_signal(signal.SIGTERM)
    log = await running.finish()
    assert "current token kept" not in log


async def test_lifecycle_sighup_turns_the_access_log_on_and_off(start_proxy, tmp_path) -> None:
    """`log.access_log` changed by SIGHUP takes effect for the next request: off, on, off again."""
    running = await start_proxy("[log]\naccess_log = false\n")
    path = tmp_path / "c.toml"
    async with aiohttp.ClientSession() as session:
        for name, access_log in (("a", None), ("b", "true"), ("c", "false")):
            if access_log is not None:
                path.write_text(re.sub(r"access_log = \w+", f"access_log = {access_log}", path.read_text()))
                running.proc.send_signal(signal.SIGHUP)
                await running.expect("config reloaded")
            async with session.get(f"{running.url}/echo/{name}") as resp:
                assert resp.status == 200
            if name == "b":
                await running.expect(r'tokenproxy\.access: "GET /echo/b" 200 ')
    running.proc.send_signal(signal.SIGTERM)
    log = await running.finish()
    assert [line for line in log.splitlines() if "tokenproxy.access" in line] == [
        next(line for line in log.splitlines() if '"GET /echo/b" 200' in line)
    ]


async def test_lifecycle_sighup_same_scope_keeps_token(start_proxy, token_server, api, tmp_path) -> None:
    """SIGHUP with only a timing changed: the current token is kept and still sent."""
    running = await start_proxy()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{running.url}/echo/a") as resp:
            assert resp.status == 200
        path = tmp_path / "c.toml"
        path.write_text(path.read_text().replace("[token]\n", "[token]\nrefresh_before = 10.0\n"))
        running.proc.send_signal(signal.SIGHUP)
        await running.expect("config reloaded: current token kept")
        async with session.get(f"{running.url}/echo/b") as resp:
            assert resp.status == 200
    assert token_server.count == 1
    assert api.tokens_seen == [token_server.issued_access[0]] * 2
    running.proc.send_signal(signal.SIGTERM)
    await running.finish()


async def test_lifecycle_sighup_listen_changed_and_back_warns_once(start_proxy, tmp_path) -> None:
    """server.listen changed then changed back, a SIGHUP after each: one warning, for the first only (the listener
    in force never moved)."""
    running = await start_proxy()
    path = tmp_path / "c.toml"
    started = path.read_text()
    path.write_text(started.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:9"'))
    running.proc.send_signal(signal.SIGHUP)
    await running.expect(
        r"WARNING tokenproxy: config reloaded: server\.listen changed; it takes effect after a restart"
    )
    await running.expect("config reloaded: current token kept")
    path.write_text(started)
    running.proc.send_signal(signal.SIGHUP)
    await running.expect("config reloaded: current token kept")
    running.proc.send_signal(signal.SIGTERM)
    log = await running.finish()
    assert log.count("server.listen changed") == 1


async def test_lifecycle_sighup_bad_config_rejected_old_stays(start_proxy, tmp_path) -> None:
    """SIGHUP with an invalid config: each problem is logged with its key, and the old config keeps serving."""
    running = await start_proxy()
    path = tmp_path / "c.toml"
    path.write_text(path.read_text().replace('[upstream]\nurl = "', '[upstream]\nbogus = 1\nurl = "x'))
    running.proc.send_signal(signal.SIGHUP)
    await running.expect(r"config reload rejected, the old config stays in force: upstream\.bogus: unknown key")
    async with aiohttp.ClientSession() as session, session.get(f"{running.url}/echo/still") as resp:
        assert resp.status == 200
    running.proc.send_signal(signal.SIGTERM)
    log = await running.finish()
    assert "upstream.url: must be an http(s) URL" in log
    assert running.proc.returncode == 0


async def test_lifecycle_json_logs_parse_line_by_line(start_proxy, token_server, tmp_path) -> None:
    """log.format = json: every line on stderr is one JSON object; access lines carry their fields."""
    running = await start_proxy('[log]\nformat = "json"\n')
    async with aiohttp.ClientSession() as session, session.get(f"{running.url}/echo/json?secret=q") as resp:
        assert resp.status == 200
    await running.expect(r'"logger": "tokenproxy.access"')
    running.proc.send_signal(signal.SIGTERM)
    log = await running.finish()
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    access = [r for r in records if r["logger"] == "tokenproxy.access"]
    assert access[0]["status"] == 200 and access[0]["path"] == "/echo/json" and access[0]["generation"] == 1
    refresh = [r for r in records if r["message"].startswith("refresh ok")]
    assert len(refresh) == 1
    for secret in [*token_server.issued_access, token_server.current_refresh, CLIENT_SECRET]:
        assert secret not in log


async def test_lifecycle_reload_changing_credential_voids_refresh_in_flight(make_proxy, token_server, api, client) -> None:
    """A reload that changes the credential while a refresh runs: that token is never sent or saved; the next request gets a new one."""
    import dataclasses
    from pathlib import Path

    from proxy.auth.grants.password import PasswordSettings
    from proxy.runtime.reload import apply_reload
    from tests.fakes.token_server import PASSWORD, USERNAME

    token_server.gate = asyncio.Event()
    proxy = await make_proxy(token={"grant": "client_credentials"})
    waiting = asyncio.ensure_future(client.get(f"{proxy.url}/echo/during"))
    await token_server.entered.wait()
    # The same client now logs a user in: another credential.
    user = PasswordSettings(**dataclasses.asdict(proxy.config.token.settings), username=USERNAME, password=PASSWORD)
    new = dataclasses.replace(proxy.config, token=dataclasses.replace(proxy.config.token, grant="password", settings=user))
    notes = [note.text for note in apply_reload(proxy.app, proxy.config, new)]
    assert notes == ["credential changed (grant, username): a new token will be fetched"]
    token_server.gate.set()
    resp = await waiting
    assert resp.status == 503
    assert resp.headers["X-Tokenproxy-Error"] == "token_unavailable"
    resp.release()
    async with client.get(f"{proxy.url}/echo/after") as after:
        assert after.status == 200
    voided, used = token_server.issued_access
    assert api.tokens_seen == [used]
    assert voided not in Path(proxy.config.token.state_file).read_text()


def _full_collections(metrics: str) -> float:
    """How many times the proxy's garbage collector has scanned every object (generation 2)."""
    match = re.search(r'^python_gc_collections_total\{generation="2"\} (\S+)$', metrics, re.MULTILINE)
    assert match, "the proxy's /metrics lacks python_gc_collections_total"
    return float(match.group(1))


@pytest.mark.timeout(120)
@pytest.mark.skipif(sys.version_info >= (3, 14), reason="3.14's collector is incremental: generation 2 counts its steps")
async def test_lifecycle_a_burst_in_flight_costs_no_full_gc_scan(tmp_path: Path, token_server, api, start_proxy) -> None:
    """2 000 requests held in flight at once (all waiting for the first token) never make the
    proxy's garbage collector rescan its whole heap, and every one is answered after one refresh.

    With CPython's default collector settings this burst costs several full scans (the storm's
    main cost before); /metrics shows the count a platform engineer would look at.
    """
    burst = 2_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * burst + 512  # this process's client sockets plus the proxy's, which inherits the limit
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    token_server.gate = asyncio.Event()
    server = f'admin_listen = "127.0.0.1:0"\nmax_connections = {burst + 64}'
    extra = f"[queue]\nmax_waiting = {burst}\nwait_timeout = 60.0\n[log]\naccess_log = false\n"
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json", extra, server=server)
    try:
        proxy = await start_proxy(path=path)
        assert proxy.proc.stderr is not None
        admin = (await read_until(proxy.proc.stderr, r"admin listening on (http://127\.0\.0\.1:\d+)", proxy.seen)).group(1)
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(f"{admin}/metrics") as resp:
                scans_before = _full_collections(await resp.text())

            async def one(i: int) -> tuple[int, str]:
                async with session.get(f"{proxy.url}/echo/burst-{i}") as resp:
                    return resp.status, (await resp.json())["raw_path"]

            requests = [asyncio.ensure_future(one(i)) for i in range(burst)]
            try:
                for _ in range(10_000):  # bounded: each turn is one /status round trip
                    async with session.get(f"{admin}/status") as resp:
                        if (await resp.json())["waiting"] == burst:
                            break
                else:
                    raise AssertionError("the burst never filled the queue")
                token_server.gate.set()
                answers = await asyncio.gather(*requests)
            finally:
                for request in requests:
                    request.cancel()
            async with session.get(f"{admin}/metrics") as resp:
                scans_after = _full_collections(await resp.text())
    finally:
        token_server.gate.set()  # nothing left held for the fixtures' teardown
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert answers == [(200, f"/echo/burst-{i}") for i in range(burst)]
    assert token_server.count == 1
    assert scans_after == scans_before


async def test_lifecycle_both_ports_time_a_partial_first_packet_and_refuse_big_heads(
    tmp_path: Path, token_server, api, start_proxy
) -> None:
    """On the proxy port and the admin port alike: a new connection whose first packet is an
    incomplete head, then silence, gets 408 after header_timeout (that packet can arrive before the
    connection's request loop has started); an oversized header gets 431; probes are answered meanwhile.
    """
    server = 'admin_listen = "127.0.0.1:0"\nheader_timeout = 0.5\nmax_header_size = 256'
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json", server=server)
    proxy = await start_proxy(path=path)
    assert proxy.proc.stderr is not None
    admin = (await read_until(proxy.proc.stderr, r"admin listening on (http://127\.0\.0\.1:\d+)", proxy.seen)).group(1)

    async def stalled(url: str) -> bytes:
        reader, writer = await open_raw(url)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: c\r\nX-Half: ")  # and nothing more
            return await asyncio.wait_for(read_to_eof(reader), RAW_BOUND)
        finally:
            await close_raw(writer)

    for url in (proxy.url, admin) * 6:  # fresh connections each time: the race is at a connection's start
        waiting = asyncio.ensure_future(stalled(url))
        async with aiohttp.ClientSession() as session, session.get(f"{admin}/healthz") as resp:
            assert resp.status == 200  # a probe meanwhile is answered at once
        slow = parse_response(await waiting)
        assert_proxy_error(slow.status, slow.all, slow.body, 408, "request_timeout")

    for url in (proxy.url, admin):
        big = await raw_exchange(url, b"GET /status HTTP/1.1\r\nHost: c\r\nX-Big: " + b"a" * 1000 + b"\r\n\r\n")
        assert_proxy_error(big.status, big.all, big.body, 431, "headers_too_large")
    assert api.tokens_seen == []  # nothing reached the upstream


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_lifecycle_both_ports_refuse_a_flood_with_503_and_end_stalled_bodies(
    tmp_path: Path, token_server, api, start_proxy, loop: str
) -> None:
    """`tokenproxy run` on each event loop, proxy port and admin port alike: beyond max_connections every new
    connection gets the 503 JSON answer (not a reset) and nothing is logged at ERROR; a request body that stalls
    gets 408 after body_timeout and its connection is closed, freeing its place.
    """
    server = f'loop = "{loop}"\nadmin_listen = "127.0.0.1:0"\nmax_connections = 2\nbody_timeout = 0.5'
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json", server=server)
    proxy = await start_proxy(path=path)
    assert proxy.proc.stderr is not None
    admin = (await read_until(proxy.proc.stderr, r"admin listening on (http://127\.0\.0\.1:\d+)", proxy.seen)).group(1)
    assert f", {loop} loop" in "".join(proxy.seen)

    for url in (proxy.url, admin):
        held = [await open_raw(url) for _ in range(2)]
        try:
            for reader, writer in held:  # both places are taken
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: c\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_BOUND)
                await asyncio.wait_for(reader.readexactly(int(parse_response(head).all("Content-Length")[0])), RAW_BOUND)
            for _ in range(20):
                refused = await raw_exchange(url, b"GET /healthz HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
                assert_proxy_error(refused.status, refused.all, refused.body, 503, "too_many_connections")
            # One of them starts an upload and stalls: 408, closed.
            reader, writer = held[0]
            writer.write(b"POST /upload HTTP/1.1\r\nHost: c\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            data = await read_to_eof(reader)
        finally:
            for _, writer in held:
                await close_raw(writer)
        # The proxy port's handler reads the body: the 408 is its answer. The admin port answers at once
        # without reading it, and then stops waiting for the rest: the connection is closed all the same.
        answers = data.split(b"HTTP/1.1 ")
        if url == proxy.url:
            resp = parse_response(data)
            assert_proxy_error(resp.status, resp.all, resp.body, 408, "request_timeout")
        else:
            assert len(answers) == 2 and b"request_timeout" not in data
        await proxy.expect(r"its request body stalled for 0\.5s \(server\.body_timeout\)")

    proxy.proc.send_signal(signal.SIGTERM)
    log = await proxy.finish()
    assert proxy.proc.returncode == 0, log
    assert " ERROR " not in log and "Traceback" not in log and "AssertionError" not in log
    assert log.count("server.max_connections (2) reached") == 2  # once per port


def _rss_mib(pid: int) -> float:
    """The resident memory of process `pid` in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident memory from /proc")
async def test_lifecycle_stalled_uploads_hold_bounded_memory(tmp_path: Path, token_server, api, start_proxy) -> None:
    """With the default config, 200 uploads of 1 MiB that each stall after 900 KB raise the proxy's resident
    memory by less than 100 MiB, and a normal request is served meanwhile.

    retry.replay_memory (32 MiB) bounds the bodies kept for a resend; the uploads beyond it wait for room
    without being read further (aiohttp reads at most about 200 KB ahead of a handler), so nothing of theirs
    reaches the upstream and its connections stay free. Without the bound they would hold about 200 x 900 KB.
    """
    uploads, sent, limit_mib = 200, 900_000, 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * uploads + 256  # this process's client and upstream sockets, and the proxy's (same limit)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        proxy = await start_proxy()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy.url}/echo/warm") as resp:
                assert resp.status == 200
            before = _rss_mib(proxy.proc.pid)
            head = b"POST /upload HTTP/1.1\r\nHost: c\r\nContent-Length: 1048576\r\n\r\n"
            for _ in range(uploads):
                reader, writer = await open_raw(proxy.url)
                writer.write(head + b"u" * sent)  # and then nothing more
                held.append((reader, writer))
            for _, writer in held:
                await asyncio.wait_for(writer.drain(), RAW_BOUND)
            async with session.get(f"{proxy.url}/echo/meanwhile") as resp:
                assert resp.status == 200
            # The most the proxy holds while the stalled uploads are open (several looks, the highest counts).
            peak = 0.0
            for _ in range(10):
                peak = max(peak, _rss_mib(proxy.proc.pid))
                await asyncio.sleep(0.2)
            async with session.get(f"{proxy.url}/echo/still") as resp:
                assert resp.status == 200
    finally:
        for _, writer in held:
            await close_raw(writer)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert peak - before < limit_mib, f"resident memory went from {before:.0f} MiB to {peak:.0f} MiB"

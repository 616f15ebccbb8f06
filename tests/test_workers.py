"""Workers: `tokenproxy run` with server.workers = 4, as real processes on 127.0.0.1.

Each test starts the command, reads where the group listens from its log,
and stops it (and every worker it saw) by PID at the end, however the test went.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.runtime.workers import describe_exit, resolve_workers, workers_unsupported
from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET, FakeTokenServer
from tests.helpers import read_until, start_cli, write_config

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers need Linux's SO_REUSEPORT"),
    pytest.mark.timeout(180),
]

ENV = {"TEST_CLIENT_SECRET": CLIENT_SECRET}


@pytest.fixture
async def token_server(aiohttp_server: Any) -> AsyncIterator[FakeTokenServer]:
    """The fake authorization server, here one whose answers can be slowed down (`delay`, none by default)."""
    fake = FakeTokenServer()
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    yield fake
BOUND = 60.0  # the longest any one wait here may take (four Python processes starting on a busy machine)
WORKERS = 4


@dataclass
class Group:
    """A running `tokenproxy run` with workers: the parent, where it listens, and everything it logged."""

    proc: asyncio.subprocess.Process
    url: str
    admin: str
    lines: list[str]
    pids: set[int] = field(default_factory=set)  # every worker pid seen, for the clean-up

    def log(self) -> str:
        """Everything logged so far."""
        return "".join(self.lines)

    async def status(self) -> dict[str, Any]:
        """The group's /status document; the worker pids in it are remembered for the clean-up."""
        async with aiohttp.ClientSession() as session, session.get(f"{self.admin}/status") as response:
            document: dict[str, Any] = await response.json()
        self.pids.update(w["pid"] for w in document["workers"] if w["pid"])
        return document


async def _drain(stream: asyncio.StreamReader, lines: list[str]) -> None:
    """Keep reading the group's log so that its pipe never fills."""
    while line := await stream.readline():
        lines.append(line.decode())


def _is_worker(pid: int) -> bool:
    """Whether `pid` is still a tokenproxy worker (not a reused pid)."""
    try:
        return b"--worker-link" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def eventually(check: Callable[[], Awaitable[bool]], what: str, bound: float = BOUND) -> None:
    """Poll `check` until it is true; fail naming `what` after `bound` seconds."""
    deadline = time.monotonic() + bound
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound}s: {what}")
        await asyncio.sleep(0.05)


async def _gone(pids: set[int]) -> bool:
    return not any(_is_worker(pid) for pid in pids)


@contextlib.asynccontextmanager
async def running_group(config: Path, *args: str) -> AsyncIterator[Group]:
    """Start `tokenproxy run -c CONFIG ARGS` and wait until all its workers listen; stop it all by PID after.

    The group's private runtime directory goes in `run/` beside the config ($XDG_RUNTIME_DIR), so
    that a parent a test kills leaves nothing behind outside the test's own directory.
    """
    runtime = config.parent / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    proc = await start_cli("run", "-c", str(config), *args, env={**ENV, "XDG_RUNTIME_DIR": str(runtime)})
    assert proc.stderr is not None
    lines: list[str] = []
    drain: asyncio.Task[None] | None = None
    group: Group | None = None
    try:
        admin = (await read_until(proc.stderr, r"admin for the workers listening on (\S+)", lines, BOUND)).group(1)
        found = await read_until(proc.stderr, r"(\d+) workers listening on (\S+) \(pids ([\d ]+)\)", lines, BOUND)
        group = Group(proc, found.group(2), admin, lines, {int(pid) for pid in found.group(3).split()})
        drain = asyncio.create_task(_drain(proc.stderr, lines))
        yield group
    finally:
        pids = set(group.pids) if group is not None else set()
        pids.update(int(pid) for pid in re.findall(r"\(pid (\d+)\)", "".join(lines)))
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), BOUND)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        with contextlib.suppress(AssertionError):
            await eventually(lambda: _gone(pids), "workers gone", bound=BOUND)
        for pid in pids:
            if _is_worker(pid):
                os.kill(pid, signal.SIGKILL)
        if drain is not None:
            await asyncio.wait_for(drain, BOUND)


def group_config(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, *, fetch_on_start: bool = False, extra: str = ""
) -> Path:
    """Four workers in front of the fakes, an admin port, no access log; the token shared through a state file.

    With `fetch_on_start` the first worker takes the token before the others start, and they
    find it in the state file: a load test needs no refresh (and no lock between the workers).
    """
    server = f'admin_listen = "127.0.0.1:0"\nworkers = {WORKERS}\nfetch_on_start = {str(fetch_on_start).lower()}'
    return write_config(
        tmp_path / "c.toml",
        token_server,
        api,
        tmp_path / "state.json",
        server=server,
        extra=extra + "\n[log]\naccess_log = false\n",
    )


async def send(url: str, count: int, concurrency: int = 16) -> list[int]:
    """`count` GETs of /echo, `concurrency` at a time, each on a new connection; their statuses."""
    statuses: list[int] = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        semaphore = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with semaphore, session.get(f"{url}/echo") as response:
                await response.read()
                statuses.append(response.status)

        await asyncio.gather(*(one() for _ in range(count)))
    return statuses


def per_worker(metrics: str, name: str, labels: str) -> dict[str, float]:
    """The value of series `name{labels,worker=...}` for each worker, from a /metrics text."""
    series = re.compile(rf"^{name}\{{([^}}]*)\}} (\S+)$", re.MULTILINE)
    values: dict[str, float] = {}
    for names, value in series.findall(metrics):
        worker = re.search(r'(?:^|,)worker="(\d+)"', names)
        if labels in names.split(",") and worker is not None:
            values[worker.group(1)] = values.get(worker.group(1), 0.0) + float(value)
    return values


async def get_text(url: str) -> str:
    """The body of a GET, as text."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


async def test_workers_four_serve_a_load_all_answered(tmp_path: Path, token_server: FakeTokenServer, api: FakeApi) -> None:
    """Four workers answer 400 requests on new connections, all 200, and more than one of them takes a share."""
    async with running_group(group_config(tmp_path, token_server, api, fetch_on_start=True)) as group:
        statuses = await send(group.url, 400)
        assert statuses == [200] * 400
        served = per_worker(await get_text(f"{group.admin}/metrics"), "tokenproxy_requests_total", 'status_class="2xx"')
        assert sum(1 for count in served.values() if count > 0) >= 2, served


async def test_workers_metrics_count_every_request_once(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """The group's /metrics labels each worker's series with `worker`; their 2xx counters add up to the requests sent."""
    async with running_group(group_config(tmp_path, token_server, api, fetch_on_start=True)) as group:
        await send(group.url, 120)
        metrics = await get_text(f"{group.admin}/metrics")
        served = per_worker(metrics, "tokenproxy_requests_total", 'status_class="2xx"')
        assert sorted(served) == ["0", "1", "2", "3"]
        assert sum(served.values()) == 120
        assert 'tokenproxy_workers{state="serving"} 4.0' in metrics
        assert 'tokenproxy_worker_restarts_total{worker="0"} 0.0' in metrics


async def test_workers_status_lists_each_worker(tmp_path: Path, token_server: FakeTokenServer, api: FakeApi) -> None:
    """/status has one entry per worker: its own pid, start time, restarts and its own status document."""
    async with running_group(group_config(tmp_path, token_server, api)) as group:
        document = await group.status()
        workers = document["workers"]
        assert [w["worker"] for w in workers] == [0, 1, 2, 3]
        assert len({w["pid"] for w in workers}) == 4 and group.proc.pid not in {w["pid"] for w in workers}
        assert all(w["state"] == "serving" and w["restarts"] == 0 and w["started"] for w in workers)
        assert all(w["status"]["grant"] == "refresh_token" for w in workers)
        # No token yet and no lazy readiness: every worker says so, and so does the group.
        assert document["ready"] is False and document["reason"] == "no_token_yet"


async def test_workers_killed_worker_is_restarted_and_group_keeps_serving(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """A worker SIGKILLed is logged with its signal and started again; requests meanwhile all succeed."""
    async with running_group(group_config(tmp_path, token_server, api, fetch_on_start=True)) as group:
        victim = (await group.status())["workers"][1]["pid"]
        os.kill(victim, signal.SIGKILL)

        async def reaped() -> bool:
            worker = (await group.status())["workers"][1]
            return worker["pid"] != victim or worker["state"] != "serving"

        # Connections the killed worker had queued die with it; those opened after its exit go to the others.
        await eventually(reaped, "the supervisor saw worker 1 end")
        assert await send(group.url, 100) == [200] * 100

        async def restarted() -> bool:
            worker = (await group.status())["workers"][1]
            return worker["state"] == "serving" and worker["restarts"] == 1 and worker["pid"] != victim

        await eventually(restarted, "worker 1 serving again")
        assert f"worker 1 (pid {victim}) was killed by SIGKILL; starting it again in 0.5s" in group.log()
        assert await send(group.url, 100) == [200] * 100


async def test_workers_sigterm_stops_every_process(tmp_path: Path, token_server: FakeTokenServer, api: FakeApi) -> None:
    """SIGTERM to the parent stops every worker; the parent exits 0 after them, and says so."""
    async with running_group(group_config(tmp_path, token_server, api)) as group:
        pids = {w["pid"] for w in (await group.status())["workers"]}
        group.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(group.proc.wait(), BOUND) == 0
        assert await _gone(pids)
        assert "all 4 workers stopped" in group.log()


async def test_workers_parent_killed_workers_exit(tmp_path: Path, token_server: FakeTokenServer, api: FakeApi) -> None:
    """A parent SIGKILLed leaves no worker behind: each sees its link close and stops."""
    async with running_group(group_config(tmp_path, token_server, api)) as group:
        pids = {w["pid"] for w in (await group.status())["workers"]}
        group.proc.kill()
        await group.proc.wait()
        await eventually(lambda: _gone(pids), "every worker exited after its parent was killed")
        assert group.log().count("the supervising process has gone: stopping") == 4


async def test_workers_sighup_reaches_each_worker(tmp_path: Path, token_server: FakeTokenServer, api: FakeApi) -> None:
    """SIGHUP to the parent makes every worker reload: a live key (ready_before_token) changes in each."""
    config = group_config(tmp_path, token_server, api)
    async with running_group(config) as group:
        assert {w["status"]["reason"] for w in (await group.status())["workers"]} == {"no_token_yet"}
        config.write_text(config.read_text().replace("[server]", "[server]\nready_before_token = true"))
        group.proc.send_signal(signal.SIGHUP)

        async def all_ready() -> bool:
            return all(w["status"]["ready"] for w in (await group.status())["workers"])

        await eventually(all_ready, "every worker ready before its first token")
        assert "SIGHUP passed on to 4 workers" in group.log()
        async with aiohttp.ClientSession() as session, session.get(f"{group.admin}/readyz") as response:
            assert response.status == 200


async def test_workers_start_error_reported_once_with_single_process_code(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """A token endpoint down with fetch_on_start: one line, the single process's, and its exit code 1."""
    token_server.mode = "500"
    config = group_config(tmp_path, token_server, api, fetch_on_start=True)
    proc = await start_cli("run", "-c", str(config), env=ENV)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), BOUND)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    failures = [line for line in err.decode().splitlines() if line.startswith("tokenproxy: no token at start")]
    assert len(failures) == 1, err.decode()


async def test_workers_unix_socket_refused(tmp_path: Path, token_server: FakeTokenServer, api: FakeApi) -> None:
    """Workers on a unix socket: exit 2 and one line naming server.workers."""
    config = group_config(tmp_path, token_server, api)
    config.write_text(config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "unix:{tmp_path}/s"', 1))
    proc = await start_cli("run", "-c", str(config), env=ENV)
    _, err = await asyncio.wait_for(proc.communicate(), BOUND)
    assert proc.returncode == 2
    assert err.decode().splitlines() == [
        f"config: server.workers: a unix socket (server.listen = 'unix:{tmp_path}/s') is served by one process; "
        "set workers = 1 or listen on a TCP port, got 4"
    ]


async def test_workers_private_state_dir_when_no_state_file(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """With token.state_file empty the workers share one token through a 0600 state file in a private 0700
    directory under $XDG_RUNTIME_DIR, which is gone after the group stops."""
    config = group_config(tmp_path, token_server, api, fetch_on_start=True)
    config.write_text(config.read_text().replace(f'state_file = "{tmp_path / "state.json"}"', 'state_file = ""'))
    runtime = tmp_path / "run"  # running_group's $XDG_RUNTIME_DIR
    async with running_group(config) as group:
        (private,) = runtime.iterdir()
        assert private.stat().st_mode & 0o777 == 0o700
        assert (private / "state.json").stat().st_mode & 0o777 == 0o600
        assert await send(group.url, 40) == [200] * 40
        fingerprints = {w["status"]["token"]["fingerprint"] for w in (await group.status())["workers"]}
        assert len(fingerprints) == 1 and None not in fingerprints
        assert len(token_server.calls) == 1
    assert group.proc.returncode == 0
    assert list(runtime.iterdir()) == []


async def test_workers_routes_credentials_without_state_file_share_the_private_one(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """Two routes' credentials with `state_file = ""` in four workers: the private state file holds both, so the
    group fetches one token per credential, not one per worker and credential."""
    config = tmp_path / "c.toml"
    credentials = "".join(
        f"""
[credentials.{name}]
grant = "client_credentials"
token_url = "{token_server.base_url}/oauth/token"
client_id = "{CLIENT_ID}"
client_secret = "${{TEST_CLIENT_SECRET}}"
scope = "{name}"
state_file = ""
"""
        for name in ("one", "two")
    )
    routes = "".join(
        f'\n[[route]]\nname = "{name}"\npath_prefix = "/{name}"\nstrip_prefix = true\nurl = "{api.base_url}"\n'
        f'token = "{name}"\n'
        for name in ("one", "two")
    )
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
workers = {WORKERS}
fetch_on_start = true
[log]
access_log = false
{credentials}{routes}"""
    )
    config.chmod(0o600)
    async with running_group(config) as group:
        for name in ("one", "two"):
            assert await send(f"{group.url}/{name}", 20) == [200] * 20
        (private,) = (tmp_path / "run").iterdir()
        saved = json.loads((private / "state.json").read_text())["credentials"]
    assert len(saved) == 2
    scopes = sorted(call.form.get("scope", "") for call in token_server.calls)
    assert scopes == ["one", "two"], scopes


async def test_workers_share_rotating_token_one_refresh_per_expiry(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """Four workers against a slow (300 ms) rotating, reuse-detecting token server, three expiries under load:
    every request succeeds, one refresh per expiry for the whole group, no refresh token presented twice."""
    token_server.delay, token_server.lifetime, token_server.jwt_lifetime = 0.3, 3.0, 3.0
    # No token at start: the first requests reach all four workers at once, and they must agree on one refresh.
    config = group_config(tmp_path, token_server, api, extra="refresh_before = 1.0\nmin_refresh_interval = 0.5")
    async with running_group(config) as group:
        statuses: list[int] = []
        done = asyncio.Event()

        async def client() -> None:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                while not done.is_set():
                    async with session.get(f"{group.url}/echo") as response:
                        await response.read()
                        statuses.append(response.status)

        async def three_expiries() -> bool:
            return len(token_server.arrivals) >= 4 or token_server.reuse_detected  # the first token, then 3

        clients = [asyncio.create_task(client()) for _ in range(8)]
        try:
            await eventually(three_expiries, "three expiries under load")
        finally:
            done.set()
            await asyncio.gather(*clients)
    assert not token_server.reuse_detected
    assert statuses and set(statuses) == {200}
    presented = [call.form.get("refresh_token") for call in token_server.calls]
    assert len(presented) == len(set(presented))
    # One refresh per expiry: a second refresh of the same expiry would come while the first is in flight.
    gaps = [later - earlier for earlier, later in itertools.pairwise(token_server.arrivals)]
    assert min(gaps) > 1.0, gaps


def test_workers_elsewhere_than_linux_one_process_with_reason() -> None:
    """Off Linux the group is one process, and the warning says why; on Linux nothing is said."""
    assert workers_unsupported("linux") is None
    assert workers_unsupported("darwin") == (
        "server.workers: workers need Linux's SO_REUSEPORT load balancing, which darwin does not have: "
        "serving with one process"
    )


def test_workers_zero_is_one_per_usable_cpu() -> None:
    """`server.workers = 0` is the number of CPUs this process may run on; other counts are taken as they are."""
    assert resolve_workers(0) == len(os.sched_getaffinity(0))
    assert resolve_workers(3) == 3


def test_workers_exit_described_in_words() -> None:
    """A worker's end reads as its status or the signal's name."""
    assert describe_exit(1) == "exited with status 1"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"


async def test_workers_log_lines_name_their_worker(tmp_path: Path, token_server: FakeTokenServer, api: FakeApi) -> None:
    """Each worker's lines say which worker wrote them (`[worker N]`), its access lines too; the parent's do not."""
    config = group_config(tmp_path, token_server, api)
    config.write_text(config.read_text().replace("access_log = false", "access_log = true"))
    async with running_group(config) as group:
        assert await send(group.url, 8) == [200] * 8

        def access_lines() -> list[str]:
            return [line for line in group.log().splitlines() if "tokenproxy.access:" in line]

        async def all_written() -> bool:
            return len(access_lines()) == 8

        await eventually(all_written, "the 8 access lines written")
        access = re.compile(r' INFO \[worker [0-3]\] tokenproxy\.access: "GET /echo" 200 ')
        assert all(access.search(line) for line in access_lines()), access_lines()
        started = [line for line in group.log().splitlines() if "listening on" in line]
        named = {m.group(1) for line in started if (m := re.search(r"\[worker (\d)\] tokenproxy", line))}
        assert named == {"0", "1", "2", "3"}, started
        assert any("workers listening on" in line and "[worker" not in line for line in started)  # the parent's own

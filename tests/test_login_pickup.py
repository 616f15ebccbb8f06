"""A running `tokenproxy run` takes up a `tokenproxy login` without a restart; `logout` and `login` share its lock.

Real processes: the proxy and the CLI run as subprocesses against the fake
authorization server (tests/fakes/auth_server.py), whose device flow
approves at once (the test plays the person) and whose small API accepts
the access tokens it issued.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.runtime.credentials import credential_of
from proxy.tokens.store import FileStore, SavedState
from tests.fakes.auth_server import PUBLIC_CLIENT, FakeAuthServer
from tests.fakes.token_server import FakeClock, FakeTokenServer
from tests.helpers import (
    REDIS_SERVER,
    ProxyFactory,
    RedisServer,
    assert_proxy_error,
    free_port,
    read_until,
    run_cli,
    saved_entry,
    start_cli,
    stop_process,
)

# Bound for the proxy to take up a login (it looks at most once a second) or for a process to reach a point.
BOUND = 20.0


@pytest.fixture
async def auth_server(aiohttp_server: Any) -> AsyncIterator[FakeAuthServer]:
    """The fake authorization server, on 127.0.0.1; a held refresh is let go at the end."""
    fake = FakeAuthServer(device_interval=1)
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    yield fake
    if fake.refresh_gate is not None:
        fake.refresh_gate.set()


def pickup_config(path: Path, fake: FakeAuthServer, state: Path, extra: str = "") -> str:
    """A login config (no secret) whose proxy refreshes on any 401 at once: min_refresh_interval = 0."""
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[upstream]\nurl = "{fake.base_url}"\n[token]\ngrant = "refresh_token"\n'
        f'issuer = "{fake.issuer}"\nclient_id = "{PUBLIC_CLIENT}"\nclient_auth = "none"\nstate_file = "{state}"\n'
        f"min_refresh_interval = 0\n{extra}"
    )
    return str(path)


class RunningProxy:
    """`tokenproxy run` as a subprocess: its URL, and its log read as it comes (so its pipe never fills)."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, lines: list[str]) -> None:
        self.proc = proc
        self.url = url
        self.lines = lines
        self._reader = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode())

    async def wait_for_log(self, pattern: str) -> str:
        """The first log line matching `pattern`, polled for at most BOUND seconds."""
        deadline = time.monotonic() + BOUND
        while time.monotonic() < deadline:
            for line in self.lines:
                if re.search(pattern, line):
                    return line
            await asyncio.sleep(0.05)  # polling the log with a deadline
        raise AssertionError(f"no log line matching {pattern!r}:\n" + "".join(self.lines))

    async def get(self, client: aiohttp.ClientSession) -> tuple[int, Any]:
        """GET /api through the proxy: status and JSON body."""
        async with client.get(f"{self.url}/api") as resp:
            return resp.status, await resp.json()

    async def until(self, client: aiohttp.ClientSession, status: int) -> Any:
        """GET /api until it answers `status` (at most BOUND seconds): that answer's body."""
        deadline = time.monotonic() + BOUND
        seen: list[int] = []
        while time.monotonic() < deadline:
            got, body = await self.get(client)
            if got == status:
                return body
            seen.append(got)
            await asyncio.sleep(0.1)  # polling with a deadline: the proxy looks at most once a second
        raise AssertionError(f"never {status} within {BOUND}s: got {sorted(set(seen))}\n" + "".join(self.lines))

    async def stop(self) -> str:
        """Kill it by PID and reap it; everything it logged."""
        if self.proc.returncode is None:
            self.proc.kill()
        assert self.proc.stdout is not None
        await asyncio.wait_for(asyncio.gather(self._reader, self.proc.stdout.read(), self.proc.wait()), BOUND)
        return "".join(self.lines)


async def start_proxy(config: str) -> RunningProxy:
    """Start `tokenproxy run -c config` and wait until it listens."""
    proc = await start_cli("run", "-c", config)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        url = (await read_until(proc.stderr, r"listening on (http://127\.0\.0\.1:\d+)", lines)).group(1)
    except BaseException:
        await stop_process(proc)
        raise
    return RunningProxy(proc, url, lines)


@pytest.fixture
async def proxies() -> AsyncIterator[list[RunningProxy]]:
    """The proxies a test starts (append them), each killed by PID at its end."""
    started: list[RunningProxy] = []
    yield started
    for proxy in started:
        await proxy.stop()


async def login(config: str) -> None:
    """`tokenproxy login --flow device`: the fake approves at once; exit 0."""
    code, out, err = await run_cli("login", "-c", config, "--flow", "device")
    assert (code, err) == (0, ""), out


def saved(state: Path) -> dict[str, Any]:
    """The state the state file holds for the one credential."""
    return saved_entry(state)


async def test_login_pickup_run_before_any_login_serves_after_login(
    auth_server: FakeAuthServer, tmp_path: Path, proxies: list[RunningProxy]
) -> None:
    """`run` started before anyone logged in answers 503 login_required; after `tokenproxy login` the same
    process serves with the login's token, no restart, and the token endpoint was not asked for it again."""
    state = tmp_path / "state.json"
    config = pickup_config(tmp_path / "c.toml", auth_server, state)
    proxy = await start_proxy(config)
    proxies.append(proxy)
    async with aiohttp.ClientSession() as client:
        status, body = await proxy.get(client)
        assert (status, body["error"]) == (503, "login_required")
        assert body["detail"] == "no refresh token is known; log in again"  # none was presented, none rejected
        await login(config)
        assert await proxy.until(client, 200) == {"ok": True}
        assert (await proxy.get(client))[0] == 200
    assert auth_server.accepted == [auth_server.issued_access[0]] * 2
    assert auth_server.refreshes == []  # the login's token was adopted as it is
    await proxy.wait_for_log(r"found a new login \(generation 1\) in the saved state: login_required is over")


async def test_login_pickup_after_revoked_refresh_token(
    auth_server: FakeAuthServer, tmp_path: Path, proxies: list[RunningProxy]
) -> None:
    """The grant is revoked: the refresh is refused (login_required, the refused token is not presented again);
    after a new `tokenproxy login` the running proxy serves with the new token."""
    state = tmp_path / "state.json"
    config = pickup_config(tmp_path / "c.toml", auth_server, state)
    await login(config)
    proxy = await start_proxy(config)
    proxies.append(proxy)
    async with aiohttp.ClientSession() as client:
        assert await proxy.get(client) == (200, {"ok": True})
        auth_server.revoke_grants()
        status, _ = await proxy.get(client)
        assert status == 401  # the API's own answer: its token was refused and the refresh failed
        await proxy.wait_for_log(r"refresh failed for good grant=refresh_token reason=.*invalid_grant")
        assert auth_server.refreshes == [auth_server.issued_refresh[0]]
        await login(config)
        assert await proxy.until(client, 200) == {"ok": True}
    assert auth_server.accepted[-1] == auth_server.issued_access[1]
    assert auth_server.refreshes == [auth_server.issued_refresh[0]]  # presented once, never again
    assert saved(state)["generation"] == 2


async def test_login_pickup_logout_then_login(
    auth_server: FakeAuthServer, tmp_path: Path, proxies: list[RunningProxy]
) -> None:
    """After `tokenproxy logout` a running proxy keeps its access token until the API refuses it (or it
    expires); its refresh then finds the logout and answers 503 login_required without presenting the refresh
    token; a new login is taken up without a restart."""
    state = tmp_path / "state.json"
    config = pickup_config(tmp_path / "c.toml", auth_server, state)
    await login(config)
    proxy = await start_proxy(config)
    proxies.append(proxy)
    async with aiohttp.ClientSession() as client:
        assert await proxy.get(client) == (200, {"ok": True})
        code, _, err = await run_cli("logout", "-c", config)
        assert (code, err) == (0, "")
        assert saved(state)["generation"] == 2
        assert await proxy.get(client) == (200, {"ok": True})  # the access token in memory is still good
        auth_server.refuse_access()
        assert (await proxy.get(client))[0] == 401  # its refresh found the logout: the API's 401 goes through
        await proxy.wait_for_log(r"the state file says the credential was logged out \(tokenproxy logout\)")
        status, body = await proxy.get(client)
        assert (status, body["error"]) == (503, "login_required")
        assert auth_server.refreshes == []  # the logged-out refresh token was never presented
        await login(config)
        assert await proxy.until(client, 200) == {"ok": True}
    assert auth_server.accepted == [auth_server.issued_access[0]] * 2 + [auth_server.issued_access[1]]
    assert saved(state)["generation"] == 3


def _holds_open(pid: int, path: Path) -> bool:
    """True when process `pid` has `path` open (Linux: /proc/PID/fd)."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fds / fd) == str(path) for fd in os.listdir(fds))
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see the login reach the lock")
async def test_login_waits_for_the_lock_of_a_refresh_in_flight(
    auth_server: FakeAuthServer, tmp_path: Path, proxies: list[RunningProxy]
) -> None:
    """A login whose save meets the state file's lock held by a proxy mid-refresh (its token endpoint held) waits
    for it, then saves after it: the proxy's refresh is saved and serves its request, the login's generation
    comes after it, and the proxy then moves to the login's tokens without calling the endpoint."""
    state = tmp_path / "state.json"
    lock = tmp_path / "state.json.lock"
    # The held refresh must outlast the second login's start on a loaded machine (the lock wait is timeout + 5 s;
    # store.lease_ttl, 15 s, bounds token.timeout).
    config = pickup_config(tmp_path / "c.toml", auth_server, state, "timeout = 14\n[queue]\nwait_timeout = 30\n")
    await login(config)
    proxy = await start_proxy(config)
    proxies.append(proxy)
    async with aiohttp.ClientSession() as client:
        assert await proxy.get(client) == (200, {"ok": True})
        auth_server.refuse_access()
        auth_server.refresh_gate = asyncio.Event()
        held = asyncio.create_task(proxy.get(client))  # 401 -> the refresh, under the lock, held at the endpoint
        second = None
        try:
            await asyncio.wait_for(auth_server.refresh_arrived.wait(), BOUND)
            auth_server.device_issued.clear()
            second = await start_cli("login", "-c", config, "--flow", "device")
            await asyncio.wait_for(auth_server.device_issued.wait(), BOUND)
            deadline = time.monotonic() + BOUND
            while not _holds_open(second.pid, lock):  # the login has its tokens and is at the lock
                assert time.monotonic() < deadline, "the login never opened the lock file"
                await asyncio.sleep(0.02)  # polling /proc with a deadline
            assert saved(state)["generation"] == 1  # nothing saved while the proxy holds the lock
            auth_server.refresh_gate.set()
            assert await asyncio.wait_for(held, BOUND) == (200, {"ok": True})
            out, err = await asyncio.wait_for(second.communicate(), BOUND)
            assert (second.returncode, err) == (0, b""), out
        finally:
            auth_server.refresh_gate.set()
            if second is not None and second.returncode is None:
                await stop_process(second)
            if not held.done():
                held.cancel()
                await asyncio.gather(held, return_exceptions=True)
        # issued: [0] the first login, [1] the second login (while the refresh was held), [2] the proxy's refresh
        assert auth_server.accepted[-1] == auth_server.issued_access[2]
        after = saved(state)
        assert (after["generation"], after["refresh_token"]) == (3, auth_server.issued_refresh[1])
        auth_server.refused_access.add(auth_server.issued_access[2])  # the proxy's token is refused: a refresh
        assert await proxy.get(client) == (200, {"ok": True})
    assert auth_server.accepted[-1] == auth_server.issued_access[1]  # the login's token, adopted
    assert auth_server.refreshes == [auth_server.issued_refresh[0]]


async def test_login_pickup_looks_at_most_once_a_second(
    make_proxy: ProxyFactory, token_server: FakeTokenServer, client: aiohttp.ClientSession
) -> None:
    """While login_required, the saved state is looked at again at most once a second, not per request: a login
    saved meanwhile is taken up by the first request a second after the failure, and then serves."""
    clock = FakeClock()
    proxy = await make_proxy(clock=clock, token={"refresh_token": ""})

    async def ask() -> tuple[int, Any, bytes]:
        async with client.get(f"{proxy.url}/echo/x") as resp:
            return resp.status, resp.headers.getall, await resp.read()

    assert_proxy_error(*await ask(), 503, "login_required")
    FileStore(Path(proxy.config.token.state_file)).save(
        SavedState(credential_of(proxy.config.token), "", "", 0.0, 0.0, token_server.current_refresh, 1)
    )
    assert_proxy_error(*await ask(), 503, "login_required")
    clock.advance(0.5)
    assert_proxy_error(*await ask(), 503, "login_required")
    assert token_server.calls == []
    clock.advance(0.5)
    assert (await ask())[0] == 200
    assert (await ask())[0] == 200
    assert [call.form.get("grant_type") for call in token_server.calls] == ["refresh_token"]
    assert proxy.tokens.status().generation == 2


async def test_login_pickup_redis_store_login_on_another_machine_reaches_a_running_replica(
    auth_server: FakeAuthServer, tmp_path: Path, proxies: list[RunningProxy]
) -> None:
    """With `store.backend = "redis"`, a login run with a state file of its own (another machine) is saved into
    Redis: a running replica takes it up without a restart; after the replica rotated the refresh token, `logout`
    there revokes the live one (Redis's), not the spent one its own file holds."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server not found (`.ci/run` installs Debian's redis-server)")
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        store = f'[store]\nbackend = "redis"\nurl = "{redis.url}"\n'
        replica = pickup_config(tmp_path / "replica.toml", auth_server, tmp_path / "replica.json", store)
        laptop = pickup_config(tmp_path / "laptop.toml", auth_server, tmp_path / "laptop.json", store)
        proxy = await start_proxy(replica)
        proxies.append(proxy)
        async with aiohttp.ClientSession() as client:
            status, body = await proxy.get(client)
            assert (status, body["error"]) == (503, "login_required")
            await login(laptop)
            assert await proxy.until(client, 200) == {"ok": True}
            auth_server.refuse_access()  # the replica refreshes: Redis holds the rotated refresh token
            assert await proxy.get(client) == (200, {"ok": True})
        assert auth_server.refreshes == [auth_server.issued_refresh[0]]
        code, out, err = await run_cli("logout", "-c", laptop)
        assert (code, err) == (0, ""), out
        assert auth_server.revoked[-1] == auth_server.issued_refresh[1]
    finally:
        redis.stop()


async def test_login_redis_store_unreachable_refused_before_the_person_logs_in(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    """A Redis store nobody answers at: `login` exits 1 naming it before any flow starts (nothing to lose)."""
    port = free_port()
    store = f'[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:{port}/0"\n'
    config = pickup_config(tmp_path / "c.toml", auth_server, tmp_path / "s.json", store)
    code, out, err = await run_cli("login", "-c", config, "--flow", "device")
    assert (code, out) == (1, "")
    assert err == f"login: the token store Redis at 127.0.0.1:{port} could not be reached (store.url)\n"
    assert auth_server.polls == 0

"""One state file shared by several processes on one host: the lock around a refresh, peers' tokens, corrupt files.

Real processes (`tokenproxy run`, `tokenproxy token`) against a token server that rotates refresh tokens,
detects reuse and answers slowly; and, for what one process can show, managers in this process that each
lock the state file as a process would (a BSD lock belongs to one open file, not to the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.auth.grants.oauth import OAuthSettings
from proxy.auth.protocol import GrantContext
from proxy.auth.registry import GRANTS
from proxy.core.errors import TokenUnavailable
from proxy.tokens.coordination import CoordinationUnavailable
from proxy.tokens.file_lock import FileLockCoordination
from proxy.tokens.manager import RefreshPolicy, TokenManager
from proxy.tokens.store import FileStore
from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET, FakeTokenServer
from tests.helpers import read_until, run_cli, saved_entry, start_cli, write_config

ENV = {"TEST_CLIENT_SECRET": CLIENT_SECRET}
LIFETIME = 6.0  # seconds a token lives in the process tests
REFRESH_BEFORE = 3.0  # so each token is replaced 3 s after it was fetched
EXPIRIES = 3  # expiries a load test lives through: EXPIRIES + 1 tokens in all
POLICY = RefreshPolicy(
    refresh_before=30.0,
    min_refresh_interval=0.0,
    default_lifetime=300.0,
    timeout=5.0,
    backoff_initial=1.0,
    backoff_max=60.0,
    max_waiting=10,
    wait_timeout=10.0,
)

# -- managers in this process, each with a lock of its own on the shared file --------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The grants' HTTP session."""
    async with aiohttp.ClientSession() as http:
        yield http


def peer(
    token_server: FakeTokenServer,
    session: aiohttp.ClientSession,
    state: Path,
    wait: float = 10.0,
    refresh_token: str | None = None,
) -> TokenManager:
    """A manager standing for one process: its own store object and file lock on the shared state file.

    Configured with `refresh_token`, by default the token server's current one.
    """
    settings = OAuthSettings(
        token_url=f"{token_server.base_url}/oauth/token",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        client_auth="post",
    )
    grant = GRANTS["refresh_token"].build(settings, GrantContext(session, timeout=5.0, default_lifetime=300.0))
    store = FileStore(state)
    return TokenManager(
        grant,
        store,
        POLICY,
        refresh_token=refresh_token or token_server.current_refresh,
        credential="shared",
        coordination=FileLockCoordination(store, wait=wait),
    )


@contextlib.contextmanager
def lock_held_elsewhere(state: Path) -> Iterator[None]:
    """The state file's lock, held as another process would hold it, for the body."""
    state.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(f"{state}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def lock_is_free(state: Path) -> bool:
    """True when nobody holds the state file's lock (taken and let go at once)."""
    fd = os.open(f"{state}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


async def test_shared_state_lock_file_beside_state_file_0600(
    token_server: FakeTokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The first refresh creates `<state_file>.lock`, 0600, in the 0700 state directory, and leaves it unlocked."""
    state = tmp_path / "state" / "tokens.json"
    tokens = peer(token_server, session, state)

    await tokens.get()

    lock = Path(f"{state}.lock")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600 and stat.S_IMODE(state.parent.stat().st_mode) == 0o700
    assert lock_is_free(state)
    await tokens.close()


async def test_shared_state_rotation_only_save_noticed_spent_token_never_presented(
    token_server: FakeTokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A peer saved only a rotated refresh token (same generation): the next refresh presents it, no reuse."""
    state = tmp_path / "state" / "tokens.json"
    first, second = peer(token_server, session, state), peer(token_server, session, state)
    seen = await first.get()
    assert (await second.get()) == seen  # adopted: one call so far
    token_server.mode = "no_token"  # the next answer rotates the refresh token and gives no access token
    with pytest.raises(TokenUnavailable):
        await first.refresh_now()
    assert saved_entry(state)["generation"] == 1
    token_server.mode = "ok"

    renewed = await second.renew(seen, "invalid_token")

    assert renewed is not None and renewed.generation == 2
    assert token_server.count == 3 and not token_server.reuse_detected
    await first.close()
    await second.close()


async def test_shared_state_generation_continues_from_peer(
    token_server: FakeTokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A process that joins late numbers its first token one above the highest generation a peer saved."""
    state = tmp_path / "state" / "tokens.json"
    configured = token_server.current_refresh
    first = peer(token_server, session, state)
    token = await first.get()
    for _ in range(3):
        token = await first.renew(token, "invalid_token")  # type: ignore[assignment]
    # Configured like the first (its refresh token long spent), not resumed: it learns the file under the lock.
    late = peer(token_server, session, state, refresh_token=configured)

    fetched = await late.refresh_now()

    assert token.generation == 4 and fetched.generation == 5
    assert not token_server.reuse_detected
    await first.close()
    await late.close()


async def test_shared_state_lock_held_too_long_fails_and_backs_off(
    token_server: FakeTokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A peer holding the lock past the bound: token_unavailable naming the lock, no token call, back-off."""
    state = tmp_path / "state" / "tokens.json"
    tokens = peer(token_server, session, state, wait=0.2)

    with lock_held_elsewhere(state), pytest.raises(TokenUnavailable, match="another process held the state file lock"):
        await tokens.get()

    assert token_server.count == 0
    assert tokens.status().failures == 1 and tokens.status().backoff_until > 0
    await tokens.close()


async def test_shared_state_cancelled_waiter_never_holds_the_lock(tmp_path: Path) -> None:
    """A refresh cancelled while it waits for the lock leaves it free once its holder lets go."""
    state = tmp_path / "state" / "tokens.json"
    coordination = FileLockCoordination(FileStore(state), wait=30.0)
    entered = asyncio.Event()

    async def refresh() -> None:
        async with coordination.refresh_right("shared"):
            entered.set()

    with lock_held_elsewhere(state):
        waiter = asyncio.create_task(refresh())
        for _ in range(3):
            await asyncio.sleep(0)  # the waiter runs: it finds the lock taken and pauses before asking again
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert lock_is_free(state) and not entered.is_set()


async def test_shared_state_unavailable_lock_file_is_a_coordination_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock file planted as a link is not followed: the right is refused; the log (not the reason) names it."""
    state = tmp_path / "state" / "tokens.json"
    state.parent.mkdir(mode=0o700)
    Path(f"{state}.lock").symlink_to(tmp_path / "elsewhere")
    coordination = FileLockCoordination(FileStore(state), wait=1.0)

    with pytest.raises(CoordinationUnavailable) as refused:
        async with coordination.refresh_right("shared"):
            pass
    assert refused.value.reason == "cannot open the state lock file"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"cannot open the state lock file: state lock file {state}.lock is a symbolic link, which is not followed: "
        "remove it"
    ]
    assert not (tmp_path / "elsewhere").exists()


# -- a corrupt state file ------------------------------------------------------------------------------------


def corrupt_files(state: Path) -> list[Path]:
    """The state files moved aside, oldest first."""
    return sorted(state.parent.glob(f"{state.name}.corrupt-*"))


def corrupt_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings about a corrupt state file."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "is corrupt" in r.getMessage()]


async def test_shared_state_corrupt_file_at_start_moved_aside_0600_warned_once(
    make_proxy,
    token_server: FakeTokenServer,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """A state file that is not JSON is renamed `.corrupt-<UTC time>`, 0600, with one warning naming both paths."""
    state = tmp_path / "state" / "state.json"  # where make_proxy keeps it
    state.parent.mkdir(mode=0o700)
    state.write_text('{"access_token": "CORRUPT-SECRET-CONTENT"')
    state.chmod(0o644)

    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 200

    [aside] = corrupt_files(state)
    assert aside.read_text() == '{"access_token": "CORRUPT-SECRET-CONTENT"'
    assert stat.S_IMODE(aside.stat().st_mode) == 0o600
    assert corrupt_warnings(caplog) == [
        f"state file {state} is corrupt (not JSON): moved it aside to {aside} (0600); it is not used"
    ]
    assert "CORRUPT-SECRET-CONTENT" not in caplog.text
    assert saved_entry(state)["generation"] == 1 and token_server.count == 1


async def test_shared_state_corrupt_file_seen_under_the_lock_moved_aside(
    make_proxy,
    token_server: FakeTokenServer,
    api: FakeApi,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A state file broken while the proxy runs (wrong fields) is moved aside at the next refresh, not overwritten."""
    proxy = await make_proxy()
    async with client.get(f"{proxy.url}/echo/warm") as resp:
        assert resp.status == 200
    state = Path(proxy.config.token.state_file)
    state.write_text(json.dumps({"credential": "x", "generation": "many"}))

    api.expire_all(token_server.issued_access)
    async with client.get(f"{proxy.url}/echo/again") as resp:
        assert resp.status == 200

    [aside] = corrupt_files(state)
    assert json.loads(aside.read_text()) == {"credential": "x", "generation": "many"}
    assert corrupt_warnings(caplog) == [
        f"state file {state} is corrupt (fields missing or of the wrong type): moved it aside to {aside} (0600); "
        "it is not used"
    ]
    assert saved_entry(state)["generation"] == 2 and not token_server.reuse_detected


# -- real processes ------------------------------------------------------------------------------------------


class ProxyProcess:
    """A `tokenproxy run` process: its URL; its standard error read on in the background (kept in `lines`)."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, lines: list[str]) -> None:
        self.proc = proc
        self.url = url
        self.lines = lines
        self._reader = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode())

    async def wait_for_line(self, text: str, deadline: float = 30.0) -> None:
        """Poll the lines read so far until one holds `text`."""
        end = time.monotonic() + deadline
        while not any(text in line for line in self.lines):
            assert time.monotonic() < end, f"no line with {text!r}:\n" + "".join(self.lines)
            await asyncio.sleep(0.02)

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal the process by its PID and wait for it to end (killed after 20 s)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await asyncio.wait_for(self._reader, 20)


@contextlib.asynccontextmanager
async def proxy_processes(config: Path, count: int, *args: str) -> AsyncIterator[list[ProxyProcess]]:
    """`count` `tokenproxy run` processes on one config, each stopped by PID at the end."""
    started: list[ProxyProcess] = []
    try:
        for _ in range(count):
            proc = await start_cli("run", "-c", str(config), *args, env=ENV)
            lines: list[str] = []
            try:
                assert proc.stderr is not None
                match = await read_until(proc.stderr, r"listening on (http://127\.0\.0\.1:\d+)", lines)
            except BaseException:
                proc.kill()
                await proc.wait()
                raise
            started.append(ProxyProcess(proc, match.group(1), lines))
        yield started
    finally:
        for process in started:
            await process.stop()


def slow_rotating(token_server: FakeTokenServer) -> None:
    """Short-lived tokens from a slow server (300 ms an answer) that rotates refresh tokens and detects reuse."""
    token_server.lifetime = LIFETIME
    token_server.jwt_lifetime = LIFETIME
    token_server.delay = 0.3


def shared_config(tmp_path: Path, token_server: FakeTokenServer, api: FakeApi) -> Path:
    """One config, one state file, for every process of a test."""
    return write_config(
        tmp_path / "c.toml",
        token_server,
        api,
        tmp_path / "state" / "state.json",
        extra=f"refresh_before = {REFRESH_BEFORE}\nmin_refresh_interval = 0.0\n[log]\naccess_log = false\n",
    )


async def load(urls: list[str], clients: int, stop: asyncio.Event) -> list[int]:
    """`clients` tasks per URL sending requests one after another until `stop`; every status seen."""
    statuses: list[int] = []
    async with aiohttp.ClientSession() as http:

        async def one_client(url: str, name: str) -> None:
            sent = 0
            while not stop.is_set():
                async with http.get(f"{url}/echo/{name}-{sent}") as resp:
                    statuses.append(resp.status)
                    await resp.read()
                sent += 1

        await asyncio.gather(*(one_client(url, f"c{i}") for url in urls for i in range(clients)))
    return statuses


async def until_tokens(token_server: FakeTokenServer, count: int, deadline: float = 90.0) -> None:
    """Poll until the token server has issued `count` access tokens."""
    end = time.monotonic() + deadline
    while len(token_server.issued_access) < count:
        assert time.monotonic() < end, f"only {len(token_server.issued_access)} tokens issued"
        await asyncio.sleep(0.05)


def assert_one_refresh_per_expiry(token_server: FakeTokenServer) -> None:
    """Every refresh call succeeded and presented the refresh token the call before it got, and none came early.

    A second refresh for the same expiry would arrive right after the first one (a peer that did not
    adopt the new token), where a due one comes REFRESH_BEFORE seconds after the token was fetched: no
    two calls are closer than half that.
    """
    assert not token_server.reuse_detected
    assert token_server.count == len(token_server.issued_access) >= EXPIRIES + 1
    gaps = [later - earlier for earlier, later in zip(token_server.arrivals, token_server.arrivals[1:], strict=False)]
    assert min(gaps) > (LIFETIME - REFRESH_BEFORE) / 2, gaps


async def test_shared_state_proxy_and_token_command_refresh_once_per_expiry(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """`tokenproxy run` under load and `tokenproxy token` called again and again: one refresh per expiry, no reuse."""
    slow_rotating(token_server)
    config = shared_config(tmp_path, token_server, api)
    printed: list[str] = []
    async with proxy_processes(config, 1) as [proxy]:
        stop = asyncio.Event()
        loading = asyncio.create_task(load([proxy.url], 4, stop))
        try:
            while len(token_server.issued_access) < EXPIRIES + 1:
                code, out, err = await run_cli("token", "-c", str(config), env=ENV)
                assert code == 0, err
                printed.append(out.strip())
                assert time.monotonic() - token_server.arrivals[0] < 90
        finally:
            stop.set()
            statuses = await loading

    assert statuses and set(statuses) == {200}
    assert len(printed) >= 2 and set(printed) <= set(token_server.issued_access)
    assert_one_refresh_per_expiry(token_server)


async def test_shared_state_two_proxies_refresh_once_per_expiry(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """Two `tokenproxy run` on one state file, both under load: one refresh per expiry in all, no reuse."""
    slow_rotating(token_server)
    config = shared_config(tmp_path, token_server, api)
    async with proxy_processes(config, 2) as proxies:
        stop = asyncio.Event()
        loading = asyncio.create_task(load([p.url for p in proxies], 3, stop))
        try:
            await until_tokens(token_server, EXPIRIES + 1)
        finally:
            stop.set()
            statuses = await loading

    assert statuses and set(statuses) == {200}
    assert_one_refresh_per_expiry(token_server)
    # Each token was used (the last may have come as the load stopped).
    assert set(token_server.issued_access[:-1]) <= set(api.tokens_seen)


async def test_shared_state_lock_holder_killed_mid_refresh_other_proxy_carries_on(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """The proxy holding the lock is SIGKILLed while its token call is held: the other takes the lock, no reuse."""
    config = shared_config(tmp_path, token_server, api)
    token_server.lifetime = token_server.jwt_lifetime = 300.0
    token_server.drop_abandoned = True
    async with proxy_processes(config, 2, "--log-level", "debug") as (holder, other), aiohttp.ClientSession() as http:
        async with http.get(f"{holder.url}/echo/first") as resp:
            assert resp.status == 200
        api.expire_all(token_server.issued_access)
        held = token_server.gate = asyncio.Event()
        token_server.entered.clear()

        async def status(url: str) -> int:
            async with http.get(url) as resp:
                return resp.status

        holding = waiting = None
        try:
            holding = asyncio.create_task(status(f"{holder.url}/echo/held"))
            await asyncio.wait_for(token_server.entered.wait(), 20)  # the holder's call is at the server
            waiting = asyncio.create_task(status(f"{other.url}/echo/other"))
            await other.wait_for_line("refresh starts")  # the other waits for the lock
            token_server.gate = None  # calls from now on are answered; the held one stays held
            holder.proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(waiting, 30) == 200
            with pytest.raises(aiohttp.ClientError):
                await asyncio.wait_for(holding, 30)
        finally:
            held.set()  # the dead holder's call goes on at the server, finds its client gone, spends nothing
            for task in (holding, waiting):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        await holder.stop()

    assert holder.proc.returncode == -signal.SIGKILL
    assert token_server.count == 3 and len(token_server.issued_access) == 2
    assert not token_server.reuse_detected
    saved = saved_entry(tmp_path / "state" / "state.json")
    assert saved["generation"] == 2 and saved["refresh_token"] == token_server.current_refresh


def test_shared_state_planted_lock_file_refused_at_start(tmp_path: Path) -> None:
    """A lock file owned by another uid is refused by the store's check like a planted state file."""
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir(mode=0o700)
    lock = Path(f"{state}.lock")
    lock.write_text("")
    lock.chmod(0o600)
    os.chown(lock, 12345, -1)

    with pytest.raises(PermissionError, match=r"state lock file .* is owned by uid 12345"):
        FileStore(state).check()


async def test_shared_state_check_waits_for_the_lock_then_fails_naming_it(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """`tokenproxy check` refreshes under the lock too: held by another process past its bound, exit 1, no call."""
    state = tmp_path / "state" / "state.json"
    config = write_config(tmp_path / "c.toml", token_server, api, state, extra="timeout = 0.5\n")

    with lock_held_elsewhere(state):
        code, out, err = await run_cli("check", "-c", str(config), env=ENV)

    assert (code, out) == (1, "")
    assert err == (
        "check: token_unavailable: another process held the state file lock for more than 5.5s\n"
    )
    assert token_server.count == 0


@pytest.mark.parametrize("command", ["check", "token"])
async def test_shared_state_corrupt_file_check_and_token_say_they_moved_it_aside(
    token_server: FakeTokenServer, api, tmp_path: Path, command: str
) -> None:
    """`check` and `token`, which print no log lines, still print the one warning naming both paths when they move
    a corrupt state file aside; its content is not shown."""
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir(mode=0o700)
    state.write_text('{"access_token": "CORRUPT-SECRET-CONTENT"')
    state.chmod(0o600)
    config = write_config(tmp_path / "c.toml", token_server, api, state)
    code, out, err = await run_cli(command, "-c", str(config), env=ENV)
    assert code == 0
    [aside] = corrupt_files(state)
    warned = [line for line in err.splitlines() if "is corrupt" in line]
    assert len(warned) == 1
    assert warned[0].endswith(f"state file {state} is corrupt (not JSON): moved it aside to {aside} (0600); it is not used")
    assert "CORRUPT-SECRET-CONTENT" not in out + err

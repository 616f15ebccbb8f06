"""The Redis store: replicas sharing one token through a real redis-server, with `tokenproxy` processes."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.api_server import FakeApi
from tests.fakes.tls import TestCa
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET, FakeTokenServer
from tests.helpers import REDIS_SERVER, RedisServer, free_port, read_until, run_cli, start_cli, stop_process

ENV = {"TEST_CLIENT_SECRET": CLIENT_SECRET}
# Bound for a condition a test waits for (a refresh, a restart) on a loaded 2-core machine.
BOUND = 60.0


def _config(
    path: Path,
    token_server: FakeTokenServer,
    api: FakeApi,
    store: str,
    *,
    grant: str = "refresh_token",
    token: str = "",
    queue: str = "",
) -> Path:
    """A `tokenproxy run` config in front of the fakes, with `store` as its `[store]` body."""
    refresh = f'refresh_token = "{token_server.current_refresh}"' if grant == "refresh_token" else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
url = "{api.base_url}"
[token]
grant = "{grant}"
token_url = "{token_server.base_url}/oauth/token"
client_id = "{CLIENT_ID}"
client_secret = "${{TEST_CLIENT_SECRET}}"
{refresh}
state_file = "{path.parent / "state" / "state.json"}"
min_refresh_interval = 0.0
{token}
[queue]
{queue}
[log]
access_log = false
[store]
{store}
"""
    )
    path.chmod(0o600)
    return path


def _redis(server: RedisServer, prefix: str, lease_ttl: float = 15.0) -> str:
    return f'backend = "redis"\nurl = "{server.url}"\nkey_prefix = "{prefix}"\nlease_ttl = {lease_ttl}'


class Replica:
    """One running `tokenproxy run`: its URLs, and every line it wrote on stderr (read as it comes)."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, admin: str, lines: list[str]) -> None:
        self.proc, self.url, self.admin, self.lines = proc, url, admin, lines
        assert proc.stderr is not None
        self._drain = asyncio.create_task(self._read(proc.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        for _ in range(1_000_000):
            line = await stream.readline()
            if not line:
                return
            self.lines.append(line.decode())

    async def stop(self) -> None:
        """Kill it by PID and reap it."""
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), BOUND)
        await asyncio.wait_for(self._drain, BOUND)

    @property
    def log(self) -> str:
        """What it wrote on stderr so far."""
        return "".join(self.lines)


@asynccontextmanager
async def replicas(*configs: Path) -> AsyncIterator[list[Replica]]:
    """Start one `tokenproxy run` per config; every one is killed by PID when the block ends."""
    started: list[Replica] = []
    procs: list[asyncio.subprocess.Process] = []
    try:
        for config in configs:
            proc = await start_cli("run", "-c", str(config), env=ENV)
            procs.append(proc)
            assert proc.stderr is not None
            seen: list[str] = []
            url = await read_until(proc.stderr, r"listening on (http://127\.0\.0\.1:\d+)", seen, timeout=BOUND)
            admin = await read_until(proc.stderr, r"admin listening on (http://127\.0\.0\.1:\d+)", seen, timeout=BOUND)
            started.append(Replica(proc, url.group(1), admin.group(1), seen))
        yield started
    finally:
        for replica in started:
            await replica.stop()
        for proc in procs[len(started) :]:
            await stop_process(proc)


async def poll(condition: Any, what: str, bound: float = BOUND) -> None:
    """Poll `condition()` (sync or async) until it is true; fail naming `what` after `bound` seconds."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)  # a poll interval, not a settle delay
    raise AssertionError(f"not within {bound}s: {what}")


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as resp:
        body = await resp.read()
        return resp.status, json.loads(body) if resp.content_type == "application/json" else body


def _shared_state(server: RedisServer, prefix: str) -> dict[str, Any] | None:
    """The state Redis holds under `prefix` (one credential), or None."""
    client = server.client()
    try:
        keys = [k for k in client.keys(f"{prefix}*") if b":" not in k[len(prefix) :]]
        if not keys:
            return None
        raw = client.hget(keys[0], "state")
        return json.loads(raw) if raw else None
    finally:
        client.close()


def _refresh_calls(token_server: FakeTokenServer) -> list[str]:
    return [call.form.get("refresh_token", "") for call in token_server.calls if call.path == "/oauth/token"]


# --- configuration and start-up ------------------------------------------------------------------


async def test_store_url_not_redis_exits_2_naming_the_key(tmp_path: Path, token_server: FakeTokenServer, api: FakeApi) -> None:
    """A store.url that is no redis:// URL is a config error: exit 2, one line naming the key."""
    config = _config(tmp_path / "c.toml", token_server, api, 'backend = "redis"\nurl = "http://user:pw-SECRET@h:1"')
    code, out, err = await run_cli("check", "-c", str(config), env=ENV)
    assert code == 2
    assert "config: store.url: must start with redis:// or rediss://\n" in err
    assert "pw-SECRET" not in out + err


async def test_store_lease_ttl_below_token_timeout_exits_2(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """A lease shorter than the token call it guards is refused, naming store.lease_ttl."""
    config = _config(
        tmp_path / "c.toml", token_server, api, 'backend = "redis"\nurl = "redis://127.0.0.1:1/0"\nlease_ttl = 3.0'
    )
    code, _, err = await run_cli("check", "-c", str(config), env=ENV)
    assert code == 2
    assert (
        "config: store.lease_ttl: must be at least token.timeout (10s), so a lease outlives the token call it "
        "guards, got 3.0\n" in err
    )


async def test_store_file_backend_takes_any_token_timeout(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """`store.lease_ttl` bounds only Redis leases: with the file store a token.timeout above it is fine."""
    config = _config(tmp_path / "c.toml", token_server, api, "", grant="client_credentials", token="timeout = 30.0")
    code, out, err = await run_cli("token", "-c", str(config), env=ENV)
    assert code == 0, err
    assert out.strip() == token_server.issued_access[-1]


@pytest.mark.parametrize("command", ["run", "check", "token"])
async def test_store_unreachable_at_start_exits_1_naming_the_host(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, command: str
) -> None:
    """A Redis nobody listens on: exit 1 naming host and port, the password nowhere, no token call."""
    port = free_port()
    store = f'backend = "redis"\nurl = "redis://u:pw-SECRET-1@127.0.0.1:{port}/0"'
    config = _config(tmp_path / "c.toml", token_server, api, store)
    code, out, err = await run_cli(command, "-c", str(config), env=ENV)
    assert code == 1
    assert f"store_unavailable: the token store Redis at 127.0.0.1:{port} could not be reached (store.url)" in err
    assert "no token at start" not in err  # the store stopped the start, not a token fetch
    assert "pw-SECRET-1" not in out + err
    assert "Traceback" not in err
    assert token_server.count == 0


async def test_store_wrong_password_exits_1_without_the_password(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, redis_server: RedisServer
) -> None:
    """An ACL user with the wrong password: exit 1, host named, the password in no output."""
    client = redis_server.client()
    try:
        client.execute_command("ACL", "SETUSER", "tp-user", "on", ">right-pw-1234", "~*", "&*", "+@all")
    finally:
        client.close()
    store = f'backend = "redis"\nurl = "redis://tp-user:wrong-PW-5678@127.0.0.1:{redis_server.port}/0"'
    config = _config(tmp_path / "c.toml", token_server, api, store)
    code, out, err = await run_cli("check", "-c", str(config), env=ENV)
    assert code == 1
    assert (
        f"check: store_unavailable: the token store Redis at 127.0.0.1:{redis_server.port} refused the "
        "credentials (store.url)\n" in err
    )
    assert "wrong-PW-5678" not in out + err


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, Path]]:
    """A redis-server of the test's own that speaks TLS only, its certificate from a test CA; and the CA file."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server not found (`.ci/run` installs Debian's redis-server)")
    (tmp_path / "redis-tls").mkdir()
    ca = TestCa(tmp_path / "redis-tls")
    cert, key = ca.issue("redis", client=False)
    server = RedisServer(tmp_path / "redis-tls", tls=(cert, key, ca.ca_file))
    server.start()
    try:
        yield server, ca.ca_file
    finally:
        server.stop()


async def test_store_rediss_with_ca_file_keeps_the_state_over_tls(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, tls_redis: tuple[RedisServer, Path]
) -> None:
    """`rediss://` with `store.ca_file` naming the CA that signed Redis's certificate: the token is had and kept."""
    server, ca_file = tls_redis
    store = f'backend = "redis"\nurl = "{server.url}"\nkey_prefix = "tls:"\nca_file = "{ca_file}"'
    config = _config(tmp_path / "c.toml", token_server, api, store, grant="client_credentials")
    code, out, err = await run_cli("token", "-c", str(config), env=ENV)
    assert code == 0, err
    assert out.strip() == token_server.issued_access[-1]
    state = _shared_state(server, "tls:")
    assert state is not None and state["access_token"] == token_server.issued_access[-1]


async def test_store_rediss_without_the_ca_exits_1_naming_the_host(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, tls_redis: tuple[RedisServer, Path]
) -> None:
    """`rediss://` to a Redis whose certificate no trusted CA signed (no `store.ca_file`): exit 1 naming the host."""
    server, _ = tls_redis
    store = f'backend = "redis"\nurl = "{server.url}"\nkey_prefix = "tls:"'
    config = _config(tmp_path / "c.toml", token_server, api, store, grant="client_credentials")
    code, out, err = await run_cli("token", "-c", str(config), env=ENV)
    assert code == 1
    assert (
        f"token: store_unavailable: the token store Redis at 127.0.0.1:{server.port} presented a TLS certificate "
        "that is not trusted (store.ca_file names the CA to trust)\n" in err
    ), err
    assert "Traceback" not in err and out == ""
    assert token_server.count == 0


# --- many replicas --------------------------------------------------------------------------------


async def test_store_three_replicas_one_refresh_per_expiry_no_reuse(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, redis_server: RedisServer
) -> None:
    """3 proxies sharing Redis under load across 3+ expiries of a slow rotating server: all 200, one refresh each."""
    token_server.delay = 0.3
    token_server.lifetime = 4
    token_server.jwt_lifetime = 4
    prefix = f"t{secrets.token_hex(4)}:"
    configs = [
        _config(tmp_path / name / "c.toml", token_server, api, _redis(redis_server, prefix), token="refresh_before = 1.5")
        for name in ("a", "b", "c")
    ]
    statuses: list[int] = []
    stop = asyncio.Event()
    scraped: list[str] = []

    def total(series: str) -> float:
        return sum(float(m.group(1)) for text in scraped for m in re.finditer(re.escape(series) + r" (\S+)", text))

    async def load(session: aiohttp.ClientSession, url: str) -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            status, _ = await _get(session, f"{url}/echo/load")
            statuses.append(status)

    async with replicas(*configs) as running, aiohttp.ClientSession() as session:
        began = time.monotonic()
        workers = [asyncio.create_task(load(session, r.url)) for r in running for _ in range(3)]
        try:
            await poll(lambda: token_server.count >= 4 or any(t.done() for t in workers), "three refreshes after the first")
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), BOUND)
        elapsed = time.monotonic() - began

        async def settled() -> bool:
            # The call that ended the load may still be on its way back: wait until its token is saved.
            scraped[:] = [(await _get(session, f"{r.admin}/metrics"))[1].decode() for r in running]
            return total('tokenproxy_store_tokens_total{source="own"}') == token_server.count

        await poll(settled, "the last token call answered and saved")
        logs = [r.log for r in running]
    assert statuses and set(statuses) == {200}
    assert not token_server.reuse_detected and not token_server.revoked
    calls = _refresh_calls(token_server)
    assert len(calls) == len(set(calls))  # every refresh token presented once
    # A token lives 4 s and is renewed 1.5 s before it ends: one refresh per 2.5 s for all three together.
    assert 4 <= token_server.count <= int(elapsed / 2.5) + 1
    assert sum(log.count("adopted token") for log in logs) >= 2

    # Every token call was made by one replica, holding the lease; the others adopted what it saved.
    assert total('tokenproxy_store_tokens_total{source="own"}') == token_server.count
    assert total('tokenproxy_store_tokens_total{source="adopted"}') >= 2
    # Summed over the replicas, refreshes with result "ok" are the token calls; the adoptions are counted apart.
    ok = 'tokenproxy_refreshes_total{credential="default",grant="refresh_token",result="ok"}'
    adopted = 'tokenproxy_refreshes_total{credential="default",grant="refresh_token",result="adopted"}'
    assert total(ok) == token_server.count
    assert total(adopted) == total('tokenproxy_store_tokens_total{source="adopted"}')
    assert total('tokenproxy_store_leases_total{event="acquired"}') >= token_server.count
    state = _shared_state(redis_server, prefix)
    assert state is not None and state["refresh_token"] == token_server.current_refresh


async def test_store_lease_holder_killed_before_its_call_another_takes_over(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, redis_server: RedisServer
) -> None:
    """SIGKILL of the lease holder while its token call hangs: another replica refreshes once the lease ends."""
    prefix = f"t{secrets.token_hex(4)}:"
    store = _redis(redis_server, prefix, lease_ttl=2.0)
    token = "timeout = 2.0"
    first = _config(tmp_path / "a" / "c.toml", token_server, api, store, token=token)
    second = _config(tmp_path / "b" / "c.toml", token_server, api, store, token=token, queue="wait_timeout = 20.0")
    spent_before = set(token_server.used_refresh)
    async with replicas(first, second) as (a, b), aiohttp.ClientSession() as session:
        token_server.mode = "hang"  # a's call never gets an answer: the refresh token is not spent
        held = asyncio.create_task(_get(session, f"{a.url}/echo/a"))
        try:
            await asyncio.wait_for(token_server.entered.wait(), BOUND)
            token_server.mode = "ok"
            waiting = asyncio.create_task(_get(session, f"{b.url}/echo/b"))
            await poll(lambda: token_server.count >= 1, "a's token call")
            a.proc.kill()
            status, body = await asyncio.wait_for(waiting, BOUND)
        finally:
            held.cancel()
            await asyncio.gather(held, return_exceptions=True)
        assert status == 200, body
        assert "adopted" not in b.log
    assert token_server.count == 2
    assert not token_server.reuse_detected and not token_server.revoked
    assert token_server.used_refresh - spent_before == {_refresh_calls(token_server)[1]}


# --- Redis down and back --------------------------------------------------------------------------


async def test_store_down_rotating_grant_answers_503_store_unavailable_and_recovers(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, own_redis: RedisServer
) -> None:
    """Redis stopped: a rotating grant answers 503 store_unavailable and /readyz says so; Redis back empty:
    /readyz is ready again with no request sent (the replica watches for Redis), then re-seeded, 200 again."""
    prefix = "rot:"
    config = _config(tmp_path / "c.toml", token_server, api, _redis(own_redis, prefix))
    async with replicas(config) as (proxy,), aiohttp.ClientSession() as session:
        assert (await _get(session, f"{proxy.url}/echo/1"))[0] == 200
        own_redis.stop()
        api.expire_all(token_server.issued_access)
        status, body = await _get(session, f"{proxy.url}/echo/2")
        assert status == 503
        assert body["error"] == "store_unavailable"
        assert body["detail"].startswith(f"the token store Redis at 127.0.0.1:{own_redis.port} ")
        _, document = await _get(session, f"{proxy.admin}/status")
        assert document["store"] == {"backend": "redis", "host": f"127.0.0.1:{own_redis.port}", "mode": "unavailable"}
        assert (document["ready"], document["reason"]) == (False, "store_unavailable")
        status, body = await _get(session, f"{proxy.admin}/readyz")
        assert (status, body["reason"]) == (503, "store_unavailable")
        own_redis.start()

        async def ready() -> bool:
            return (await _get(session, f"{proxy.admin}/readyz"))[0] == 200

        await poll(ready, "/readyz ready again once Redis answers, with no request to the proxy")
        assert token_server.count == 1

        async def served() -> bool:
            return (await _get(session, f"{proxy.url}/echo/3"))[0] == 200

        await poll(served, "a request served after Redis came back")
        _, metrics = await _get(session, f"{proxy.admin}/metrics")
        log = proxy.log
    assert token_server.count == 2 and not token_server.reuse_detected
    state = _shared_state(own_redis, prefix)
    assert state is not None and state["refresh_token"] == token_server.current_refresh
    assert state["generation"] == 2
    down = re.findall(r"store: Redis at 127\.0\.0\.1:\d+ could not be reached; requests that need a new token get 503", log)
    assert len(down) == 1
    assert f"store: Redis at 127.0.0.1:{own_redis.port} is back; refreshes are shared again" in log
    assert 'tokenproxy_store_mode{mode="shared"} 1.0' in metrics.decode()
    assert 'tokenproxy_store_errors_total{kind="connection"}' in metrics.decode()


async def test_store_down_client_credentials_refreshes_locally_and_reseeds(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi, own_redis: RedisServer
) -> None:
    """Redis stopped: client_credentials keeps serving with local refreshes; Redis back empty: seeded again."""
    prefix = "cc:"
    config = _config(tmp_path / "c.toml", token_server, api, _redis(own_redis, prefix), grant="client_credentials")
    async with replicas(config) as (proxy,), aiohttp.ClientSession() as session:
        assert (await _get(session, f"{proxy.url}/echo/1"))[0] == 200
        own_redis.stop()
        for round_ in range(2):
            api.expire_all(token_server.issued_access)
            assert (await _get(session, f"{proxy.url}/echo/down{round_}"))[0] == 200
        _, document = await _get(session, f"{proxy.admin}/status")
        assert document["store"]["mode"] == "local"
        _, metrics = await _get(session, f"{proxy.admin}/metrics")
        assert 'tokenproxy_store_mode{mode="local"} 1.0' in metrics.decode()
        own_redis.start()
        assert _shared_state(own_redis, prefix) is None

        async def reseeded() -> bool:
            api.expire_all(token_server.issued_access)
            await _get(session, f"{proxy.url}/echo/back")
            return _shared_state(own_redis, prefix) is not None

        await poll(reseeded, "Redis seeded again after it came back")
        log = proxy.log
    assert log.count("refreshing locally, without the other replicas, until it is back") == 1
    assert "is back; refreshes are shared again" in log
    state = _shared_state(own_redis, prefix)
    assert state is not None and state["generation"] >= 3


def test_store_ci_run_is_the_readme_command_and_installs_redis_server() -> None:
    """`.ci/run` runs exactly the README's test command, which installs redis-server with apt-get when missing."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("exactly what `.ci/run` does", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    ci = (root / ".ci" / "run").read_text()
    assert ci.endswith('cd "$(dirname "$0")/.."\n' + block)
    assert block.startswith("command -v redis-server >/dev/null || {")
    assert "apt-get update -qq && $S env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server" in block


def test_store_bench_redis_contender_config_is_valid() -> None:
    """The bench's Redis contender gets a config tokenproxy accepts, with the Redis store in it."""
    import tomllib

    from bench.contenders import BY_NAME, tokenproxy_toml
    from proxy.config import parse_config

    assert BY_NAME["tokenproxy-cc-redis"].store == "redis"
    text = tokenproxy_toml(8080, 8081, "client_credentials", 8082, redis_url="redis://127.0.0.1:6379/0")
    config = parse_config(tomllib.loads(text), {})
    assert (config.store.backend, config.store.url) == ("redis", "redis://127.0.0.1:6379/0")


# --- the lease and the compare-and-set, on one event loop ---------------------------------------


def _coordination(server: RedisServer, prefix: str, metrics: Any, *, lease_ttl: float, wait: float) -> Any:
    from proxy.tokens.redis_store import RedisCoordination, RedisSettings
    from proxy.tokens.store import NullStore

    settings = RedisSettings(server.url, prefix, lease_ttl=lease_ttl, wait_timeout=wait, rotating=True)
    return RedisCoordination(settings, NullStore(), metrics)


def _state(generation: int, refresh: str) -> Any:
    from proxy.tokens.store import SavedState

    return SavedState("cred", "", f"access-{generation}", 2e9, 1e9, refresh, generation)


async def test_store_lease_renewed_while_held_and_released_by_its_owner(redis_server: RedisServer) -> None:
    """A held lease outlives its ttl (renewed), so a peer waits past the ttl in vain; released, the peer gets it."""
    from proxy.observe.metrics import Metrics
    from proxy.tokens.coordination import CoordinationUnavailable

    prefix = f"t{secrets.token_hex(4)}:"
    metrics = Metrics()
    holder = _coordination(redis_server, prefix, metrics, lease_ttl=0.3, wait=5.0)
    peer = _coordination(redis_server, prefix, metrics, lease_ttl=0.3, wait=1.2)
    try:
        async with holder.refresh_right("cred"):
            with pytest.raises(CoordinationUnavailable, match=r"held the refresh lease .* longer than queue\.wait_timeout"):
                async with peer.refresh_right("cred"):
                    pass
        async with peer.refresh_right("cred") as right:
            assert await right.peer_state() is None
    finally:
        await holder.aclose()
        await peer.aclose()
    text = metrics.render().decode()
    assert 'tokenproxy_store_leases_total{event="acquired"} 2.0' in text
    assert 'tokenproxy_store_leases_total{event="waited"} 1.0' in text


async def test_store_lease_a_timed_out_call_took_is_freed_when_redis_wakes(redis_server: RedisServer) -> None:
    """Redis stalls (SIGSTOP) while a replica asks for the lease: the call times out (503 store_unavailable for
    a rotating grant), but its SET lands when Redis wakes. The replica frees that lease then, so a peer gets it
    without waiting out the ttl (60 s here; the peer waits at most 20)."""
    from proxy.core.errors import StoreUnavailable
    from proxy.observe.metrics import Metrics

    prefix = f"t{secrets.token_hex(4)}:"
    metrics = Metrics()
    holder = _coordination(redis_server, prefix, metrics, lease_ttl=60.0, wait=5.0)
    peer = _coordination(redis_server, prefix, metrics, lease_ttl=60.0, wait=20.0)
    try:
        async with holder.refresh_right("cred"):  # a connection to Redis in the holder's pool, as in service
            pass
        redis_server.pause()
        try:
            with pytest.raises(StoreUnavailable):
                async with holder.refresh_right("cred"):
                    pass
        finally:
            redis_server.resume()
        async with peer.refresh_right("cred") as right:
            assert await right.peer_state() is None
    finally:
        await holder.aclose()
        await peer.aclose()
    text = metrics.render().decode()
    assert 'tokenproxy_store_errors_total{kind="timeout"} 1.0' in text


async def test_store_save_refused_when_lease_lost_or_newer_generation(redis_server: RedisServer) -> None:
    """save() raises RefreshRightLost and writes nothing when the lease is gone or Redis holds a newer generation."""
    from proxy.observe.metrics import Metrics
    from proxy.tokens.coordination import RefreshRightLost

    prefix = f"t{secrets.token_hex(4)}:"
    metrics = Metrics()
    first = _coordination(redis_server, prefix, metrics, lease_ttl=15.0, wait=5.0)
    second = _coordination(redis_server, prefix, metrics, lease_ttl=15.0, wait=5.0)
    client = redis_server.client()
    try:
        async with first.refresh_right("cred") as right:
            await right.save(_state(5, "rt-5"))
            client.delete(f"{prefix}cred:lease")  # the lease ended (expired, or taken over)
            with pytest.raises(RefreshRightLost):
                await right.save(_state(6, "rt-6"))
        async with second.refresh_right("cred") as right:
            assert (await right.peer_state()).refresh_token == "rt-5"
            with pytest.raises(RefreshRightLost):
                await right.save(_state(4, "rt-4"))
            await right.save(_state(5, "rt-5b"))  # the same generation again: a rotated refresh token kept
        assert json.loads(client.hget(f"{prefix}cred", "state"))["refresh_token"] == "rt-5b"
        assert client.exists(f"{prefix}cred:lease") == 0
    finally:
        client.close()
        await first.aclose()
        await second.aclose()
    assert 'tokenproxy_store_leases_total{event="lost"} 1.0' in metrics.render().decode()


@pytest.mark.parametrize(
    ("store", "problem"),
    [
        ({"backend": "mysql"}, "store.backend: must be one of file, redis, got 'mysql'"),
        ({"backend": "redis"}, "store.url: is required when store.backend is 'redis'"),
        ({"backend": "redis", "url": "redis://:pw@h:99999/0"}, "store.url: has a port that is not a number from 0 to 65535"),
        ({"backend": "redis", "url": "redis://h:6379/x"}, "store.url: must end with a database number (/0), got /x"),
        ({"backend": "redis", "url": "redis://h", "key_prefix": ""}, "store.key_prefix: must not be empty"),
        ({"backend": "redis", "url": "redis://h", "ca_file": "/no/such"}, "store.ca_file: no such file, got '/no/such'"),
    ],
)
def test_store_config_problems_name_the_key(store: dict[str, str], problem: str) -> None:
    """Each unusable [store] value is one problem line naming its key; a password in the URL is never shown."""
    from proxy.config import ConfigError, parse_config

    raw = {"upstream": {"url": "https://api.example"}, "token": {"refresh_token": "rt"}, "store": store}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, {})
    assert problem in caught.value.problems
    assert not any("pw" in line for line in caught.value.problems)

"""The command line as a user runs it: `tokenproxy run`, `check`, `token`, `demo`, bad configs."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.token_server import CLIENT_SECRET
from tests.helpers import TOKENPROXY, read_until, run_cli, saved_entry, start_cli, write_config


@pytest.mark.parametrize("command", ["run", "check"])
async def test_cli_config_not_utf8_exits_2_in_one_line(tmp_path: Path, command: str) -> None:
    """A config file that is not UTF-8 text (a binary file given by mistake): exit 2, one line, no traceback."""
    path = tmp_path / "binary.toml"
    path.write_bytes(b'[upstream]\nurl = "http://a"\n\xff\xfe')
    code, out, err = await run_cli(command, "-c", str(path))
    assert (code, out, err) == (2, "", f"config: {path}: not UTF-8 text (byte 29)\n")


async def test_cli_bad_config_exits_2_naming_each_key(tmp_path: Path) -> None:
    """A config with several problems exits 2 with one `config: key: ...` line per problem."""
    path = tmp_path / "bad.toml"
    path.write_text('[upstream]\nurl = "api.example.com"\n[queue]\nmax_waiting = "lots"\n[token]\ngrant = "static"\n')
    code, out, err = await run_cli("run", "-c", str(path))
    assert code == 2
    lines = err.strip().splitlines()
    assert "config: upstream.url: must be an http(s) URL, got 'api.example.com'" in lines
    assert "config: queue.max_waiting: must be an integer, got 'lots'" in lines
    assert "config: token.access_token: is required for grant 'static'" in lines
    assert all(line.startswith("config: ") for line in lines)
    assert "Traceback" not in err


async def test_cli_missing_env_variable_exits_2(tmp_path: Path, token_server, api) -> None:
    """An unset ${VAR} is a config error naming the key and the variable."""
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    env = {k: v for k, v in os.environ.items() if k != "TEST_CLIENT_SECRET"}
    proc = await asyncio.create_subprocess_exec(
        *TOKENPROXY, "check", "-c", str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert err.decode().strip() == "config: token.client_secret: environment variable TEST_CLIENT_SECRET is not set"


async def test_cli_config_from_environment_variable(tmp_path: Path) -> None:
    """-c defaults to $TOKENPROXY_CONFIG."""
    path = tmp_path / "env.toml"
    path.write_text('[upstream]\nurl = "nope"\n[token]\ngrant = "static"\naccess_token = "x"\n')
    code, _, err = await run_cli("check", env={"TOKENPROXY_CONFIG": str(path)})
    assert code == 2
    assert "config: upstream.url: must be an http(s) URL, got 'nope'" in err


async def test_cli_check_prints_expiry_never_the_token(tmp_path: Path, token_server, api) -> None:
    """`check` fetches one token, prints its fingerprint and expiry, and persists the rotated refresh token."""
    state = tmp_path / "state" / "s.json"
    path = write_config(tmp_path / "c.toml", token_server, api, state)
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    assert code == 0, err
    assert out.startswith("ok: grant refresh_token, token ")
    assert "expires" in out
    assert token_server.count == 1
    assert token_server.issued_access[0] not in out + err
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert saved_entry(state)["refresh_token"] == token_server.current_refresh


async def test_cli_check_failure_exits_1_with_code(tmp_path: Path, token_server, api) -> None:
    """`check` against a refusing token endpoint exits 1 with the error code, no secret."""
    token_server.mode = "invalid_grant"
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    code, out, err = await run_cli("check", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    assert code == 1
    assert err.startswith("check: login_required: ")
    assert CLIENT_SECRET not in out + err


async def test_cli_token_prints_a_valid_access_token(tmp_path: Path, token_server, api) -> None:
    """`token` prints exactly the access token, for scripts."""
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    code, out, err = await run_cli("token", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    assert code == 0, err
    assert out.strip() == token_server.issued_access[-1]


@pytest.mark.parametrize(("loop", "client"), [("uvloop", "fast"), ("asyncio", "session")])
async def test_cli_run_serves_until_sigterm(tmp_path: Path, token_server, api, loop: str, client: str) -> None:
    """`tokenproxy run` serves a burst of new connections with the bearer, logs access lines, exits 0 on SIGTERM.

    With each event loop and each way to the upstream; the start line names both.
    """
    path = write_config(
        tmp_path / "c.toml", token_server, api, tmp_path / "s.json", server=f'loop = "{loop}"', upstream=f'client = "{client}"'
    )
    proc = await start_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        match = await read_until(proc.stderr, r"listening on http://127\.0\.0\.1:(\d+).*, (\w+) client, (\w+) loop", seen)
        assert (match.group(2), match.group(3)) == (client, loop)
        url = f"http://127.0.0.1:{match.group(1)}"
        async with aiohttp.ClientSession() as session, session.get(f"{url}/echo/cli?q=1") as resp:
            assert resp.status == 200
            assert (await resp.json())["raw_path"] == "/echo/cli?q=1"
        await read_until(proc.stderr, r'"GET /echo/cli" 200 .* resent=no gen=1', seen)
        # 300 clients connecting at once, each on a connection of its own: every one is served.
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(i: int) -> tuple[int, str]:
                async with session.get(f"{url}/echo/burst-{i}") as resp:
                    return resp.status, (await resp.json())["raw_path"]

            answers = await asyncio.gather(*(one(i) for i in range(300)))
        assert answers == [(200, f"/echo/burst-{i}") for i in range(300)]
        assert len(api.tokens_seen) == 301 and set(api.tokens_seen) == {token_server.issued_access[0]}
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 20)  # type: ignore[union-attr]
        await asyncio.wait_for(proc.wait(), 20)
    log = "".join(seen) + rest.decode()
    assert proc.returncode == 0, log
    for secret in [CLIENT_SECRET, *token_server.issued_access, *token_server.used_refresh, token_server.current_refresh]:
        assert secret not in log


async def test_cli_run_defaults_to_loopback() -> None:
    """Without --listen the proxy's default address is 127.0.0.1:8080."""
    from proxy.config import parse_config

    config = parse_config({"upstream": {"url": "http://a"}, "token": {"grant": "static", "access_token": "t"}}, {})
    assert config.server.listen == "127.0.0.1:8080"


@pytest.mark.timeout(60)
async def test_cli_demo_serves_through_proxy_across_expiry(tmp_path: Path) -> None:
    """`tokenproxy demo` serves a request through the proxy, and one after the demo token expired."""
    proc = await start_cli("demo", "--lifetime", "2")
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        match = await read_until(proc.stdout, r"PROXY_URL=(http://127\.0\.0\.1:\d+)", seen)
        url = match.group(1)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/hello") as resp:
                assert resp.status == 200
                first = await resp.json()
            # The demo token's own expiry is real time; wait exactly until it has passed.
            await asyncio.sleep(first["token_expires_in"] + 0.5)
            async with session.get(f"{url}/hello") as resp:
                assert resp.status == 200
                second = await resp.json()
        assert second["user"] == "demo-user"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    assert "eyJ" not in err.decode() + "".join(seen)


async def test_cli_run_fetch_on_start_and_admin_listener(tmp_path: Path, token_server, api) -> None:
    """With fetch_on_start the token is fetched before the listener opens; the admin port answers /readyz."""
    extra = '[server]\nlisten = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\nfetch_on_start = true\n'
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    path.write_text(path.read_text().replace('[server]\nlisten = "127.0.0.1:0"\n', extra))
    proc = await start_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, r"first token \w{8} obtained before listening", seen)
        assert token_server.count == 1
        await read_until(proc.stderr, r"listening on http://127\.0\.0\.1:(\d+)", seen)
        admin = await read_until(proc.stderr, r"admin listening on (http://127\.0\.0\.1:\d+)", seen)
        async with aiohttp.ClientSession() as session, session.get(f"{admin.group(1)}/readyz") as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0


async def test_cli_run_fetch_on_start_failure_exits_1(tmp_path: Path, token_server, api) -> None:
    """With fetch_on_start and a refusing token endpoint, `run` exits 1 naming the error, never listening."""
    token_server.mode = "invalid_client"
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    path.write_text(path.read_text().replace('[server]\n', '[server]\nfetch_on_start = true\n'))
    code, _, err = await run_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    assert code == 1
    assert "tokenproxy: no token at start: token_unavailable" in err
    assert "listening on" not in err


@pytest.mark.timeout(90)
async def test_cli_demo_burst_200_succeeds_with_one_refresh() -> None:
    """`tokenproxy demo --burst 200` waits for expiry, sends 200 at once, and reports one refresh; exit 0."""
    code, out, err = await run_cli("demo", "--burst", "200", "--lifetime", "4", timeout=80)
    assert code == 0, out + err
    summary = [line for line in out.replace("\r", "\n").splitlines() if line.startswith("requests ")]
    assert summary and "requests 200  ok 200  failed 0  refreshes 1" in summary[0]
    assert "PASS" in out
    assert "waiting for the token to expire" in out


async def test_cli_run_without_c_parser_forwards_any_method_token(tmp_path: Path, token_server, api) -> None:
    """With AIOHTTP_NO_EXTENSIONS=1 (pure-Python parser) a method token llhttp does not know, such as FOO, is forwarded."""
    received: list[bytes] = []

    async def raw_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A raw upstream: aiohttp's own server in this process would refuse FOO itself.
        head = await reader.readuntil(b"\r\n\r\n")
        received.append(head)
        line = head.split(b"\r\n", 1)[0]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(line), line))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(raw_upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
    path.write_text(path.read_text().replace(api.base_url, f"http://127.0.0.1:{port}"))
    proc = await start_cli(
        "run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET, "AIOHTTP_NO_EXTENSIONS": "1"}
    )
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        match = await read_until(proc.stderr, r"listening on http://127\.0\.0\.1:(\d+)", seen)
        reader, writer = await asyncio.open_connection("127.0.0.1", int(match.group(1)))
        writer.write(b"FOO /echo/foo?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        await writer.wait_closed()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
        server.close()
        await server.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"FOO /echo/foo?x=1 HTTP/1.1"
    assert b"\r\nAuthorization: Bearer ey" in received[0]


async def test_cli_run_unix_socket_another_process_listens_exits_1_naming_it(tmp_path: Path, token_server, api) -> None:
    """`listen = "unix:PATH"` where another process accepts: exit 1 naming the path; that socket is left working."""
    sock_path = tmp_path / "taken.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        other.bind(str(sock_path))
        other.listen(8)
        path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json")
        path.write_text(path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "unix:{sock_path}"'))
        code, _, err = await run_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
        assert code == 1, err
        assert f"tokenproxy: cannot listen on unix:{sock_path}: another process is listening on this socket" in err
        assert "listening on unix:" not in err
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:  # the other process still has its socket
            client.connect(str(sock_path))
            accepted, _ = other.accept()
            accepted.close()
    finally:
        other.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_cli_run_unix_socket_stale_file_is_replaced(tmp_path: Path, token_server, api, loop: str) -> None:
    """A socket file nobody listens on any more (left by a crash) is replaced, and the proxy serves on it."""
    sock_path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(sock_path))  # closed without unlinking: the file stays
    assert stat.S_ISSOCK(sock_path.stat().st_mode)
    path = write_config(tmp_path / "c.toml", token_server, api, tmp_path / "s.json", server=f'loop = "{loop}"')
    path.write_text(path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "unix:{sock_path}"'))
    proc = await start_cli("run", "-c", str(path), env={"TEST_CLIENT_SECRET": CLIENT_SECRET})
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, r"listening on unix:", seen)
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock_path))) as session:
            async with session.get("http://localhost/echo/stale") as resp:
                assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0

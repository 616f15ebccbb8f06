"""`tokenproxy env` and `tokenproxy exec`: pointing tools at a running `tokenproxy run` as their HTTPS_PROXY.

A real `tokenproxy run` (a subprocess, killed by PID at the end) in front of two TLS APIs routed by host;
`exec -- curl` reaches each through an intercepted tunnel with nothing but the variables `exec` sets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.tls.ca import create_ca
from tests.fakes.api_server import FakeApi
from tests.fakes.tls import TestCa
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET, FakeTokenServer
from tests.helpers import free_port, read_until, run_cli, start_cli, stop_process


@dataclasses.dataclass
class Running:
    """The config file, the proxy's port, its CA directory and the two APIs."""

    config: Path
    port: int
    ca_dir: Path
    left: FakeApi
    right: FakeApi
    tokens: tuple[FakeTokenServer, FakeTokenServer]


async def _side(aiohttp_server: Any, upstream_ca: TestCa) -> tuple[FakeTokenServer, FakeApi]:
    tokens = FakeTokenServer()
    server = await aiohttp_server(tokens.app(), host="127.0.0.1")
    tokens.base_url = str(server.make_url("")).rstrip("/")
    api = FakeApi(tokens.signing_key)
    api_server = await aiohttp_server(api.app(), host="127.0.0.1", ssl=upstream_ca.server_context(require_client=False))
    api.base_url = f"https://127.0.0.1:{api_server.port}"
    return tokens, api


def _config(path: Path, port: int, ca_dir: Path, sides: list[tuple[FakeTokenServer, FakeApi]], ca: Path) -> Path:
    lines = [f'[server]\nlisten = "127.0.0.1:{port}"\nca_dir = "{ca_dir}"\n']
    for name, (tokens, api) in zip(("left", "right"), sides, strict=True):
        lines.append(
            f"[credentials.{name}]\ngrant = \"refresh_token\"\ntoken_url = \"{tokens.base_url}/oauth/token\"\n"
            f"client_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n"
            f"refresh_token = \"{tokens.current_refresh}\"\nstate_file = \"{path.parent / 'state.json'}\"\n"
        )
    for name, (_, api) in zip(("left", "right"), sides, strict=True):
        lines.append(
            f'[[route]]\nname = "{name}"\nhost = "{name}.test"\nurl = "{api.base_url}"\ntoken = "{name}"\n'
            f'ca_file = "{ca}"\n'
        )
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


async def _setting(
    aiohttp_server: Any, tmp_path: Path
) -> tuple[list[tuple[FakeTokenServer, FakeApi]], Path, int, Path]:
    """Two TLS APIs (with their token servers), a local CA, a free port and the config routing both by host."""
    upstream_ca = TestCa(tmp_path)
    sides = [await _side(aiohttp_server, upstream_ca), await _side(aiohttp_server, upstream_ca)]
    ca_dir = tmp_path / "ca"
    create_ca(ca_dir)
    port = free_port()
    return sides, ca_dir, port, _config(tmp_path / "c.toml", port, ca_dir, sides, upstream_ca.ca_file)


@pytest.fixture
async def running(aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[Running]:
    """`tokenproxy run` with two routes and a local CA, listening on a free port; killed at the end."""
    sides, ca_dir, port, config = await _setting(aiohttp_server, tmp_path)
    proc = await start_cli("run", "-c", str(config))
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, r"listening on http://127\.0\.0\.1:\d+", seen)
        yield Running(config, port, ca_dir, sides[0][1], sides[1][1], (sides[0][0], sides[1][0]))
    finally:
        await stop_process(proc)


async def test_env_prints_the_export_lines_and_writes_the_bundle(running: Running) -> None:
    code, out, err = await run_cli("env", "-c", str(running.config))
    bundle = running.ca_dir / "bundle.pem"
    proxy = f"http://127.0.0.1:{running.port}"
    assert (code, err) == (0, "")
    assert out == (
        f"export HTTPS_PROXY={proxy}\n"
        f"export https_proxy={proxy}\n"
        f"export HTTP_PROXY={proxy}\n"
        f"export http_proxy={proxy}\n"
        "export NO_PROXY=localhost,127.0.0.1,::1\n"
        "export no_proxy=localhost,127.0.0.1,::1\n"
        f"export CURL_CA_BUNDLE={bundle}\n"
        f"export SSL_CERT_FILE={bundle}\n"
        f"export REQUESTS_CA_BUNDLE={bundle}\n"
        f"export NODE_EXTRA_CA_CERTS={running.ca_dir / 'ca.crt'}\n"
    )
    assert bundle.stat().st_mode & 0o777 == 0o644
    text = bundle.read_text()
    assert text.endswith((running.ca_dir / "ca.crt").read_text())
    roots = ssl.get_default_verify_paths().cafile
    assert roots is not None and text.startswith(Path(roots).read_text()[:200])
    # Nothing was forwarded by the check that the proxy runs.
    assert (running.left.requests, running.right.requests) == (0, 0)


async def test_exec_curl_reaches_each_routed_tls_upstream_with_its_credential(running: Running) -> None:
    for name, api, tokens in (("left", running.left, running.tokens[0]), ("right", running.right, running.tokens[1])):
        code, out, err = await run_cli("exec", "-c", str(running.config), "--", "curl", "-sS", f"https://{name}.test/echo/x")
        assert (code, err) == (0, "")
        echo = json.loads(out)
        assert echo["raw_path"] == "/echo/x"
        assert ["Authorization", f"Bearer {tokens.issued_access[-1]}"] in echo["headers"]
        assert api.requests == 1


async def test_exec_exit_status_is_the_programs(running: Running) -> None:
    code, out, err = await run_cli("exec", "-c", str(running.config), "--", "sh", "-c", 'echo "$HTTPS_PROXY"; exit 7')
    assert (code, out, err) == (7, f"http://127.0.0.1:{running.port}\n", "")
    code, out, err = await run_cli("exec", "-c", str(running.config), "--", "no-such-program-here")
    assert (code, out, err) == (127, "", "exec: no-such-program-here: command not found\n")


@pytest.mark.parametrize("command", ["env", "exec"])
async def test_env_and_exec_without_a_running_proxy_say_so_and_exit_1(tmp_path: Path, command: str) -> None:
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nca_dir = "{tmp_path / "ca"}"\n'
        '[upstream]\nurl = "https://api.example.com"\n[token]\ngrant = "static"\naccess_token = "t-0123456789"\n'
    )
    config.chmod(0o600)
    args = ["--", "true"] if command == "exec" else []
    code, out, err = await run_cli(command, "-c", str(config), *args)
    assert (code, out) == (1, "")
    assert err == (
        f"{command}: no tokenproxy answers on 127.0.0.1:{port} (server.listen): nothing listens there; "
        "start it with `tokenproxy run` and this config\n"
    )


async def test_env_something_else_on_the_port(tmp_path: Path) -> None:
    async def not_a_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_a_proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n'
        '[upstream]\nurl = "https://api.example.com"\n[token]\ngrant = "static"\naccess_token = "t-0123456789"\n'
    )
    config.chmod(0o600)
    try:
        code, out, err = await run_cli("env", "-c", str(config))
    finally:
        server.close()
        await server.wait_closed()
    assert (code, out) == (1, "")
    assert err == f"env: no tokenproxy answers on 127.0.0.1:{port} (server.listen): something else listens there\n"


async def test_env_without_a_local_ca_says_ca_init(running: Running) -> None:
    for name in ("ca.crt", "ca.key"):
        (running.ca_dir / name).unlink()
    code, out, err = await run_cli("env", "-c", str(running.config))
    assert (code, out) == (1, "")
    assert err == f"env: no local CA in {running.ca_dir}: run `tokenproxy ca init`\n"


async def test_exec_curl_through_a_group_of_workers_one_token_call_per_credential(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """`run --workers 2`: tunnels opened to the group reach both routed TLS upstreams; the workers share each
    credential's token (one token call each), and SIGTERM stops the group."""
    sides, ca_dir, port, config = await _setting(aiohttp_server, tmp_path)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    proc = await start_cli("run", "-c", str(config), "--workers", "2", env={"XDG_RUNTIME_DIR": str(runtime)})
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, r"2 workers listening on http://127\.0\.0\.1:\d+", seen)
        for _ in range(4):
            for name, (tokens, api) in zip(("left", "right"), sides, strict=True):
                code, out, err = await run_cli(
                    "exec", "-c", str(config), "--", "curl", "-sS", f"https://{name}.test/echo/x"
                )
                assert (code, err) == (0, "")
                assert ["Authorization", f"Bearer {tokens.issued_access[-1]}"] in json.loads(out)["headers"]
        assert [api.requests for _, api in sides] == [4, 4]
        assert [tokens.count for tokens, _ in sides] == [1, 1]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        await stop_process(proc)


async def test_exec_with_a_client_token_and_the_credential_secret_unset(aiohttp_server: Any, tmp_path: Path) -> None:
    """With `server.client_token`, `env` puts it in the proxy URL (tools send it as Proxy-Authorization: Basic)
    and `exec -- curl` reaches the upstream through the tunnel; `env`, `exec` and `ca path` need no credential
    secret: the shell of the tool holds only the client token."""
    sides, ca_dir, port, config = await _setting(aiohttp_server, tmp_path)
    text = config.read_text().replace(f'client_secret = "{CLIENT_SECRET}"', 'client_secret = "${LEFT_SECRET}"', 1)
    config.write_text(text.replace("[server]\n", '[server]\nclient_token = "${CLIENT_TOKEN}"\n', 1))
    token = "client/token+with=odd-characters"  # characters a URL's userinfo must escape
    proc = await start_cli("run", "-c", str(config), env={"CLIENT_TOKEN": token, "LEFT_SECRET": CLIENT_SECRET})
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, r"listening on http://127\.0\.0\.1:\d+", seen)
        tool_env = {"CLIENT_TOKEN": token}  # and no LEFT_SECRET
        code, out, err = await run_cli("env", "-c", str(config), env=tool_env)
        assert (code, err) == (0, "")
        assert f"export HTTPS_PROXY=http://tokenproxy:client%2Ftoken%2Bwith%3Dodd-characters@127.0.0.1:{port}\n" in out
        code, out, err = await run_cli("ca", "path", "-c", str(config), env=tool_env)
        assert (code, out, err) == (0, f"{ca_dir / 'ca.crt'}\n", "")
        tokens, api = sides[0]
        code, out, err = await run_cli(
            "exec", "-c", str(config), "--", "curl", "-sS", "https://left.test/echo/x", env=tool_env
        )
        assert (code, err) == (0, "")
        assert ["Authorization", f"Bearer {tokens.issued_access[-1]}"] in json.loads(out)["headers"]
        assert api.requests == 1
        # Without the client token in its URL, the tunnel is refused.
        bare = f"http://127.0.0.1:{port}"
        command = f"HTTPS_PROXY={bare} https_proxy={bare} curl -sS https://left.test/echo/y"
        code, _, err = await run_cli("exec", "-c", str(config), "--", "sh", "-c", command, env=tool_env)
        assert code != 0 and "407" in err
        assert api.requests == 1
    finally:
        await stop_process(proc)

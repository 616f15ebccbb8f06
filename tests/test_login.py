"""`tokenproxy login` and `logout` against the fake authorization server: device grant, code + PKCE, the state file."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.auth.client_auth import PublicClient
from proxy.auth.endpoint import TokenEndpoint
from proxy.auth.login.device import device_login
from proxy.cli.login import Endpoints, can_open_browser, choose_flow
from tests.fakes.auth_server import PUBLIC_CLIENT, FakeAuthServer
from tests.helpers import TOKENPROXY, read_until, run_cli, saved_entry, start_cli


async def _serve_auth(aiohttp_server: Any) -> FakeAuthServer:
    """A fake authorization server, listening on 127.0.0.1."""
    fake = FakeAuthServer(device_interval=1)
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def auth_server(aiohttp_server: Any) -> FakeAuthServer:
    """The fake authorization server, on 127.0.0.1."""
    return await _serve_auth(aiohttp_server)


def login_config(path: Path, fake: FakeAuthServer, state: Path, extra: str = "") -> str:
    """A config with no secret in it: the issuer, a public client, a state file."""
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[upstream]\nurl = "{fake.base_url}"\n[token]\ngrant = "refresh_token"\n'
        f'issuer = "{fake.issuer}"\nclient_id = "{PUBLIC_CLIENT}"\nclient_auth = "none"\nstate_file = "{state}"\n'
        f"{extra}"
    )
    return str(path)


def assert_no_secret(fake: FakeAuthServer, *texts: str) -> None:
    """No token, code, device code or verifier the server saw or issued appears in any text."""
    for value in [*fake.issued_access, *fake.issued_refresh, *fake.secrets_seen]:
        for text in texts:
            assert value not in text


class Recorder:
    """A Prompt keeping what a flow said."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.statuses: list[str] = []

    def line(self, text: str) -> None:
        """Keep a line."""
        self.lines.append(text)

    def status(self, text: str) -> None:
        """Keep a status."""
        self.statuses.append(text)

    def done(self) -> None:
        """Nothing to clear."""


async def test_device_slow_down_adds_five_seconds_then_succeeds(auth_server: FakeAuthServer) -> None:
    """`slow_down` makes the next poll wait 5 s more; the poll after it gets the tokens."""
    auth_server.device_script = ["authorization_pending", "slow_down", "ok"]
    now = [0.0]
    auth_server.clock = lambda: now[0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    prompt = Recorder()
    async with aiohttp.ClientSession() as session:
        endpoint = TokenEndpoint(session, f"{auth_server.base_url}/token", PublicClient(PUBLIC_CLIENT, ""), 5.0)
        response = await device_login(
            endpoint, f"{auth_server.base_url}/device", {}, prompt, max_wait=300, sleep=sleep, clock=lambda: now[0]
        )
    assert response.refresh_token == auth_server.issued_refresh[0]
    assert auth_server.polled_at == [1.0, 2.0, 8.0]
    assert prompt.lines == [
        f"To log in, open {auth_server.base_url}/activate",
        "and enter the code: WDJB-MJHT",
        f"(or open {auth_server.base_url}/activate?user_code=WDJB-MJHT, which has the code in it)",
        "Waiting for the login to be approved (the code expires in 5:00) ...",
    ]
    assert prompt.statuses[0] == "waiting for approval, 5:00 left"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("access_denied", "login: the login was denied at the authorization server (access_denied)\n"),
        (
            "expired_token",
            "login: the code expired before the login was approved (expired_token): run `tokenproxy login` again\n",
        ),
    ],
)
async def test_login_device_refused_exits_1_with_message(
    auth_server: FakeAuthServer, tmp_path: Path, answer: str, message: str
) -> None:
    """access_denied and expired_token end the login: exit 1, one line saying why, nothing saved."""
    auth_server.device_script = [answer]
    state = tmp_path / "state.json"
    code, out, err = await run_cli("login", "-c", login_config(tmp_path / "c.toml", auth_server, state), "--flow",
                                   "device")
    assert (code, err) == (1, message)
    base = auth_server.base_url
    assert out == (
        f"To log in, open {base}/activate\nand enter the code: WDJB-MJHT\n"
        f"(or open {base}/activate?user_code=WDJB-MJHT, which has the code in it)\n"
        "Waiting for the login to be approved (the code expires in 5:00) ...\n"
    )
    assert not state.exists()
    assert_no_secret(auth_server, out, err)


async def test_login_device_then_token_and_logout(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    """A device login keeps the tokens in the state file; `token` uses them; `logout` revokes and removes them."""
    state = tmp_path / "state.json"
    config = login_config(tmp_path / "c.toml", auth_server, state)
    code, out, err = await run_cli("login", "-c", config, "--flow", "device")
    assert (code, err) == (0, "")
    assert re.fullmatch(
        r"Logged in: access token \S+ \(expires in 600s\) kept in " + re.escape(str(state)),
        out.splitlines()[-2],
    )
    assert out.splitlines()[-1] == "`tokenproxy run` now uses it, and its refresh token, with no secret in its config."
    saved = saved_entry(state)
    assert (saved["access_token"], saved["refresh_token"]) == (auth_server.issued_access[0], auth_server.issued_refresh[0])
    assert state.stat().st_mode & 0o777 == 0o600
    code, token_out, _ = await run_cli("token", "-c", config)
    assert (code, token_out) == (0, auth_server.issued_access[0] + "\n")
    code, logout_out, logout_err = await run_cli("logout", "-c", config)
    assert (code, logout_err) == (0, "")
    assert logout_out == (
        f"Removed the tokens from {state}.\nRevoked the refresh token at {auth_server.base_url}/revoke.\n"
    )
    assert auth_server.revoked == [auth_server.issued_refresh[0]]
    assert saved_entry(state)["refresh_token"] is None
    assert_no_secret(auth_server, out, err, logout_out)


async def test_check_without_login_says_run_login(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    """No refresh token in the config or the state file: `check` says plainly to run `tokenproxy login`."""
    state = tmp_path / "state.json"
    config = login_config(tmp_path / "c.toml", auth_server, state)
    code, out, err = await run_cli("check", "-c", config)
    assert (code, out) == (1, "")
    assert err == (
        f"check: login_required: not logged in: no token.refresh_token, and none in {state}: run `tokenproxy login`\n"
    )


async def test_login_code_wrong_state_400_then_pkce_exchange_and_run(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    """The browser part over HTTP: a redirect with a wrong state gets 400 and is ignored; the right one logs in
    (the fake checks the PKCE verifier against the challenge); `run` then serves with the tokens."""
    state = tmp_path / "state.json"
    config = login_config(tmp_path / "c.toml", auth_server, state)
    proc = await start_cli("login", "-c", config, "--flow", "code", "--no-browser", "--timeout", "60")
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        url = (await read_until(proc.stdout, r"^(http://127\.0\.0\.1:\d+/authorize\?\S+)$", seen)).group(1)
        async with aiohttp.ClientSession() as browser:
            async with browser.get(url, allow_redirects=False) as resp:
                assert resp.status == 302
                callback = resp.headers["Location"]
            forged = re.sub(r"state=[^&]+", "state=not-this-one", callback)
            async with browser.get(forged) as resp:
                assert resp.status == 400
                assert "its state does not match" in await resp.text()
            await read_until(proc.stdout, r"state that is not this login's: ignored", seen)
            async with browser.get(callback) as resp:
                assert (resp.status, "You may close this page." in await resp.text()) == (200, True)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    printed = "".join(seen) + out.decode()
    assert (proc.returncode, err.decode()) == (0, "")
    assert printed.splitlines()[0] == "To log in, open this URL in a browser on this machine:"
    assert "Logged in: access token" in printed
    assert saved_entry(state)["refresh_token"] == auth_server.issued_refresh[0]
    assert_no_secret(auth_server, printed)

    run = await start_cli("run", "-c", config)
    logs: list[str] = []
    try:
        assert run.stderr is not None
        proxy = (await read_until(run.stderr, r"listening on (http://127\.0\.0\.1:\d+)", logs)).group(1)
        async with aiohttp.ClientSession() as client, client.get(f"{proxy}/api") as resp:
            assert (resp.status, await resp.json()) == (200, {"ok": True})
    finally:
        run.terminate()
        _, rest = await asyncio.wait_for(run.communicate(), 20)
    assert_no_secret(auth_server, "".join(logs) + rest.decode())


def _read_all(fd: int) -> bytes:
    """Everything a pseudo-terminal's master side gives until the child side is closed."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: every child-side descriptor is closed
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


async def test_login_device_in_a_terminal_shows_countdown_and_no_secret(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    """In a pseudo-terminal the wait is a spinner and countdown redrawn in place, cleared at the end; no token,
    device code or refresh token is ever shown."""
    auth_server.device_script = ["authorization_pending", "ok"]
    config = login_config(tmp_path / "c.toml", auth_server, tmp_path / "state.json")
    master, child = os.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            *TOKENPROXY, "login", "-c", config, "--flow", "device", "--timeout", "30",
            stdin=child, stdout=child, stderr=child,
        )
    finally:
        os.close(child)
    try:
        screen = (await asyncio.wait_for(asyncio.to_thread(_read_all, master), 40)).decode()
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        os.close(master)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    lines = screen.split("\r\n")
    assert lines[:4] == [
        f"To log in, open {auth_server.base_url}/activate",
        "and enter the code: WDJB-MJHT",
        f"(or open {auth_server.base_url}/activate?user_code=WDJB-MJHT, which has the code in it)",
        "Waiting for the login to be approved (the code expires in 5:00) ...",
    ]
    # --timeout 30 is sooner than the code's 5 minutes: the countdown is to it.
    assert re.fullmatch(
        r"(\r[|/\\-] waiting for approval, 0:[23]\d left\x1b\[K)+\r\x1b\[KLogged in: access token \S+ "
        r"\(expires in 600s\) kept in \S+",
        lines[4],
    )
    assert_no_secret(auth_server, screen)


def registration_config(path: Path, fake: FakeAuthServer, state: Path) -> str:
    """A config naming the issuer only: no client id, no secret."""
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[upstream]\nurl = "{fake.base_url}"\n[token]\n'
        f'issuer = "{fake.issuer}"\nstate_file = "{state}"\n'
    )
    return str(path)


async def test_login_without_client_id_registers_once_and_run_uses_it(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    """No client_id: login registers a public client (RFC 7591) once, keeps it in the state file, reuses it on
    the next login, and `token` refreshes as that client after the access token is gone."""
    state = tmp_path / "state.json"
    config = registration_config(tmp_path / "c.toml", auth_server, state)
    code, out, err = await run_cli("login", "-c", config, "--flow", "device")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == (
        f"Registered tokenproxy as client dyn-1 at {auth_server.base_url}/register (kept in {state})"
    )
    assert auth_server.registered == {"dyn-1": ["http://127.0.0.1/callback"]}
    assert saved_entry(state)["client_id"] == "dyn-1"
    code, out, err = await run_cli("login", "-c", config, "--flow", "device")
    assert (code, err) == (0, "")
    assert "Registered" not in out
    assert list(auth_server.registered) == ["dyn-1"]
    saved = saved_entry(state)
    assert (saved["client_id"], saved["generation"]) == ("dyn-1", 2)
    code, out, err = await run_cli("check", "-c", config)  # refreshes now, as dyn-1, and saves the rotation
    assert (code, err) == (0, "")
    saved = saved_entry(state)
    assert (saved["client_id"], saved["refresh_token"]) == ("dyn-1", auth_server.issued_refresh[-1])
    assert len(auth_server.issued_refresh) == 3


async def test_login_without_issuer_finds_it_from_the_api(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    """Neither issuer nor token_url: login asks upstream.url, follows its RFC 9728 challenge to the issuer, logs
    in and says which key to add; `check` meanwhile refuses the config (exit 2) saying the same."""
    state = tmp_path / "state.json"
    path = tmp_path / "c.toml"
    path.write_text(
        f'[upstream]\nurl = "{auth_server.base_url}/api"\n[token]\nclient_id = "{PUBLIC_CLIENT}"\n'
        f'client_auth = "none"\nstate_file = "{state}"\n'
    )
    code, out, err = await run_cli("check", "-c", str(path))
    assert (code, out, err) == (
        2,
        "",
        "config: token.token_url: is required (or token.issuer); `tokenproxy login` finds the issuer from "
        "upstream.url when the API names it (RFC 9728)\n",
    )
    code, out, err = await run_cli("login", "-c", str(path), "--flow", "device")
    assert (code, err) == (0, "")
    assert out.splitlines()[:2] == [
        f"{auth_server.base_url}/api names its authorization server: {auth_server.issuer}",
        f'Add  issuer = "{auth_server.issuer}"  to [token] in the config: `tokenproxy run` needs it.',
    ]
    path.write_text(path.read_text() + f'issuer = "{auth_server.issuer}"\n')
    code, out, err = await run_cli("token", "-c", str(path))
    assert (code, out, err) == (0, auth_server.issued_access[0] + "\n", "")


async def test_login_ctrl_c_while_waiting_exits_130_saving_nothing(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    """Ctrl-C while the browser login waits on token.redirect_port: exit 130, one line, the port closed,
    nothing saved."""
    state = tmp_path / "state.json"
    with socket.socket() as probe:  # a port free a moment ago, for redirect_port
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    config = login_config(tmp_path / "c.toml", auth_server, state, f"redirect_port = {free}\n")
    proc = await start_cli("login", "-c", config, "--flow", "code", "--no-browser")
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        url = (await read_until(proc.stdout, r"^(http://127\.0\.0\.1:\d+/authorize\?\S+)$", seen)).group(1)
        assert f"redirect_uri=http%3A%2F%2F127.0.0.1%3A{free}%2Fcallback&" in url
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert (proc.returncode, err.decode()) == (130, "login: stopped (Ctrl-C): nothing was saved\n")
    assert not state.exists()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", free)


async def test_run_reload_keeps_the_registered_client(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    """A registered client (no client_id in the config) stays the credential's across a SIGHUP: token kept."""
    state = tmp_path / "state.json"
    path = Path(registration_config(tmp_path / "c.toml", auth_server, state))
    code, _, err = await run_cli("login", "-c", str(path), "--flow", "device")
    assert (code, err) == (0, "")
    path.write_text(path.read_text().replace(f'issuer = "{auth_server.issuer}"', f'token_url = "{auth_server.base_url}/token"'))
    proc = await start_cli("run", "-c", str(path))
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, r"tokenproxy listening on", seen)
        proc.send_signal(signal.SIGHUP)
        line = (await read_until(proc.stderr, r"config reloaded: .*", seen)).group(0)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)
    assert line == "config reloaded: current token kept"


@pytest.mark.parametrize(
    ("device_url", "said"),
    [
        ("http://127.0.0.1:1/device", "device authorization endpoint http://127.0.0.1:1/device: "),
        ("{base}/token", "device authorization endpoint {base}/token refused: unsupported_grant_type"),
    ],
)
async def test_login_device_endpoint_failing_names_it(
    auth_server: FakeAuthServer, tmp_path: Path, device_url: str, said: str
) -> None:
    """A device authorization endpoint that cannot be reached, or refuses, is named as such: exit 1."""
    base = auth_server.base_url
    path = tmp_path / "c.toml"
    path.write_text(
        f'[upstream]\nurl = "{base}"\n[token]\ntoken_url = "{base}/token"\n'
        f'device_authorization_url = "{device_url.format(base=base)}"\nclient_id = "{PUBLIC_CLIENT}"\n'
        f'client_auth = "none"\nstate_file = "{tmp_path / "state.json"}"\n'
    )
    code, out, err = await run_cli("login", "-c", str(path))
    assert (code, out) == (1, "")
    assert err.startswith("login: no device code: " + said.format(base=base))
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("steer", "page_status", "message"),
    [
        ({"authorize_error": "access_denied"}, 200, "login: the authorization server refused the login (access_denied)\n"),
        (
            {"authorize_iss": "https://elsewhere.example"},
            400,
            "login: the answer came from issuer 'https://elsewhere.example', not '{issuer}' (RFC 9207)\n",
        ),
    ],
)
async def test_login_code_refused_or_other_issuer_exits_1(
    auth_server: FakeAuthServer, tmp_path: Path, steer: dict[str, str], page_status: int, message: str
) -> None:
    """The browser brings back an error, or an answer naming another issuer: the page says so, exit 1, nothing saved."""
    for name, value in steer.items():
        setattr(auth_server, name, value)
    state = tmp_path / "state.json"
    proc = await start_cli("login", "-c", login_config(tmp_path / "c.toml", auth_server, state), "--flow", "code",
                           "--no-browser")
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        url = (await read_until(proc.stdout, r"^(http://127\.0\.0\.1:\d+/authorize\?\S+)$", seen)).group(1)
        async with aiohttp.ClientSession() as browser, browser.get(url) as resp:
            assert resp.status == page_status
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert (proc.returncode, err.decode()) == (1, message.format(issuer=auth_server.issuer))
    assert not state.exists()


def test_can_open_browser_needs_a_display_on_linux() -> None:
    """Without DISPLAY or WAYLAND_DISPLAY (an SSH session, a container) the default flow is the device flow."""
    if sys.platform in ("darwin", "win32"):
        pytest.skip("macOS and Windows always have a graphical session")
    assert can_open_browser({}) is False
    assert choose_flow(None, Endpoints("https://a/authorize", "https://a/device", ""), browser=False) == "device"
    assert choose_flow(None, Endpoints("https://a/authorize", "https://a/device", ""), browser=True) == "code"
    assert choose_flow(None, Endpoints("https://a/authorize", "", ""), browser=False) == "code"


@pytest.fixture
async def other_auth_server(aiohttp_server: Any) -> FakeAuthServer:
    """A second authorization server: another project's, on another port."""
    return await _serve_auth(aiohttp_server)


async def test_logout_with_a_state_file_shared_by_two_configs_touches_only_its_own_login(
    auth_server: FakeAuthServer, other_auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    """Two projects' configs share one state file (the default one does). `logout` in a project that never
    logged in does nothing, and never sends the other project's refresh token to its own server; `logout` in
    each project then revokes its own refresh token at its own server, and the other login keeps working."""
    state = tmp_path / "state.json"
    first = login_config(tmp_path / "a.toml", auth_server, state)
    second = login_config(tmp_path / "b.toml", other_auth_server, state)
    assert (await run_cli("login", "-c", first, "--flow", "device"))[0] == 0
    code, out, err = await run_cli("logout", "-c", second)
    assert (code, out, err) == (0, f"Not logged in: {state} holds no tokens. Nothing was done.\n", "")
    assert (auth_server.revoked, other_auth_server.revoked) == ([], [])
    assert (await run_cli("login", "-c", second, "--flow", "device"))[0] == 0
    code, out, err = await run_cli("logout", "-c", first)
    assert (code, err) == (0, "")
    assert out == f"Removed the tokens from {state}.\nRevoked the refresh token at {auth_server.base_url}/revoke.\n"
    assert (auth_server.revoked, other_auth_server.revoked) == ([auth_server.issued_refresh[0]], [])
    code, out, _ = await run_cli("token", "-c", second)
    assert (code, out) == (0, other_auth_server.issued_access[-1] + "\n")
    code, out, _ = await run_cli("logout", "-c", second)
    assert code == 0 and f"Revoked the refresh token at {other_auth_server.base_url}/revoke." in out
    assert other_auth_server.revoked == [other_auth_server.issued_refresh[-1]]


async def test_login_without_client_id_registers_per_server_with_a_shared_state_file(
    auth_server: FakeAuthServer, other_auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    """A client registered at one server is not used for another config's server, though both keep their logins
    in one state file: the second login registers its own client, and each config's `token` works."""
    state = tmp_path / "state.json"
    first = registration_config(tmp_path / "a.toml", auth_server, state)
    second = registration_config(tmp_path / "b.toml", other_auth_server, state)
    assert (await run_cli("login", "-c", first, "--flow", "device"))[:1] == (0,)
    code, _, err = await run_cli("login", "-c", second, "--flow", "device")
    assert (code, err) == (0, "")
    assert (list(auth_server.registered), list(other_auth_server.registered)) == (["dyn-1"], ["dyn-1"])
    for config, server in ((first, auth_server), (second, other_auth_server)):
        code, out, _ = await run_cli("token", "-c", config)
        assert (code, out) == (0, server.issued_access[-1] + "\n")
    code, _, err = await run_cli("login", "-c", first, "--flow", "device")
    assert (code, err) == (0, "")
    assert list(auth_server.registered) == ["dyn-1"]  # its own client, found again


async def test_login_with_no_state_file_exits_2_saying_where_a_login_goes(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    """`state_file = ""` and no refresh token: exit 2, the line naming token.refresh_token says a login needs a state
    file, so the person is not sent to configure a refresh token by hand."""
    path = tmp_path / "c.toml"
    login_config(path, auth_server, tmp_path / "unused.json")
    path.write_text(re.sub(r'state_file = ".*"', 'state_file = ""', path.read_text()))
    code, out, err = await run_cli("login", "-c", str(path), "--flow", "device")
    assert (code, out) == (2, "")
    assert err == (
        "config: token.refresh_token: is required for grant 'refresh_token' when token.state_file is empty "
        "(or name a state file and run `tokenproxy login`)\n"
    )

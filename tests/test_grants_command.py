"""The `command` grant: a program's output as the token, through the real proxy and the CLI; failures and timeouts."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.auth.grants.command import CommandGrant, command_token
from proxy.core.errors import GrantError
from tests.fakes.api_server import FakeApi
from tests.fakes.token_server import FakeTokenServer
from tests.helpers import run_cli

# A script printing the file it is given; run as [python, script, file], like any argv.
PRINT_FILE = "import sys; sys.stdout.write(open(sys.argv[1]).read())\n"


def command_section(tmp_path: Path, output: str, script: str = PRINT_FILE, **keys: Any) -> dict[str, Any]:
    """The `token` section of a command grant whose program prints `output` (kept in a 0600 file)."""
    out = tmp_path / "output.txt"
    out.write_text(output)
    out.chmod(0o600)
    program = tmp_path / "cmd.py"
    program.write_text(script)
    return {"grant": "command", "command": [sys.executable, str(program), str(out)], "command_timeout": 5.0, **keys}


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    """One request through the proxy: its status and JSON body."""
    async with client.get(url) as resp:
        return resp.status, json.loads(await resp.read())


async def test_grant_command_bare_token_is_sent_upstream(
    make_proxy, token_server: FakeTokenServer, api: FakeApi, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A program printing a bare token (and a newline): that token is the bearer the API gets."""
    access = token_server.new_access()
    proxy = await make_proxy(token=command_section(tmp_path, access + "\n"))

    status, _ = await get(client, f"{proxy.url}/echo/x")

    assert status == 200
    assert api.tokens_seen[-1] == access
    assert token_server.count == 0


async def test_grant_command_exec_credential_expiry_is_used(
    make_proxy, token_server: FakeTokenServer, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A whole Kubernetes ExecCredential: status.token is sent, status.expirationTimestamp is its expiry."""
    access = token_server.new_access()
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": access, "expirationTimestamp": "2100-01-01T00:00:00Z"},
    }
    proxy = await make_proxy(token=command_section(tmp_path, json.dumps(credential)))

    status, _ = await get(client, f"{proxy.url}/echo/x")

    assert status == 200
    assert abs(proxy.tokens.status().expires_at - 4102444800) < 60


def test_grant_command_output_shapes_give_token_and_lifetime() -> None:
    """Bare, access_token/expires_in, token/expires_at, and ExecCredential all read; lifetimes from `now`."""
    now = 1_700_000_000.0
    assert command_token(b"abc.def.ghi\n", now).access_token == "abc.def.ghi"
    assert command_token(b'{"access_token": "a", "expires_in": 120}', now).expires_in == 120
    assert command_token(b'{"token": "b", "expires_at": "2023-11-14T22:15:20Z"}', now).expires_in == 120
    assert command_token(b'{"token": "c", "expires_at": 1700000060}', now).expires_in == 60
    status = b'{"kind": "ExecCredential", "status": {"token": "d", "expirationTimestamp": "2023-11-14T22:14:20+00:00"}}'
    assert command_token(status, now).expires_in == 60
    assert command_token(b'{"token": "e"}', now).expires_in is None


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("", "the command printed nothing on standard output"),
        ("two words", "the command's output is neither a token (one word) nor a JSON object"),
        ('{"access_token": ', "the command's output starts like JSON but is not JSON"),
        ('{"expires_in": 60}', "the command's JSON has no access_token or token"),
    ],
)
def test_grant_command_unusable_output_is_named_not_shown(output: str, reason: str) -> None:
    """Output with no token gives a GrantError saying what is wrong, never quoting the output."""
    with pytest.raises(GrantError) as caught:
        command_token(output.encode(), 0.0)
    assert caught.value.reason == reason


@pytest.mark.parametrize("output", ["not a token", '{"expires_in": 60}', "{broken json"])
async def test_grant_command_bad_output_gives_token_unavailable(
    make_proxy, client: aiohttp.ClientSession, tmp_path: Path, caplog: pytest.LogCaptureFixture, output: str
) -> None:
    """Output that is no token (not JSON, a field missing) is 503 token_unavailable; the output is never logged."""
    proxy = await make_proxy(token=command_section(tmp_path, output))

    status, body = await get(client, f"{proxy.url}/echo/x")

    assert (status, body["error"]) == (503, "token_unavailable")
    assert output not in caplog.text


FAILING = """import sys
sys.stdout.write("SECRET-STDOUT-TOKEN\\n")
sys.stderr.write("first line of stderr\\nERROR: Reauthentication failed. Run gcloud auth login.\\n\\n")
sys.exit(1)
"""


async def test_grant_command_exit_1_logs_status_and_last_stderr_line(
    make_proxy, client: aiohttp.ClientSession, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A command exiting 1: 503 token_unavailable; the log names the exit status and stderr's last line, never stdout."""
    proxy = await make_proxy(token=command_section(tmp_path, "", script=FAILING))

    status, body = await get(client, f"{proxy.url}/echo/x")

    assert (status, body["error"]) == (503, "token_unavailable")
    expected = "command python3: exited with status 1: ERROR: Reauthentication failed. Run gcloud auth login."
    program = os.path.basename(sys.executable)
    assert expected.replace("python3", program) in caplog.text
    assert "SECRET-STDOUT-TOKEN" not in caplog.text and "SECRET-STDOUT-TOKEN" not in json.dumps(body)
    assert "first line of stderr" not in caplog.text


HANGING = """import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1] + ".pids", "w").write(f"{os.getpid()} {child.pid}")
sys.stdout.flush()
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    """True once `pid` is no process (or only a zombie waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_grant_command_hanging_past_timeout_is_killed_with_its_children(
    make_proxy, client: aiohttp.ClientSession, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A command still running at command_timeout: 503 token_unavailable, it and the process it started are gone."""
    section = command_section(tmp_path, "", script=HANGING, command_timeout=1.0)
    proxy = await make_proxy(token=section)
    pids: list[int] = []
    try:
        status, body = await get(client, f"{proxy.url}/echo/x")
        pids = [int(pid) for pid in (tmp_path / "output.txt.pids").read_text().split()]

        assert (status, body["error"]) == (503, "token_unavailable")
        assert "still running after 1 s (token.command_timeout); killed" in caplog.text
        # Reaped before the failure was answered; the grandchild, killed with the group, is init's to reap.
        assert _gone(pids[0])
        for _ in range(1000):
            if _gone(pids[1]):
                break
            await asyncio.sleep(0.01)
        assert _gone(pids[1])
    finally:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


async def test_cli_token_command_grant_prints_the_token(
    tmp_path: Path, token_server: FakeTokenServer, api: FakeApi
) -> None:
    """`tokenproxy token` with a command grant prints the program's token, and `check` reports it without it."""
    access = token_server.new_access()
    section = command_section(tmp_path, json.dumps({"access_token": access, "expires_in": 600}))
    path = tmp_path / "c.toml"
    path.write_text(
        f'[upstream]\nurl = "{api.base_url}"\n[token]\ngrant = "command"\nstate_file = ""\n'
        f"command = {json.dumps(section['command'])}\n"
    )

    code, out, err = await run_cli("token", "-c", str(path))
    assert (code, out, err) == (0, access + "\n", "")
    code, out, err = await run_cli("check", "-c", str(path))
    assert (code, err) == (0, "")
    assert out.startswith("ok: grant command, token ") and access not in out


@pytest.mark.parametrize(
    ("keys", "line"),
    [
        ('command = []', "config: token.command: is required for grant 'command' (a list: program, then its arguments)"),
        (
            'command = ["no-such-program-xyz", "print"]',
            "config: token.command: program not found or not executable, got 'no-such-program-xyz'",
        ),
        (
            'command = ["true"]\ncommand_timeout = 0',
            "config: token.command_timeout: must be greater than 0, got 0.0",
        ),
        (
            'command = ["true"]\ncommand_timeout = 30',
            "config: token.command_timeout: must not be longer than token.timeout (10), which ends every fetch, got 30.0",
        ),
    ],
)
async def test_cli_check_command_grant_bad_config_exits_2_naming_the_key(tmp_path: Path, keys: str, line: str) -> None:
    """A command grant with no program, a program not on PATH or a bad timeout: exit 2, one line naming the key."""
    path = tmp_path / "c.toml"
    path.write_text(f'[upstream]\nurl = "http://127.0.0.1:9"\n[token]\ngrant = "command"\nstate_file = ""\n{keys}\n')

    code, out, err = await run_cli("check", "-c", str(path))

    assert (code, out, err) == (2, "", line + "\n")


async def test_grant_command_endless_output_is_cut_off_and_killed(
    make_proxy, client: aiohttp.ClientSession, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A command printing without end: read up to 64 KiB only, then killed; 503 token_unavailable, saying so."""
    endless = "import sys\nwhile True:\n    sys.stdout.write('x' * 4096)\n"
    proxy = await make_proxy(token=command_section(tmp_path, "", script=endless))

    status, body = await get(client, f"{proxy.url}/echo/x")

    assert (status, body["error"]) == (503, "token_unavailable")
    assert f"command {os.path.basename(sys.executable)}: printed more than 64 KiB; killed" in caplog.text


async def test_grant_command_cancelled_fetch_kills_and_reaps_the_child(tmp_path: Path) -> None:
    """A fetch cancelled while its command runs (a refresh stopped at shutdown): the command and its child are gone."""
    section = command_section(tmp_path, "", script=HANGING)
    task = asyncio.ensure_future(CommandGrant(tuple(section["command"]), 30.0).fetch(None))
    pids_file = tmp_path / "output.txt.pids"
    pids: list[int] = []
    try:
        for _ in range(2000):  # the script writes its pids once it runs; bounded at about 20 s
            if pids_file.exists() and len(pids_file.read_text().split()) == 2:
                break
            await asyncio.sleep(0.01)
        pids = [int(pid) for pid in pids_file.read_text().split()]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        assert _gone(pids[0])  # reaped before the cancellation finished
        for _ in range(1000):
            if _gone(pids[1]):
                break
            await asyncio.sleep(0.01)
        assert _gone(pids[1])
    finally:
        task.cancel()
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

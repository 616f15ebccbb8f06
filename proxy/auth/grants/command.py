"""`grant = "command"`: a token printed by a program (`gcloud auth print-access-token`, a Kubernetes exec plugin).

Owns: running the configured argv (no shell, the proxy's environment, no
stdin) with asyncio's subprocesses, bounded in time and in what is read,
and reading its standard output: a bare token, or JSON with `access_token`
or `token` and `expires_in`, `expires_at` or `expirationTimestamp`, or a
whole Kubernetes `ExecCredential` (its `status`). A child still running at
`command_timeout`, or when the refresh is cancelled, is killed with its
process group and reaped. The standard output is never shown in a message
(it holds the token); a failure names the exit status and the last line of
standard error. Not a rotating grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...core.errors import GrantError
from ..endpoint import lifetime
from ..protocol import GrantContext, GrantType, Problem, RequestShape, TokenResponse

# The most of standard output that is read: a token (or an ExecCredential) is a few KiB.
MAX_STDOUT = 64 * 1024
# How much of the end of standard error is kept, for its last line.
STDERR_TAIL = 4096
# The longest stretch of the last stderr line that goes into a message.
MAX_STDERR_LINE = 300
# How long reaping a killed child may take before it is left to the event loop's child watcher.
REAP_TIMEOUT = 5.0


@dataclass(frozen=True)
class CommandSettings:
    """The program to run and how long it may take."""

    command: tuple[str, ...] = ()
    command_timeout: float = 10.0


class _TooMuchOutput(Exception):
    pass


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> bytes:
    """Everything on `stream` up to EOF; _TooMuchOutput beyond `cap` bytes (nothing more is read)."""
    data = bytearray()
    while chunk := await stream.read(cap + 1 - len(data)):
        data += chunk
        if len(data) > cap:
            raise _TooMuchOutput
    return bytes(data)


async def _read_tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    """Read `stream` to EOF, keeping only its last `keep` bytes (so a chatty child never blocks on the pipe)."""
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-keep:]
    return tail


def last_line(stderr: bytes) -> str:
    """The last non-blank line of standard error, printable and shortened, for a log line."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return ""
    text = "".join(ch if ch.isprintable() else "?" for ch in lines[-1])
    return text if len(text) <= MAX_STDERR_LINE else text[:MAX_STDERR_LINE] + "..."


def _kill_group(pid: int) -> None:
    """Kill the child's process group (it leads its own session), so nothing it started outlives it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _expires_in(value: Any, what: str, now: float) -> float | None:
    """Seconds until an RFC 3339 time (or epoch seconds) from now; None when absent or unreadable."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return lifetime(value - now, what, None)
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise GrantError(f"the command's {what} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return lifetime(moment.timestamp() - now, what, None)


def command_token(stdout: bytes, now: float) -> TokenResponse:
    """The token in a command's standard output, its lifetime from `now`; GrantError (never quoting it) if none.

    A bare token is one line without spaces. JSON gives `access_token` or
    `token` and `expires_in` (seconds), `expires_at` or `expirationTimestamp`
    (RFC 3339, or epoch seconds); a Kubernetes ExecCredential's `status` is read.
    """
    text = stdout.decode("utf-8", "replace").strip()
    if not text:
        raise GrantError("the command printed nothing on standard output")
    if not text.startswith("{"):
        if any(ch.isspace() for ch in text) or not text.isprintable():
            raise GrantError("the command's output is neither a token (one word) nor a JSON object")
        return TokenResponse(text)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise GrantError("the command's output starts like JSON but is not JSON") from None
    if isinstance(data, dict) and isinstance(data.get("status"), dict):
        data = data["status"]  # a Kubernetes ExecCredential: the credential is its status
    if not isinstance(data, dict):
        raise GrantError("the command's output is neither a token (one word) nor a JSON object")
    token = data.get("access_token", data.get("token"))
    if not isinstance(token, str) or not token:
        raise GrantError("the command's JSON has no access_token or token")
    seconds = lifetime(data.get("expires_in"), "expires_in", None)
    for name in ("expires_at", "expirationTimestamp"):
        if seconds is None and data.get(name) is not None:
            seconds = _expires_in(data[name], name, now)
    return TokenResponse(token, seconds, token_type=None)


@dataclass(frozen=True)
class CommandGrant:
    """Runs the command once per fetch and reads its token. Each fetch is its own child; nothing is shared."""

    argv: tuple[str, ...]
    timeout: float
    name: str = "command"
    uses_refresh_token: bool = False

    async def fetch(self, refresh_token: str | None) -> TokenResponse:
        """Run the command and read its token; GrantError (exit status, last stderr line) when it fails or hangs."""
        stdout = await self._run()
        return command_token(stdout, time.time())

    async def _run(self) -> bytes:
        program = os.path.basename(self.argv[0])
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise GrantError(f"command {program}: cannot be run ({exc.strerror or type(exc).__name__})") from None
        assert proc.stdout is not None and proc.stderr is not None
        # Both pipes are read at once, so a child filling one while the other is read never blocks.
        out_reader = asyncio.ensure_future(_read_capped(proc.stdout, MAX_STDOUT))
        err_reader = asyncio.ensure_future(_read_tail(proc.stderr, STDERR_TAIL))
        try:
            async with asyncio.timeout(self.timeout):
                stdout, stderr = await asyncio.gather(out_reader, err_reader)
                status = await proc.wait()
        except TimeoutError:
            raise GrantError(
                f"command {program}: still running after {self.timeout:g} s (token.command_timeout); killed"
            ) from None
        except _TooMuchOutput:
            raise GrantError(f"command {program}: printed more than {MAX_STDOUT // 1024} KiB; killed") from None
        finally:
            # Timed out, too much output, or the refresh was cancelled: the child and everything it started
            # are killed first (before any await), then the readers stopped and the child reaped.
            # A child that exited normally but left something holding its pipes counts as not done either.
            drained = all(r.done() and not r.cancelled() and r.exception() is None for r in (out_reader, err_reader))
            if not drained or proc.returncode is None:
                _kill_group(proc.pid)
            for reader in (out_reader, err_reader):
                reader.cancel()
            await asyncio.gather(out_reader, err_reader, return_exceptions=True)
            if not drained or proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REAP_TIMEOUT):
                        await proc.communicate()  # the rest of both pipes, so their transports close
        if status != 0:
            said = last_line(stderr)
            how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            raise GrantError(f"command {program}: {how}" + (f": {said}" if said else " (nothing on standard error)"))
        return stdout


def check(settings: CommandSettings) -> Sequence[Problem]:
    """An empty command, one not found on PATH, and a timeout that is not positive."""
    problems: list[Problem] = []
    if not settings.command or not settings.command[0]:
        problems.append(("command", "is required for grant 'command' (a list: program, then its arguments)"))
    elif shutil.which(settings.command[0]) is None:
        problems.append(("command", f"program not found or not executable, got {settings.command[0]!r}"))
    if settings.command_timeout <= 0:
        problems.append(("command_timeout", f"must be greater than 0, got {settings.command_timeout!r}"))
    return problems


def build(settings: CommandSettings, context: GrantContext) -> CommandGrant:
    """The grant these settings describe."""
    return CommandGrant(settings.command, settings.command_timeout)


def identity(settings: CommandSettings) -> tuple[str, str, str]:
    """The program and its arguments: another command is another credential."""
    return json.dumps(list(settings.command)), "", ""


def request(settings: CommandSettings) -> RequestShape:
    """The command line and its timeout."""
    return (("command", json.dumps(list(settings.command))), ("command_timeout", f"{settings.command_timeout:g}"))


GRANT = GrantType("command", CommandSettings, check, build, identity, uses_refresh_token=False, request=request)

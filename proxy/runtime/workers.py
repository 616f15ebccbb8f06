"""Workers: N processes accepting on one TCP port (SO_REUSEPORT), started and supervised by this one.

Owns: how many workers and whether this platform can have them, the group's
private runtime directory, starting a worker (the same `tokenproxy run`
again, with config overrides that make it one), telling when it listens,
restarting one that ends with back-off, passing SIGTERM/SIGINT/SIGHUP on,
and the group's admin listener. The parent binds nothing for traffic and
holds no token: each worker is a whole single-process proxy (serve.py), and
the workers share their token through the state file. Knows nothing of
requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, parse_listen
from ..core.renewal import backoff_delay
from ..http.admin_server import AdminRunner
from ..http.group_admin import WorkerView, build_group_admin_app
from .serve import server_limits, start_listener

logger = logging.getLogger("tokenproxy")

# A worker that ended is started again after 0.5 s, doubling to 30 s while it keeps ending;
# one that served for STABLE_AFTER seconds before it ended starts from 0.5 s again.
RESTART_INITIAL = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 10.0
# How long the parent waits for its workers after a second signal (they stop at once) before it kills them.
KILL_AFTER = 10.0

# Starts a worker: the argv for a worker holding the link `fd`, with these config overrides.
# The hidden `--worker-set` key carrying a worker's private state file (not a config key: cli/main.py takes it
# out and gives the file to every credential that has no state file of its own).
PRIVATE_STATE_KEY = "worker.private_state_file"
# The hidden `--worker-set` key carrying a worker's index, which its log lines show.
WORKER_INDEX_KEY = "worker.index"

WorkerCommand = Callable[[int, Mapping[str, str]], list[str]]


def resolve_workers(configured: int) -> int:
    """The number of workers `server.workers` asks for: 0 is one per CPU this process may run on."""
    if configured > 0:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def workers_unsupported(platform: str = sys.platform) -> str | None:
    """Why this platform serves with one process whatever `server.workers` says, or None where workers work.

    Only Linux spreads the connections of one port over the sockets that share it with SO_REUSEPORT;
    elsewhere the option exists (macOS, the BSDs) but one socket would take every connection.
    """
    if platform.startswith("linux"):
        return None
    return (
        f"server.workers: workers need Linux's SO_REUSEPORT load balancing, which {platform} does not have: "
        "serving with one process"
    )


def describe_exit(returncode: int) -> str:
    """How a process ended, in words: its exit status, or the signal that killed it."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def runtime_base(env: Mapping[str, str]) -> str | None:
    """Where the private runtime directory goes: $XDG_RUNTIME_DIR when it is a directory, else the temp dir."""
    base = env.get("XDG_RUNTIME_DIR", "")
    return base if base and os.path.isdir(base) else None


@dataclass
class _Slot:
    """One worker place: the process in it now and its history. Owned by the supervisor's event loop."""

    index: int
    process: asyncio.subprocess.Process | None = None
    link: asyncio.StreamWriter | None = None  # the parent's end: closing it (or the parent dying) stops the worker
    started: float | None = None
    started_monotonic: float = 0.0
    restarts: int = 0
    state: str = "starting"
    last_exit: int | None = None

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    """Starts `count` workers, keeps them running, passes signals on and stops them all; `run()` gives the exit code.

    Everything here runs on one event loop; a slot is changed only by its own keeper task
    and read by the signal handlers and the admin app.
    """

    def __init__(self, config: Config, count: int, command: WorkerCommand) -> None:
        self._config = config
        self._command = command
        self._slots = [_Slot(index) for index in range(count)]
        self._stopping = asyncio.Event()
        self._listen = config.server.listen
        self._dir = Path()

    def views(self) -> list[WorkerView]:
        """The workers as they are now, for the group's admin app."""
        return [
            WorkerView(
                index=slot.index,
                pid=slot.process.pid if slot.process is not None else None,
                started=slot.started,
                restarts=slot.restarts,
                state=slot.state,
                admin_socket=str(self._admin_socket(slot.index)),
            )
            for slot in self._slots
        ]

    def _admin_socket(self, index: int) -> Path:
        return self._dir / f"worker-{index}.sock"

    def _overrides(self, index: int) -> dict[str, str]:
        """The config keys that make a `tokenproxy run` one worker of this group."""
        overrides = {"server.workers": "1", "server.listen": self._listen}
        overrides[PRIVATE_STATE_KEY] = str(self._dir / "state.json")
        overrides[WORKER_INDEX_KEY] = str(index)
        if self._config.server.admin_listen:
            overrides["server.admin_listen"] = f"unix:{self._admin_socket(index)}"
        # Values are read like the config file's: `$` would start an ${ENV} reference.
        return {key: value.replace("$", "$$") for key, value in overrides.items()}

    async def run(self) -> int:
        """Serve with the workers until SIGTERM or SIGINT; the exit code a single process would have given.

        A worker that cannot start (before it listens) ends the group with its exit code; its
        message is its own, printed once since the first worker starts alone.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        self._dir = Path(tempfile.mkdtemp(prefix="tokenproxy-", dir=runtime_base(os.environ)))  # 0700
        admin: AdminRunner | None = None
        try:
            if self._config.server.admin_listen:
                admin = AdminRunner(
                    build_group_admin_app(self.views),
                    limits=server_limits(self._config),
                    access_log=None,
                    shutdown_timeout=self._config.server.shutdown_timeout,
                )
                await admin.setup()
                admin_url = await start_listener(admin, self._config.server.admin_listen)
                logger.info("admin for the workers listening on %s (/healthz /readyz /status /metrics)", admin_url)
            return await self._serve()
        finally:
            await self._kill_leftovers()
            if admin is not None:
                await admin.cleanup()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _serve(self) -> int:
        first = self._slots[0]
        # The first worker starts alone: a start-up error is reported once, and a port 0 is chosen once.
        url = await self._start(first)
        if url is None:
            return self._failed_start(first)
        if parse_listen(self._listen)[1] == 0:
            self._listen = f"{self._listen.rpartition(':')[0]}:{url.rpartition(':')[2]}"
        await asyncio.gather(*(self._start(slot) for slot in self._slots[1:]))
        failed = next((slot for slot in self._slots if not slot.alive()), None)
        if failed is not None and not self._stopping.is_set():
            self._on_stop()
            await asyncio.gather(*(slot.process.wait() for slot in self._slots if slot.process is not None))
            return self._failed_start(failed)
        logger.info(
            "%d workers listening on %s (pids %s)",
            len(self._slots),
            url,
            " ".join(str(view.pid) for view in self.views()),
        )
        await asyncio.gather(*(self._keep(slot) for slot in self._slots))
        troubled = [slot for slot in self._slots if slot.last_exit not in (0, None)]
        for slot in troubled:
            logger.error("worker %d %s while stopping", slot.index, describe_exit(slot.last_exit or 0))
        logger.info("all %d workers stopped", len(self._slots))
        return 1 if troubled else 0

    def _failed_start(self, slot: _Slot) -> int:
        """The exit code for a worker that ended before it listened: its own (a stop signal ends the wait: 0)."""
        code = slot.last_exit if slot.last_exit is not None else 1
        if self._stopping.is_set() and code < 0:
            return 0
        return code if code > 0 else 1

    async def _start(self, slot: _Slot) -> str | None:
        """Start the slot's worker and wait until it listens: its URL, or None when it ended first."""
        parent_end, child_end = socket.socketpair()
        try:
            argv = self._command(child_end.fileno(), self._overrides(slot.index))
            # A process group of its own: a Ctrl-C in the terminal reaches the parent only, which passes
            # one SIGTERM on (the worker's own SIGINT as well would be a second signal: stop at once).
            process = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(child_end.fileno(),), process_group=0
            )
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        slot.process, slot.state, slot.last_exit = process, "starting", None
        slot.started, slot.started_monotonic = time.time(), time.monotonic()
        if self._stopping.is_set():
            process.send_signal(signal.SIGTERM)
        reader, slot.link = await asyncio.open_unix_connection(sock=parent_end)
        line = await reader.readline()
        if line.startswith(b"ready "):
            slot.state = "serving"
            return line[len(b"ready ") :].decode().strip()
        slot.last_exit = await process.wait()
        slot.state = "stopped"
        return None

    async def _keep(self, slot: _Slot) -> None:
        """Wait for the slot's worker to end and start it again with back-off, until the group stops."""
        failures = 0
        while slot.process is not None:
            slot.last_exit = await slot.process.wait()
            slot.state = "stopped"
            if slot.link is not None:
                slot.link.close()
            if self._stopping.is_set():
                return
            ran = time.monotonic() - slot.started_monotonic
            failures = 1 if ran >= STABLE_AFTER else failures + 1
            delay = backoff_delay(failures, RESTART_INITIAL, RESTART_MAX)
            logger.warning(
                "worker %d (pid %d) %s; starting it again in %.1fs",
                slot.index,
                slot.process.pid,
                describe_exit(slot.last_exit),
                delay,
            )
            slot.state = "restarting"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                slot.state = "stopped"
                return
            slot.restarts += 1
            if await self._start(slot) is not None:
                logger.info("worker %d started again (pid %d)", slot.index, slot.process.pid)

    def _on_stop(self) -> None:
        """SIGTERM or SIGINT: every worker gets SIGTERM (drain as a single process does); a second one, again."""
        if self._stopping.is_set():
            logger.warning("second signal: the workers stop at once")
        else:
            logger.info("stopping %d workers", len(self._slots))
            self._stopping.set()
        for slot in self._slots:
            if slot.alive() and slot.process is not None:
                slot.process.send_signal(signal.SIGTERM)

    def _on_hangup(self) -> None:
        """SIGHUP: every listening worker reads the config again (a starting one reads it as it starts)."""
        serving = [slot for slot in self._slots if slot.state == "serving" and slot.alive()]
        for slot in serving:
            if slot.process is not None:
                slot.process.send_signal(signal.SIGHUP)
        logger.info("SIGHUP passed on to %d workers", len(serving))

    async def _kill_leftovers(self) -> None:
        """Whatever ended the supervisor (an error, a cancel), no worker outlives it."""
        live = [slot.process for slot in self._slots if slot.alive() and slot.process is not None]
        for process in live:
            process.send_signal(signal.SIGTERM)
        if live:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in live], timeout=KILL_AFTER)
            for process in live:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            for task in pending:
                await task
        for slot in self._slots:
            if slot.link is not None:
                slot.link.close()


def supervise(config: Config, count: int, command: WorkerCommand) -> int:
    """Run `count` workers until SIGTERM or SIGINT; the exit code for the command line."""
    return asyncio.run(Supervisor(config, count, command).run())

"""Processes the bench starts, and what /proc says about them.

Owns: free loopback ports, starting a program with its output in a log
file, waiting until it listens, stopping it by PID (SIGTERM, then SIGKILL,
then any children it left behind), and reading RSS, peak RSS and CPU time
from /proc. Knows nothing of what the programs are.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Return once something accepts on `port`; raise if `proc` dies or `timeout` passes."""
    program = Path(str(proc.args[0] if isinstance(proc.args, list) else proc.args)).name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{program} exited with {proc.returncode}; see {log}:\n{_tail(log)}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{program} did not listen on port {port} within {timeout:g}s; see {log}")


def run_to_end(
    args: Sequence[str], what: str, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> str:
    """Run a program to its end and return what it printed; RuntimeError with the end of its stderr if it failed."""
    done = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed: {done.stderr.strip()[-800:]}")
    return done.stdout


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (nginx's workers, for example)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the command name, which is in parentheses and may hold spaces.
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return found


@dataclass
class Proc:
    """A program the bench started; `pids()` are the processes whose cost is counted."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    count_children: bool = False  # nginx: the master's workers do the work
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        """The PID of the process the bench started."""
        return self.popen.pid

    def pids(self) -> list[int]:
        """The process and, when its workers count, its children."""
        return [self.pid, *children_of(self.pid)] if self.count_children else [self.pid]

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, SIGKILL after `timeout`, then any children left behind."""
        if self._stopped:
            return
        self._stopped = True
        kids = children_of(self.pid) if self.alive() else []
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        for kid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)


def start(
    name: str,
    args: Sequence[str],
    log: Path,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    count_children: bool = False,
    timeout: float = 60.0,
) -> Proc:
    """Start `args` with stdout and stderr in `log`; wait until it listens on `port` (if given)."""
    with log.open("ab") as out:
        popen = subprocess.Popen(
            list(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    proc = Proc(name, popen, log, count_children)
    if port is not None:
        try:
            wait_listening(port, popen, timeout, log)
        except BaseException:
            proc.stop()
            raise
    return proc


# -- /proc readings -------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pids: Sequence[int]) -> int:
    """Resident set size of the processes together, in KiB (VmRSS)."""
    return sum(_status_kib(pid, "VmRSS") for pid in pids)


def peak_rss_kib(pids: Sequence[int]) -> int:
    """Peak resident set size since start or the last `reset_peak`, in KiB (VmHWM, summed)."""
    return sum(_status_kib(pid, "VmHWM") for pid in pids)


def reset_peak(pids: Sequence[int]) -> bool:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs); False where the kernel refuses."""
    ok = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time the processes have used so far, in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _CLOCK_TICKS


class RssSampler:
    """Polls VmRSS of some processes in a thread and keeps the largest sum seen.

    The fallback for peak RSS where VmHWM cannot be reset, and the only
    peak that is right for a sum over several processes.
    """

    def __init__(self, pids: Sequence[int], interval: float = 0.02) -> None:
        self._pids = list(pids)
        self._interval = interval
        self._stop = threading.Event()
        self.max_kib = rss_kib(self._pids)  # written by the sampler thread only while it runs
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.max_kib = max(self.max_kib, rss_kib(self._pids))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.max_kib = max(self.max_kib, rss_kib(self._pids))

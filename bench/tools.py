"""What the bench needs from the machine: wrk, nginx, mitmdump, matplotlib, httptools, and their versions.

Owns: finding each tool, installing what is missing (Debian packages with
apt-get when running as root; mitmproxy into a virtualenv of its own, so
its pinned dependencies never change the project's; matplotlib and
httptools, the floor's parser, into the running interpreter), and
describing the machine for the report.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# mitmproxy pins its dependencies (an older `cryptography`, for one); it gets a venv of its own.
MITM_VENV = BENCH_DIR / ".venv-mitmproxy"
MITM_REQUIREMENT = "mitmproxy>=10"
INSTALL_TIMEOUT = 600.0


class ToolMissing(RuntimeError):
    """A tool the bench cannot run without is absent and could not be installed."""


@dataclass(frozen=True)
class Tools:
    """Paths of the external programs, or why an optional one is missing."""

    wrk: str
    nginx: str
    mitmdump: str | None
    mitmdump_missing: str  # why mitmdump is None ("" when present)
    plotting: bool
    plotting_missing: str
    floor_missing: str = ""  # why the floor contender cannot run (httptools missing); "" when it can
    hey: str | None = None  # the load generator of the HTTPS_PROXY scenario (wrk cannot CONNECT)
    hey_missing: str = "not looked for"


def _apt_install(packages: list[str]) -> str:
    """Install Debian packages; '' on success, else why not."""
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["apt-get", *args], env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
        )

    done = apt("install", "-y", "-q", *packages)
    if done.returncode != 0:  # a stale package list: update it once, then try again
        apt("update", "-q")
        done = apt("install", "-y", "-q", *packages)
    return "" if done.returncode == 0 else f"apt-get install failed: {done.stderr.strip()[-300:]}"


def _sbin_which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def ensure_wrk_nginx(install: bool) -> tuple[str, str]:
    """Paths of wrk and nginx, installing Debian's packages if missing; ToolMissing if impossible."""
    wanted = {"wrk": _sbin_which("wrk"), "nginx": _sbin_which("nginx")}
    missing = [name for name, path in wanted.items() if path is None]
    if missing:
        reason = _apt_install(missing) if install else "installing was turned off (--no-install)"
        wanted = {"wrk": _sbin_which("wrk"), "nginx": _sbin_which("nginx")}
        still = [name for name, path in wanted.items() if path is None]
        if still:
            raise ToolMissing(f"{' and '.join(still)} not installed: {reason or 'not found after apt-get'}")
    assert wanted["wrk"] is not None and wanted["nginx"] is not None
    return wanted["wrk"], wanted["nginx"]


def ensure_hey(install: bool) -> tuple[str | None, str]:
    """hey's path (Debian's `hey`, installed with apt-get if missing and allowed), or why there is none.

    hey is the load generator of the HTTPS_PROXY scenario: Go's HTTP client
    opens each connection with CONNECT through a proxy and keeps it alive.
    """
    found = _sbin_which("hey")
    if found:
        return found, ""
    if not install:
        return None, "hey is not installed (installing was turned off)"
    reason = _apt_install(["hey"])
    found = _sbin_which("hey")
    return (found, "") if found else (None, reason or "hey not found after apt-get")


def ensure_mitmdump(install: bool) -> tuple[str | None, str]:
    """mitmdump's path (next to this Python, on PATH, or in the bench's own venv), or why there is none."""
    here = Path(sys.executable).parent / "mitmdump"
    for candidate in (here, MITM_VENV / "bin" / "mitmdump"):
        if candidate.exists():
            return str(candidate), ""
    on_path = shutil.which("mitmdump")
    if on_path:
        return on_path, ""
    if not install:
        return None, "mitmproxy is not installed (installing was turned off)"
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(MITM_VENV)], check=True, capture_output=True, timeout=INSTALL_TIMEOUT
        )
        done = subprocess.run(
            [str(MITM_VENV / "bin" / "pip"), "install", "-q", MITM_REQUIREMENT],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"could not create a venv for mitmproxy ({exc})"
    if done.returncode != 0:
        return None, f"pip install {MITM_REQUIREMENT} failed: {done.stderr.strip()[-300:]}"
    return str(MITM_VENV / "bin" / "mitmdump"), ""


def ensure_matplotlib(install: bool) -> tuple[bool, str]:
    """Whether matplotlib can be imported (pip-installing it if allowed), and why not."""
    missing = _ensure_module("matplotlib", "matplotlib", install)
    return not missing, missing


def ensure_httptools(install: bool) -> str:
    """'' when httptools (the floor contender's parser) can be imported, pip-installing it if allowed; else why not."""
    return _ensure_module("httptools", "httptools>=0.6", install)


def _ensure_module(module: str, requirement: str, install: bool) -> str:
    """'' when `module` imports in this interpreter (after pip-installing `requirement` if allowed), else why not."""
    if _importable(module):
        return ""
    if not install:
        return f"{module} is not installed (installing was turned off)"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", requirement],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    if done.returncode != 0 or not _importable(module):
        return f"{module} could not be installed: {done.stderr.strip()[-300:]}"
    return ""


def _importable(module: str) -> bool:
    # A fresh process: an install made after this one started is not visible to its import system.
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, check=False)
    return probe.returncode == 0


def ensure_tools(install: bool = True) -> Tools:
    """Everything the bench uses; wrk and nginx are required, the rest optional."""
    wrk, nginx = ensure_wrk_nginx(install)
    mitmdump, mitm_missing = ensure_mitmdump(install)
    plotting, plot_missing = ensure_matplotlib(install)
    hey, hey_missing = ensure_hey(install)
    return Tools(
        wrk, nginx, mitmdump, mitm_missing, plotting, plot_missing, ensure_httptools(install), hey, hey_missing
    )


def _first_line_matching(args: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(1) if match else "unknown"


def _checkout() -> str:
    """The commit of the tokenproxy measured, and whether proxy/ had uncommitted changes."""
    repo = BENCH_DIR.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout"
    return f"git {commit}" + (" + uncommitted changes in proxy/" if git("status", "--porcelain", "--", "proxy") else "")


def versions(tools: Tools) -> dict[str, str]:
    """Versions of everything that was measured."""
    found = {
        "python": platform.python_version(),
        "aiohttp": importlib.metadata.version("aiohttp"),
        "tokenproxy": f"{importlib.metadata.version('tokenproxy')} ({_checkout()})",
        "nginx": _first_line_matching([tools.nginx, "-v"], r"nginx/(\S+)"),
        "wrk": _first_line_matching([tools.wrk, "-v"], r"wrk (\S+)"),
        "mitmproxy": "not installed",
    }
    found["hey"] = "not installed"
    if tools.hey:  # hey prints no version of its own; Debian's package has one
        found["hey"] = _first_line_matching(["dpkg-query", "-W", "-f=${Version}", "hey"], r"^(\S+)")
    if tools.mitmdump:
        found["mitmproxy"] = _first_line_matching([tools.mitmdump, "--version"], r"Mitmproxy: (\S+)")
    for package in ("uvloop", "httptools"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def machine() -> dict[str, str | int]:
    """CPU model, core count, memory and kernel of this machine."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024)
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib,
        "kernel": platform.release(),
    }

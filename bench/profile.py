"""Where a proxy's CPU goes under load: `python -m bench.profile [--contender C] [--seconds N]`.

Starts the upstream and one contender (tokenproxy-static by default),
loads it with wrk at 64 connections, samples it with py-spy (`pip install
py-spy`, part of the `bench` extra) and prints the functions with the most
samples: own time (the frame on top of the stack) and total time (the frame
anywhere on the stack), as shares of the busy samples (idle waits excluded).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from .contenders import BY_NAME, Stage
from .runner import warm
from .tools import Tools, ensure_httptools, ensure_wrk_nginx
from .wrk import run_wrk, write_script

# Frames on every stack (start-up and the event loop's own loop) say nothing in the total table.
_ENTRY_FRAMES = (
    "<frozen runpy>",
    "click/",
    "asyncio/runners.py",
    "proxy/__main__.py",
    "proxy/cli/",
    "run_forever",
    "run_until_complete",
    "_run_once",
)
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    """`handle (/x/site-packages/aiohttp/web_protocol.py:12)` → `handle (aiohttp/web_protocol.py)`."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3", "/work/main/", str(Path(__file__).resolve().parent.parent) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['name']} ({path})"


def top_functions(
    collapsed: str, count: int
) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]:
    """From py-spy's raw (collapsed) output: busy samples, top own-time and total-time functions, own time by file."""
    own: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = [_short(frame) for frame in stack.split(";")]
        weight = int(number)
        samples += weight
        own[frames[-1]] += weight
        files[frames[-1].rpartition(" (")[2].rstrip(")")] += weight
        for frame in set(frames):
            if not any(marker in frame for marker in _ENTRY_FRAMES):
                total[frame] += weight
    return samples, own.most_common(count), total.most_common(count), files.most_common(count)


def _print_table(title: str, rows: list[tuple[str, int]], samples: int) -> None:
    print(f"\n{title}")
    for name, number in rows:
        print(f"  {100 * number / samples:5.1f}%  {name}")


def main() -> int:
    """Profile one contender under load and print the top functions."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contender", default="tokenproxy-static", choices=[n for n in BY_NAME if n != "direct"])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("bench.profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    wrk, nginx_path = ensure_wrk_nginx(install=True)
    tools = Tools(wrk, nginx_path, None, "not needed", False, "not needed", ensure_httptools(install=True))
    with Stage(tools, 1 << 20) as stage, stage.start(BY_NAME[args.contender]) as running:
        url = running.url + "/tiny"
        warm(url)
        out = stage.run_dir / "profile.txt"
        load = threading.Thread(
            target=run_wrk, args=(wrk, write_script(stage.run_dir), url, args.connections, args.seconds + 2)
        )
        load.start()
        done = subprocess.run(
            [
                py_spy,
                "record",
                "--pid",
                str(running.pids()[0]),
                "--duration",
                str(args.seconds),
                "--format",
                "raw",
                "--function",
                "--nonblocking",
                "--output",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=args.seconds + 60,
            check=False,
        )
        load.join(args.seconds + 70)
        if done.returncode != 0 or not out.exists():
            print(f"bench.profile: py-spy failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
            return 1
        samples, own, total, files = top_functions(out.read_text(), args.top)
    print(f"{args.contender}, {args.connections} connections, {args.seconds} s: {samples} busy samples")
    _print_table("own time (top of stack)", own, samples)
    _print_table("total time (anywhere on the stack)", total, samples)
    _print_table("own time by file", files, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())

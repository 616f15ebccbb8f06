"""latest.png: requests/s and p99 against connections, one line per contender.

Drawn with matplotlib in a child process (it may have been installed after
this process started); when matplotlib is missing the caller notes that.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

_SCRIPT = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

scaling, title, out = json.loads(sys.stdin.read()), sys.argv[1], sys.argv[2]
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
for name, rows in scaling.items():
    levels = sorted(int(level) for level in rows)
    left.plot(levels, [rows[str(l)]["rps"] for l in levels], marker="o", label=name)
    right.plot(levels, [rows[str(l)]["p99_us"] / 1000 for l in levels], marker="o", label=name)
for axis, label in ((left, "requests/s"), (right, "p99 latency (ms)")):
    axis.set_xscale("log", base=2)
    ticks = sorted({int(level) for rows in scaling.values() for level in rows})
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.set_yscale("log")
    axis.set_xlabel("concurrent connections")
    axis.set_ylabel(label)
    axis.grid(True, which="both", alpha=0.3)
left.legend(fontsize=8)
fig.suptitle(title, fontsize=10)
fig.tight_layout()
fig.savefig(out, dpi=110, format="png")
"""


def draw(results: dict[str, Any], path: Path) -> str:
    """Draw the scaling chart into `path`; '' on success, else why there is no chart."""
    scaling = results.get("scenarios", {}).get("scaling")
    if not scaling:
        return "no scaling results to draw"
    meta = results["meta"]
    title = f"tokenproxy bench, scaling (tiny body) - {meta['machine']['cpu']}, {meta['machine']['cores']} cores"
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, title, str(path)],
        input=json.dumps(scaling),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        return f"matplotlib failed: {done.stderr.strip()[-300:]}"
    return ""

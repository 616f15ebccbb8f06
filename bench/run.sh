#!/usr/bin/env bash
# The benchmark of issue 6 in one command: bench/run.sh [--quick] [--out DIR] [--only ...] [--contenders ...]
# Makes the project's venv if there is none, then runs `python -m bench` from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q -e .
fi
exec .venv/bin/python -m bench "$@"

#!/usr/bin/env bash
# Set up .venv for mergekit-nan on a fresh machine; quick to re-run.
# torch is pinned first: 2.13.0 is the CPU wheel here, while an unpinned torch
# pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,plot]"

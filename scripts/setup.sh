#!/usr/bin/env bash
# Set up a virtual environment for mergekit-nan on a fresh machine; quick to re-run.
#   ./scripts/setup.sh                                   # .venv, the newest mergekit the pin allows
#   VENV=.venv-0.1.4 MERGEKIT="mergekit==0.1.4 transformers<5" ./scripts/setup.sh   # another mergekit, its own venv
#   VENV=.venv-main MERGEKIT="-e /path/to/mergekit" ./scripts/setup.sh                # a git-main clone
# MERGEKIT is passed to pip as given, so it carries each mergekit's own transformers:
# the index's 0.1.4 needs transformers<5 (it fails under 5, which its pin allows);
# git main pins transformers>=5 itself, so give it no transformers requirement.
# torch is pinned first: 2.13.0 is the CPU wheel here, while an unpinned torch pulls
# several GB of CUDA packages. A mergekit installed before the plugin is kept (the
# plugin accepts mergekit>=0.1.4,<0.2 and pip changes nothing that satisfies it).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.13.0
if [ -n "${MERGEKIT:-}" ]; then
  read -ra requirements <<< "$MERGEKIT"
  "$venv/bin/python" -m pip install -q "${requirements[@]}"
fi
"$venv/bin/python" -m pip install -q -e ".[test,plot]"

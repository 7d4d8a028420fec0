#!/usr/bin/env bash
# The wheels cuda_check.py needs on the lent GPU machine (Python 3.12, x86-64, no package index)
# that its image lacks: mergekit 0.1.5; pydantic, its parts and immutables (mergekit imports them);
# typing-extensions (pydantic needs a newer one than the image may hold); and this checkout's
# mergekit-nan. Into .whl/ (git-ignored, ~3.5 MB), carried by the device tool's `carry`; the
# device command in README.md installs them there with --no-index. Versions are this checkout's
# .venv's (./scripts/setup.sh), the ones the tests run with.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=.venv/bin/python
pins=(mergekit==0.1.5)
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions immutables; do
  pins+=("$name==$("$python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")")
done
rm -rf .whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${pins[@]}"
"$python" -m pip wheel -q --no-deps -w .whl .
ls .whl

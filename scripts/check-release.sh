#!/usr/bin/env bash
# The release as a user gets it: build the sdist and the wheel (the wheel from the sdist), check both, install the
# wheel into a fresh environment and merge with the plain mergekit-yaml from outside the checkout.
#   bash scripts/check-release.sh            # from anywhere; KEEP=1 keeps the temporary folder
# PYTHON picks the interpreter for the fresh environments (default python3). Needs the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/mergekit-nan-release.XXXXXX")
case "$work/" in "$root"/*)
  echo "check-release: the temporary folder $work lies inside the checkout; set TMPDIR elsewhere" >&2
  exit 1 ;;
esac
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT
mkdir -p "$work/logs" "$work/dist" "$work/run"

timings=()
# step NAME COMMAND...: run COMMAND with its output in a log (pip is noisy); on failure show the log's end.
step() {
  local name=$1 started=$SECONDS
  shift
  if ! "$@" > "$work/logs/$name.log" 2>&1; then
    echo "check-release: step '$name' failed: $*" >&2
    tail -n 40 "$work/logs/$name.log" >&2
    exit 1
  fi
  timings+=("$name $((SECONDS - started))s")
}

# Build tools in their own environment, so neither .venv nor the fresh one below holds them.
step tools-venv "$python" -m venv "$work/tools"
step tools-install "$work/tools/bin/python" -m pip install --upgrade pip build twine
step build "$work/tools/bin/python" -m build --outdir "$work/dist" "$root"
step twine-check "$work/tools/bin/twine" check --strict "$work/dist"/*

# What the archives hold: prints the wheel's path and version.
archives=$("$work/tools/bin/python" - "$work/dist" <<'EOF'
import email.parser, glob, os, sys, tarfile, zipfile

dist = sys.argv[1]
wheels, sdists = glob.glob(f"{dist}/*.whl"), glob.glob(f"{dist}/*.tar.gz")
if len(wheels) != 1 or len(sdists) != 1:
    sys.exit(f"check-release: expected one wheel and one sdist in {dist}, found {os.listdir(dist)}")
wheel_files = zipfile.ZipFile(wheels[0]).namelist()
with tarfile.open(sdists[0]) as archive:
    prefix = archive.getnames()[0].split("/")[0] + "/"
    sdist_files = [m.name.removeprefix(prefix) for m in archive.getmembers() if m.isfile()]

problems = []
for name in ["mergekit_nan/__init__.py", "mergekit_nan/schema/nan_coefficients-1.json",
             "_mergekit_nan_hook.py", "mergekit_nan.pth", "mergekit_nan.start"]:
    if name not in wheel_files:
        problems.append(f"the wheel lacks {name}")
# every file of the package, Python or not, goes from the sdist into the wheel
package = {f for f in sdist_files if f.startswith("mergekit_nan/")}
problems += [f"the wheel lacks {f}, which the sdist has" for f in sorted(package - set(wheel_files))]
for name in ["pyproject.toml", "PKG-INFO", "README.md", "CHANGELOG.md", "LICENSE", "COPYING",
             "hook/_mergekit_nan_hook.py", "hook/mergekit_nan.pth", "hook/mergekit_nan.start"]:
    if name not in sdist_files:
        problems.append(f"the sdist lacks {name}")
# benchmarks (MB of results, caches), work folders and byte code stay out of the sdist
unwanted = ("benchmarks/", "demo-out/", ".venv", ".ci/", "/cache/", "/work/", "__pycache__", ".pyc")
problems += [f"the sdist holds {f}" for f in sdist_files if any(u in "/" + f for u in unwanted)]
size = os.path.getsize(sdists[0])
if size > 1024 * 1024:
    problems.append(f"the sdist is {size} bytes, over 1 MiB: what was added?")
if problems:
    sys.exit("check-release: " + "\n  ".join(["the built archives are wrong:", *problems]))

with zipfile.ZipFile(wheels[0]) as archive:
    metadata = next(n for n in wheel_files if n.endswith(".dist-info/METADATA"))
    version = email.parser.Parser().parsestr(archive.read(metadata).decode())["Version"]
print(wheels[0], version)
EOF
)
read -r wheel version <<< "$archives"
sdist=$(ls "$work/dist"/*.tar.gz)

# A fresh environment as a user makes it: torch pinned first (2.13.0 is the CPU wheel; an unpinned torch pulls
# GBs of CUDA packages), then mergekit, then the built wheel (not editable, not the checkout).
venv=$work/venv
step venv "$python" -m venv "$venv"
step pip-upgrade "$venv/bin/python" -m pip install --upgrade pip
step torch "$venv/bin/python" -m pip install torch==2.13.0
step mergekit "$venv/bin/python" -m pip install mergekit==0.1.5
step wheel "$venv/bin/python" -m pip install "$wheel"
step pip-check "$venv/bin/python" -m pip check

# From a folder outside the checkout, with nothing on PYTHONPATH: only the installed package can be imported.
cd "$work/run"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONNOUSERSITE=1 OMP_NUM_THREADS=2
unset PYTHONPATH

step installed "$venv/bin/python" - "$root" "$venv" "$version" <<'EOF'
import importlib.metadata, os, sys

root, venv = (os.path.realpath(p) for p in sys.argv[1:3])
wheel_version = sys.argv[3]
import mergekit_nan

where = os.path.realpath(mergekit_nan.__file__)
if where.startswith(root + os.sep) or not where.startswith(venv + os.sep):
    sys.exit(f"mergekit_nan was imported from {where}, not from the fresh environment {venv}")
installed = importlib.metadata.version("mergekit-nan")
if not installed == mergekit_nan.__version__ == wheel_version:
    sys.exit(f"versions differ: metadata {installed}, __version__ {mergekit_nan.__version__}, wheel {wheel_version}")
print(where, installed)
EOF

# A tiny LLaMA base and two stand-in fine-tunes (deltas 4x apart), safetensors in the HF layout.
step family "$venv/bin/python" - "$work/run" <<'EOF'
import os, sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

root = sys.argv[1]
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=False)
config.architectures = ["LlamaForCausalLM"]
torch.manual_seed(0)
base = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
for name, scale in [("base", 0.0), ("ft-small", 0.01), ("ft-large", 0.04)]:
    path = os.path.join(root, name)
    config.save_pretrained(path)
    generator = torch.Generator().manual_seed(len(name))
    state = {k: (v + scale * torch.randn(v.shape, generator=generator)).contiguous() for k, v in base.items()}
    save_file(state, os.path.join(path, "model.safetensors"))
EOF

methods=(nan_ties nan_task_arithmetic)
for method in "${methods[@]}"; do
  extra=""
  [ "$method" = nan_ties ] && extra=", density: 0.5"
  cat > "$method.yml" <<EOF
merge_method: $method
base_model: $work/run/base
models:
  - model: $work/run/ft-small
    parameters: {weight: 1.0$extra}
  - model: $work/run/ft-large
    parameters: {weight: 1.0$extra}
dtype: float32
EOF
  # the plain mergekit-yaml: it finds the nan_* methods through the wheel's .pth hook alone
  step "merge-$method" "$venv/bin/mergekit-yaml" "$method.yml" "out-$method"
  step "record-$method" "$venv/bin/python" - "out-$method" "$method" "$work/run/base" <<'EOF'
import glob, json, math, os, sys

from safetensors import safe_open

out, method, base = sys.argv[1:4]
shards = glob.glob(os.path.join(out, "model*.safetensors"))
if not shards:
    sys.exit(f"{out} has no model*.safetensors: {sorted(os.listdir(out))}")
names = set()
for shard in shards:
    with safe_open(shard, "pt") as handle:
        for name in handle.keys():
            if not handle.get_tensor(name).isfinite().all():
                sys.exit(f"{shard}: {name} is not finite")
            names.add(name)
with safe_open(os.path.join(base, "model.safetensors"), "pt") as handle:
    if names != set(handle.keys()):
        sys.exit(f"the merge's tensors differ from the base's: {sorted(names ^ set(handle.keys()))}")
record_path = os.path.join(out, "nan_coefficients.json")
if not os.path.exists(record_path):
    sys.exit(f"{out} has no nan_coefficients.json: {sorted(os.listdir(out))}")
with open(record_path, encoding="utf-8") as handle:
    record = json.load(handle)
wrapped = method.removeprefix("nan_")
if (record["merge_method"], record["wrapped_method"]) != (method, wrapped):
    sys.exit(f"the record says {record['merge_method']} over {record['wrapped_method']}, not {method} over {wrapped}")
if not record["tensors"]:
    sys.exit("the record has no tensors")
# NAN gives the longer delta the smaller coefficient
mean = [sum(t["coefficients"][i] for t in record["tensors"]) / len(record["tensors"]) for i in range(2)]
if not mean[1] < mean[0] or not all(math.isfinite(m) for m in mean):
    sys.exit(f"mean coefficients {mean} of {record['models']}: the 4x longer delta should weigh less")
print(f"{method}: {len(names)} tensors, {len(record['tensors'])} recorded, mean coefficients {mean[0]:.3f} / {mean[1]:.3f}, "
      f"temperature {record['parameters'].get('temperature')}")
EOF
done
# the wheel's own console script
step inspect "$venv/bin/mergekit-nan" inspect nan_ties.yml
grep -q "^nan_ties over" "$work/logs/inspect.log" || { echo "check-release: unexpected inspect output:" >&2; cat "$work/logs/inspect.log" >&2; exit 1; }

echo "check-release: OK, mergekit-nan $version"
echo "  built:     $(basename "$sdist") ($(du -k "$sdist" | cut -f1) KiB), $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB); twine check --strict passed"
echo "  installed: torch==2.13.0, mergekit==0.1.5, the wheel, into a fresh venv ($("$python" --version 2>&1))"
for method in "${methods[@]}"; do echo "  merged:    $(tail -n 1 "$work/logs/record-$method.log")"; done
echo "  times:     ${timings[*]} (total ${SECONDS}s)"

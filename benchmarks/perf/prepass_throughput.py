"""Throughput of the `granularity: layer|model` pre-pass, against its two parts alone.

The pre-pass (mergekit_nan.adapters.mergekit_io) streams every tensor of the base and the
fine-tunes through mergekit's loaders and norms the deltas. Timed here, in one
process, interleaved, best of `--rounds`:
  prepass   mergekit_nan.adapters.mergekit_io.NormPass, every group, as a merge runs it
  read      the same loads through mergekit's loaders, no norms (the reading alone)
  norms     delta_norms over the same tensors already in memory (the kernel alone)
GB/s are bytes of input tensors (base + fine-tunes) per second. The pre-pass also
counts its loads: every input tensor must be read exactly once.

    python benchmarks/perf/make_smollm2.py && python benchmarks/perf/prepass_throughput.py
    python benchmarks/perf/prepass_throughput.py --smoke      # tiny random LLaMA (CI)
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_smollm2  # noqa: E402
import merge_cost  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--granularity", default="model", choices=["model", "layer"])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results_prepass_throughput.json"))
    args = parser.parse_args()

    import torch
    from mergekit.common import ModelReference

    from mergekit_nan.adapters import mergekit_io as prepass
    from mergekit_nan.core.norms import delta_norms
    from mergekit_nan.core.parameters import NanSettings

    if args.smoke:
        args.rounds = 1
        base_dir, finetune_dirs = merge_cost.build_tiny(Path(tempfile.mkdtemp(prefix="nan-prepass-")))
    else:
        base_dir, finetune_dirs = make_smollm2.build()
    merge_cost.warm_page_cache([base_dir, *finetune_dirs])
    base = ModelReference.parse(str(base_dir))
    models = [ModelReference.parse(str(d)) for d in finetune_dirs]
    dtype, device = torch.bfloat16, torch.device("cpu")
    settings = NanSettings(granularity=args.granularity)
    plan = prepass.NormPass(base, tuple(models), settings, dtype, device).plan
    # every stored tensor once (a tied head is the embedding, stored once)
    stored = {}
    for name, planned in plan.items():
        keys = tuple(prepass._stored_key(m, name, planned) for m in (base, *models))
        stored.setdefault(keys, name)

    loads = collections.Counter()
    real_load = prepass.NormPass._load

    def counting_load(self, model, name):
        tensor = real_load(self, model, name)
        if tensor is not None:
            loads[(str(model), prepass._stored_key(model, name, self.plan[name]))] += 1
        return tensor

    def run_prepass():
        loads.clear()
        prepass.NormPass._load = counting_load
        try:
            norm_pass = prepass.NormPass(base, tuple(models), settings, dtype, device)
            return [norm_pass.norms_of(name) for name in norm_pass.plan]
        finally:
            prepass.NormPass._load = real_load

    reader = prepass.NormPass(base, tuple(models), settings, dtype, device)

    def run_read():
        count = 0
        for name in stored.values():
            for model in (base, *models):
                tensor = real_load(reader, model, name)
                count += 0 if tensor is None else tensor.numel() * tensor.element_size()
        return count

    in_memory = [[real_load(reader, m, name) for m in (base, *models)] for name in stored.values()]

    def run_norms():
        for tensors in in_memory:
            delta_norms(tensors[0], tensors[1:])

    nbytes = run_read()
    run_prepass()  # warm-up (loader cache, page cache)
    best = {"prepass": float("inf"), "read": float("inf"), "norms": float("inf")}
    for _ in range(args.rounds):
        for label, fn in (("prepass", run_prepass), ("read", run_read), ("norms", run_norms)):
            start = time.perf_counter()
            fn()
            best[label] = min(best[label], time.perf_counter() - start)
    expected = {(str(m), key) for keys in stored for m, key in zip((base, *models), keys)}
    read_once = set(loads) == expected and set(loads.values()) == {1}

    gbps = {k: nbytes / v / 1e9 for k, v in best.items()}
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "model": str(base_dir),
        "fine-tunes": len(models),
        "granularity": args.granularity,
        "input_bytes": nbytes,
        "rounds": args.rounds,
        "load_average": os.getloadavg(),
    }
    print(f"{meta['date']} {meta['machine']} cpus={meta['cpus']} load={meta['load_average'][0]:.2f}")
    print(
        f"{base_dir.name} + {len(models)} fine-tunes, {nbytes / 1e9:.2f} GB of bf16 input tensors, "
        f"granularity {args.granularity}, best of {args.rounds}"
    )
    print("| pass | seconds | GB/s of input |")
    print("|---|---|---|")
    for label in ("prepass", "read", "norms"):
        print(f"| {label} | {best[label]:.3f} | {gbps[label]:.2f} |")
    ideal = best["read"] + best["norms"]
    print(
        f"pre-pass / (read + norms) = {best['prepass'] / ideal:.3f}; "
        f"every input tensor read exactly once: {read_once} ({sum(loads.values())} loads)"
    )
    if not read_once:
        raise SystemExit("the pre-pass did not read each input tensor exactly once")
    if not args.smoke:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(
                {"meta": meta, "seconds": best, "gb_per_s": gbps, "read_once": read_once, "loads": sum(loads.values())},
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()

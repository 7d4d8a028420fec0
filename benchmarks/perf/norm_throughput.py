"""Throughput and scratch memory of NAN's only added work: one delta norm per model per tensor.

Compares, on one tensor family (a base and K fine-tunes), in separate child processes
so that each variant's peak RSS is its own:
  chunked  mergekit_nan.core.norms.delta_norms (what the merge methods run)
  naive    (t.float() - base.float()).norm() per model
  memory   torch.linalg.vector_norm over float32 data already in memory: this
           machine's memory-speed ceiling for reading the same bytes
Throughput is bytes of input tensors read (base + K models) per second; each variant
is timed `--repeat` times, interleaved, and the best run is kept. The first timed
call also checks the chunked result against a float64 reference (1e-6 relative).

    python benchmarks/perf/norm_throughput.py                 # 2^28 elements, bf16/fp16/fp32
    python benchmarks/perf/norm_throughput.py --smoke         # CI: seconds
    python benchmarks/perf/norm_throughput.py --device cuda   # where a GPU is lent
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

DTYPES = ("bfloat16", "float16", "float32")


def child(variant: str, dtype_name: str, log2: int, models: int, repeat: int, device: str) -> dict:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from mergekit_nan.core.norms import Scratch, delta_norms

    scratch = Scratch()  # kept between calls, as a merge's session keeps it

    dtype = getattr(torch, dtype_name)
    n = 1 << log2
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=gen).to(dtype)
    tuned = [(base.float() + 1e-2 * (i + 1) * torch.randn(n, generator=gen)).to(dtype) for i in range(models)]
    if variant == "memory":
        tuned = [t.float() for t in tuned]
    base, tuned = base.to(device), [t.to(device) for t in tuned]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    nbytes = base.numel() * base.element_size() + sum(t.numel() * t.element_size() for t in tuned)
    if variant == "memory":
        nbytes = sum(t.numel() * t.element_size() for t in tuned)

    def run():
        if variant == "chunked":
            return list(delta_norms(base, tuned, scratch=scratch).delta_norms)
        if variant == "naive":
            return [(t.float() - base.float()).norm().item() for t in tuned]
        return [torch.linalg.vector_norm(t).item() for t in tuned]

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run()
    extra_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    error = None
    if variant == "chunked":
        reference = []
        for t in tuned:  # float64, chunked so the reference itself fits in memory
            total = 0.0
            for s in range(0, n, 1 << 22):
                total += ((t[s : s + (1 << 22)].double() - base[s : s + (1 << 22)].double()) ** 2).sum().item()
            reference.append(total**0.5)
        error = max(abs(a - b) / b for a, b in zip(result, reference))
    best = float("inf")
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - start)
    return {
        "variant": variant,
        "dtype": dtype_name,
        "elements": n,
        "models": models,
        "gb_per_s": nbytes / best / 1e9,
        "seconds": best,
        "extra_peak_rss_mib": extra_kib / 1024,
        "max_rel_error_vs_float64": error,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log2", type=int, default=28, help="elements per tensor: 2^LOG2")
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of child processes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results_norm_throughput.json"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.log2, args.models, args.repeat, args.device)))
        return
    if args.smoke:
        args.log2, args.repeat, args.rounds = 20, 2, 1
    rows = []
    for _ in range(args.rounds):
        for dtype in DTYPES:
            for variant in ("chunked", "naive", "memory"):
                command = [
                    sys.executable,
                    __file__,
                    "--child",
                    variant,
                    dtype,
                    "--log2",
                    str(args.log2),
                    "--models",
                    str(args.models),
                    "--repeat",
                    str(args.repeat),
                    "--device",
                    args.device,
                ]
                rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    best = {}
    for row in rows:  # best of the interleaved rounds
        key = (row["variant"], row["dtype"])
        if key not in best or row["gb_per_s"] > best[key]["gb_per_s"]:
            best[key] = row
    import torch

    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device": args.device,
        "command": " ".join(sys.argv),
    }
    print(f"{meta['date']} {meta['machine']} cpus={meta['cpus']} torch={meta['torch']} device={args.device}")
    print(
        f"tensors of 2^{args.log2} elements, base + {args.models} models; GB/s of input read, best of {args.rounds}x{args.repeat}"
    )
    print(
        "| dtype | chunked GB/s | naive GB/s | float32 read (memory speed) GB/s | chunked / naive | chunked extra peak RSS MiB | naive extra peak RSS MiB | chunked rel. error vs float64 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dtype in DTYPES:
        c, n, m = best[("chunked", dtype)], best[("naive", dtype)], best[("memory", dtype)]
        print(
            f"| {dtype} | {c['gb_per_s']:.2f} | {n['gb_per_s']:.2f} | {m['gb_per_s']:.2f} | {c['gb_per_s'] / n['gb_per_s']:.1f}x "
            f"| {c['extra_peak_rss_mib']:.0f} | {n['extra_peak_rss_mib']:.0f} | {c['max_rel_error_vs_float64']:.1e} |"
        )
        assert c["max_rel_error_vs_float64"] < 1e-6, c
    if not args.smoke:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()

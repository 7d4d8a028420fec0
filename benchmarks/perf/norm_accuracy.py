"""Accuracy of the chunked delta norm against a float64 reference, from 1 element to 2^30.

For each dtype (bf16, fp16, fp32) and size, a base tensor and a fine-tune are drawn
(seeded), mergekit_nan.core.norms.delta_norms computes ||base|| and ||tuned - base||, and
a float64 computation over the same stored values is the reference. Besides ordinary
deltas (1e-2 of the base's scale), deltas whose squares overflow the input dtype or
float32 and deltas whose squares underflow float32 must give finite, exact norms.

    python benchmarks/perf/norm_accuracy.py            # sizes up to 2^30 (~6 GiB peak, minutes)
    python benchmarks/perf/norm_accuracy.py --smoke    # up to 2^20, seconds (CI)

Fails (exit 1) if any relative error exceeds 1e-6 or any norm is not finite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from mergekit_nan.core.norms import delta_norms  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOLERANCE = 1e-6
# (case, base scale, delta scale) per dtype: squares of these overflow the dtype (or float32)
# or underflow float32, so a plain float32 sum of squares would be inf or 0.
EXTREMES = {
    "bfloat16": [("squares overflow float32", 1e37, 3e37), ("squares underflow float32", 1e-24, 1e-25)],
    "float16": [("squares overflow float16", 0.0, 3e4), ("squares underflow float16", 0.0, 1e-5)],
    "float32": [("squares overflow float32", 1e30, 1e30), ("squares underflow float32", 1e-24, 1e-25)],
}


def make_pair(n: int, dtype: torch.dtype, base_scale: float, delta_scale: float, seed: int):
    """Base and tuned tensors of n elements, generated in 2^24-element pieces (bounded temporaries)."""
    gen = torch.Generator().manual_seed(seed)
    limit = torch.finfo(dtype).max / 2  # stay finite after rounding to the dtype
    base, tuned = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    piece = 1 << 24
    for start in range(0, n, piece):
        stop = min(n, start + piece)
        b = base_scale * torch.randn(stop - start, generator=gen, dtype=torch.float64)
        d = delta_scale * torch.randn(stop - start, generator=gen, dtype=torch.float64)
        base[start:stop] = b.clamp(-limit, limit).to(dtype)
        tuned[start:stop] = (b + d).clamp(-limit, limit).to(dtype)
    return base, tuned


def reference(base: torch.Tensor, tuned: torch.Tensor) -> tuple[float, float]:
    """float64 norms of the stored values, with a scale factor so squares cannot overflow."""
    piece = 1 << 22

    def norm(get) -> float:
        peak = max((get(s).abs().max().item() for s in range(0, base.numel(), piece)), default=0.0)
        if peak == 0.0:
            return 0.0
        total = sum(((get(s) / peak) ** 2).sum().item() for s in range(0, base.numel(), piece))
        return peak * math.sqrt(total)

    def base_piece(s):
        return base[s : s + piece].double()

    def delta_piece(s):
        return tuned[s : s + piece].double() - base[s : s + piece].double()

    return norm(base_piece), norm(delta_piece)


def rel_error(got: float, want: float) -> float:
    if want == 0.0:
        return 0.0 if got == 0.0 else math.inf
    return abs(got - want) / want


def check(case: str, dtype_name: str, n: int, base_scale: float, delta_scale: float, seed: int) -> dict:
    base, tuned = make_pair(n, DTYPES[dtype_name], base_scale, delta_scale, seed)
    start = time.perf_counter()
    result = delta_norms(base, [tuned])
    seconds = time.perf_counter() - start
    want_base, want_delta = reference(base, tuned)
    got_base, got_delta = result.base_norm, result.delta_norms[0]
    row = {
        "case": case,
        "dtype": dtype_name,
        "elements": n,
        "delta_norm": got_delta,
        "reference": want_delta,
        "finite": math.isfinite(got_delta) and math.isfinite(got_base),
        "rel_error_delta": rel_error(got_delta, want_delta),
        "rel_error_base": rel_error(got_base, want_base),
        "seconds": round(seconds, 3),
    }
    row["ok"] = row["finite"] and max(row["rel_error_delta"], row["rel_error_base"]) <= TOLERANCE
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-log2", type=int, default=30)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results_norm_accuracy.json"))
    args = parser.parse_args()
    if args.smoke:
        args.max_log2 = 20
    # odd sizes around the 2^19-element slice boundary, then powers of two up to the maximum
    sizes = [1, 2, 3, 1000, (1 << 19) - 1, (1 << 19) + 1, 3 << 19]
    sizes += [1 << k for k in range(20, args.max_log2 + 1, 2)]
    if args.max_log2 % 2:
        sizes.append(1 << args.max_log2)
    sizes = sorted({s for s in sizes if s <= 1 << args.max_log2})
    rows = []
    for dtype_name in DTYPES:
        for index, n in enumerate(sizes):
            rows.append(check("ordinary (delta 1e-2 of base)", dtype_name, n, 1.0, 1e-2, index))
            print(_line(rows[-1]), flush=True)
        for case, base_scale, delta_scale in EXTREMES[dtype_name]:
            for n in (1, 1000, min(1 << args.max_log2, (1 << 22) + 1)):
                rows.append(check(case, dtype_name, n, base_scale, delta_scale, n))
                print(_line(rows[-1]), flush=True)
    worst = max(max(r["rel_error_delta"], r["rel_error_base"]) for r in rows)
    failed = [r for r in rows if not r["ok"]]
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    print(
        f"{len(rows)} checks, sizes 1 .. 2^{args.max_log2}, worst relative error {worst:.1e} "
        f"(tolerance {TOLERANCE:g}); failed: {len(failed)}"
    )
    if not args.smoke:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"meta": meta, "rows": rows, "worst_rel_error": worst}, handle, indent=1)
    return 1 if failed else 0


def _line(row: dict) -> str:
    n = row["elements"]
    size = f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 and n > 2 else str(n)
    return (
        f"{row['dtype']:8s} {size:>8s} {row['case']:30s} delta {row['rel_error_delta']:.1e} "
        f"base {row['rel_error_base']:.1e} {'ok' if row['ok'] else 'FAIL'} ({row['seconds']:.2f}s)"
    )


if __name__ == "__main__":
    sys.exit(main())

"""How fast the norm step could be with a fused, compiled kernel (not shipped).

NAN's norm step is written in torch ops: per slice, a convert-copy, a squared
difference and a sum, three passes over cache-resident scratch. This script builds a
throwaway C loop that does all of it in one pass over the inputs (bf16 bits shifted
to float32, per-4096-element float32 sums added into float64, OpenMP over blocks)
with the system C compiler, and times both on the same bf16 tensors. It measures the
headroom a compiled extension would buy; the plugin does not ship one (see the
README's Cost section). Needs `cc`; without one it says so and exits 0.

  python benchmarks/perf/fused_bound.py            # 2^26-element tensors, base + 3 models, best of 5
  python benchmarks/perf/fused_bound.py --smoke    # 2^16 elements, 1 round

`merge_breakdown.py --fused-prototype` routes the norm step of real merges through
this loop (`patch_norms`) to see what it would do to a whole merge.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from mergekit_nan.core import norms  # noqa: E402

SOURCE = r"""
#include <stdint.h>
#include <string.h>
static inline float widen(uint16_t bits) {  /* bf16 -> float32: the same bits, shifted */
    uint32_t u = (uint32_t)bits << 16; float f; memcpy(&f, &u, 4); return f;
}
/* sums[0] = sum base^2; sums[1 + j] = sum (model_j - base)^2, for up to 15 models */
void sums_of_squares(const uint16_t *base, const uint16_t **models, int k, long n, double *sums) {
    const long block = 4096, blocks = (n + block - 1) / block;
    for (int j = 0; j <= k; j++) sums[j] = 0.0;
    #pragma omp parallel
    {
        double local[16] = {0};
        #pragma omp for schedule(static)
        for (long b = 0; b < blocks; b++) {
            long start = b * block, stop = start + block < n ? start + block : n;
            float acc = 0;
            for (long i = start; i < stop; i++) { float x = widen(base[i]); acc += x * x; }
            local[0] += acc;
            for (int j = 0; j < k; j++) {
                const uint16_t *m = models[j];
                acc = 0;
                for (long i = start; i < stop; i++) { float d = widen(m[i]) - widen(base[i]); acc += d * d; }
                local[j + 1] += acc;
            }
        }
        #pragma omp critical
        for (int j = 0; j <= k; j++) sums[j] += local[j];
    }
}
"""


def build(work: Path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    work.mkdir(parents=True, exist_ok=True)
    (work / "fused.c").write_text(SOURCE)
    lib = work / "fused.so"
    subprocess.run(
        [
            cc,
            "-O3",
            "-march=native",
            "-ffast-math",
            "-fopenmp",
            "-shared",
            "-fPIC",
            str(work / "fused.c"),
            "-o",
            str(lib),
        ],
        check=True,
    )
    return ctypes.CDLL(str(lib))


def fused_sums(lib, base: torch.Tensor, tuned) -> list:
    """[sum(base^2), sum((t - base)^2) ...] of contiguous bf16 CPU tensors, by the C loop."""
    pointers = (ctypes.c_void_p * max(1, len(tuned)))(*[t.data_ptr() for t in tuned])
    sums = (ctypes.c_double * (len(tuned) + 1))()
    lib.sums_of_squares(ctypes.c_void_p(base.data_ptr()), pointers, len(tuned), ctypes.c_long(base.numel()), sums)
    return list(sums)


def patch_norms(lib) -> None:
    """Send NAN's float32-accumulated bf16 norm step through the C loop (for merge_breakdown)."""
    plain = norms._sums_of_squares

    def fused(base, tuned, chunk, dtype, scratch=None, on_cpu=None):
        tensors = (base, *tuned)
        if (
            dtype != torch.float32
            or len(tuned) > 15
            or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors)
        ):
            return plain(base, tuned, chunk, dtype, scratch, on_cpu)
        return fused_sums(lib, base, tuned)

    norms._sums_of_squares = fused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2", type=int, default=26, help="elements per tensor, as a power of 2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.log2, args.rounds = 16, 1
    lib = build(HERE / "work" / "fused_bound")
    if lib is None:
        print("no C compiler (cc) here: nothing to measure")
        return

    n = 1 << args.log2
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(n, generator=gen)
    base = weights.bfloat16()
    tuned = [(weights + 0.01 * torch.randn(n, generator=gen)).bfloat16() for _ in range(3)]
    want = [(base.double() ** 2).sum().item()] + [((t.double() - base.double()) ** 2).sum().item() for t in tuned]

    def fused():
        return fused_sums(lib, base, tuned)

    scratch = norms.Scratch()  # kept between calls, as in a merge

    def torch_kernel():
        return norms._sums_of_squares(base, tuned, 0, torch.float32, scratch)

    best = {"torch ops (what NAN runs)": float("inf"), "fused C loop": float("inf")}
    errors = {}
    for _ in range(args.rounds):
        for label, fn in zip(best, (torch_kernel, fused)):
            start = time.perf_counter()
            got = fn()
            best[label] = min(best[label], time.perf_counter() - start)
            errors[label] = max(abs(g - w) / w for g, w in zip(got, want))
    nbytes = 4 * n * base.element_size()
    print(
        f"2^{args.log2}-element bf16 tensors, base + 3 models, {torch.get_num_threads()} threads, best of {args.rounds}"
    )
    print("| kernel | GB/s of input | rel. error vs float64 (sums of squares) |")
    print("|---|---|---|")
    for label, seconds in best.items():
        print(f"| {label} | {nbytes / seconds / 1e9:.2f} | {errors[label]:.1e} |")
    fused_s, torch_s = best["fused C loop"], best["torch ops (what NAN runs)"]
    print(f"fused / torch time: {fused_s / torch_s:.3f}")
    if max(errors.values()) > 1e-5:
        raise SystemExit("a kernel disagrees with float64")


if __name__ == "__main__":
    main()

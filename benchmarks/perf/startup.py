"""What the import hook adds to every interpreter start (`python -c pass`).

The .pth line imports `_mergekit_nan_hook` (stdlib only) and calls install(). Python's
own `-X importtime` reports the import's cumulative cost; install() is timed in
process. Median over `--runs` fresh interpreters. Target: under 5 ms.

    python benchmarks/perf/startup.py [--runs 30] [--smoke]
"""

import argparse
import statistics
import subprocess
import sys
import timeit


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    runs = 3 if args.smoke else args.runs
    import_us, modules = [], set()
    for _ in range(runs):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
        lines = [line for line in err.splitlines() if line.startswith("import time:") and "|" in line]
        hook = [line for line in lines if line.rstrip().endswith("_mergekit_nan_hook")]
        if not hook:
            sys.exit("the hook is not installed in this interpreter (pip install the project first)")
        import_us.append(int(hook[-1].split("|")[1]))
        modules |= {line.split("|")[2].strip() for line in lines}
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "mergekit", "mergekit_nan", "transformers"))
    code = "import _mergekit_nan_hook as h, sys; f = [x for x in sys.meta_path if type(x).__name__ == '_TargetFinder']"
    setup = code + "; sys.meta_path[:] = [x for x in sys.meta_path if x not in f]"
    install_us = min(timeit.repeat("h.install(); sys.meta_path.pop(0)", setup, number=1000, repeat=5)) / 1000 * 1e6
    total = statistics.median(import_us) + install_us
    print(
        f"hook import (median of {runs} starts): {statistics.median(import_us)} us; install(): {install_us:.1f} us;"
        f" total {total / 1000:.3f} ms; heavy modules imported at start-up: {heavy or 'none'}"
    )
    assert not heavy


if __name__ == "__main__":
    main()

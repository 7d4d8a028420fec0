"""What the shares report adds to `mergekit-nan inspect`: the same config inspected with and without it.

    python benchmarks/perf/inspect_cost.py --model 3b --cold --reps 2   # the 3B family, page cache dropped per run
    python benchmarks/perf/inspect_cost.py --smoke                      # CI: a tiny random LLaMA, 1 rep

Runs `mergekit-nan inspect` on a nan_ties config (density 0.5, the TIES family: trim, election and shares) of
merge_cost.py's families, alternating `--no-shares` (the coefficients only, as inspect was before the report) and
the full report, and reports wall and CPU seconds of each and their ratio. Writes results_inspect_cost_<model>.json
and .md beside this file (smoke: under a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from merge_cost import (  # noqa: E402
    THREE_B,
    build_sharded,
    build_tiny,
    drop_page_cache,
    machine_info,
    merge_yaml,
    warm_page_cache,
)

from mergekit_nan.yaml_run import write_config  # noqa: E402

VARIANTS = {"coefficients only (--no-shares)": ["--no-shares"], "with the shares report": []}


def timed(command: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["3b", "tiny"], default="3b")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="inspect_cost_"))
    if args.smoke:
        args.model, args.reps, args.cold = "tiny", 1, False
        base, finetunes = build_tiny(scratch / "models")
    else:
        base, finetunes = build_sharded(HERE / "cache" / "llama3b", THREE_B, "3b")
    config = write_config(scratch / "nan_ties.yml", merge_yaml("nan_ties", base, finetunes))
    command = [str(Path(sys.executable).parent / "mergekit-nan"), "inspect", str(config)]
    if not args.cold:
        warm_page_cache([base, *finetunes])
    runs: dict[str, list] = {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        for name, extra in VARIANTS.items():
            if args.cold:
                drop_page_cache()
            runs[name].append(timed(command + extra))
            print(f"rep {rep} {name}: {runs[name][-1]}", flush=True)
    summary = {
        name: {key: statistics.median(r[key] for r in rs) for key in ("wall_s", "cpu_s")} for name, rs in runs.items()
    }
    without, with_shares = (summary[name] for name in VARIANTS)
    ratio = {key: round(with_shares[key] / without[key], 3) for key in ("wall_s", "cpu_s")}
    result = {
        "model": args.model,
        "cold": args.cold,
        "reps": args.reps,
        "machine": machine_info(),
        "runs": runs,
        "median": summary,
        "ratio_with_over_without": ratio,
    }
    out = (scratch if args.smoke else HERE) / f"results_inspect_cost_{args.model}{'_cold' if args.cold else ''}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# inspect with and without the shares report: {args.model}, {'cold' if args.cold else 'warm'} page cache",
        "",
        f"`python benchmarks/perf/inspect_cost.py --model {args.model}{' --cold' if args.cold else ''} "
        f"--reps {args.reps}`; a nan_ties config (density 0.5), medians of {args.reps} alternating runs.",
        "",
        "| run | wall s | CPU s |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} |" for name, s in summary.items()]
    lines += ["", f"Ratio, with the report over without: wall {ratio['wall_s']:.3f}x, CPU {ratio['cpu_s']:.3f}x.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

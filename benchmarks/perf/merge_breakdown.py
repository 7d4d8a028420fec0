"""Where the time of a NAN merge goes, next to the stock merge it wraps.

`merge_cost.py` compares whole `mergekit-yaml` runs; their ratio moves by several
percent between identical runs on a shared VM. This script runs the same merges
(interleaved A B A B, each a fresh child process running mergekit-yaml's own entry
point) with timers around three functions and reports, per method, the medians of:

- merge: mergekit's run, from parsing the config to the written model (no interpreter start-up);
- wrapped: time inside mergekit's task-vector `merge_group` (the stock arithmetic);
- norms: time inside NAN's delta-norm step;
- nan_other: the rest of NAN's `merge_group` (parameters, weights, record).

NAN's own work is `norms + nan_other`; against the stock wall time it bounds the
wall ratio from above. Part of it is not extra: NAN touches the memory-mapped inputs
first, so page faults the stock arithmetic pays move into the norm step and the
wrapped arithmetic gets faster. That saving is reported, and taken off for a second
estimate, but it is a difference of two noisy medians (clear for task arithmetic's
0.8 s of arithmetic, lost in the noise of TIES' 23 s).

  python benchmarks/perf/merge_breakdown.py                 # SmolLM2-135M, nan_task_arithmetic:task_arithmetic, 5 reps
  python benchmarks/perf/merge_breakdown.py --smoke         # tiny random LLaMA, 1 rep
  python benchmarks/perf/merge_breakdown.py --fused-prototype --out benchmarks/perf/results_merge_breakdown_fused
      # the same, NAN's bf16 norm step run by fused_bound.py's compiled C loop (needs cc; not shipped)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_smollm2  # noqa: E402
import merge_cost  # noqa: E402

RESULTS = HERE / "results_merge_breakdown"

# Runs in the child: wrap the timed functions, then hand over to mergekit-yaml.
CHILD = r"""
import json, resource, sys, time
from collections import Counter
spent = Counter()

def timed(key, fn):
    def wrapper(*args, **kwargs):
        start, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - start
            spent[key + "_faults"] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return wrapper

from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge as GTA
GTA.merge_group = timed("wrapped", GTA.merge_group)
from mergekit_nan.core import weighing
from mergekit_nan.adapters import mergekit_0_1_5 as adapter  # this benchmark times mergekit 0.1.5
weighing.delta_norms = timed("norms", weighing.delta_norms)
adapter.NanTaskVectorMethod.merge_group = timed("nan", adapter.NanTaskVectorMethod.merge_group)
from mergekit.scripts.run_yaml import main
out_json, sys.argv = sys.argv[1], ["mergekit-yaml", *sys.argv[2:]]
start = time.perf_counter()
try:
    main()
except SystemExit as stop:
    if stop.code:
        raise
spent["merge"] = time.perf_counter() - start
with open(out_json, "w") as fh:
    json.dump(spent, fh)
"""


def run_child(config: Path, out: Path, env: dict, log: Path, child: str = CHILD) -> dict:
    timings = out.with_suffix(".timings.json")
    wall = merge_cost.run_merge(config, out, log, [], env, launcher=[sys.executable, "-c", child, str(timings)])[
        "wall_s"
    ]
    spent = json.loads(timings.read_text())
    timings.unlink()
    spent["wall"] = wall
    if "nan" in spent:
        spent["nan_other"] = spent["nan"] - spent.get("norms", 0.0) - spent.get("wrapped", 0.0)
    return spent


def summarize(a: str, b: str, runs_a: list, runs_b: list) -> dict:
    keys = ("wall", "merge", "wrapped", "norms", "nan_other")

    def med(runs, key):
        return statistics.median(r.get(key, 0.0) for r in runs)

    a_med = {k: med(runs_a, k) for k in keys}
    b_med = {k: med(runs_b, k) for k in keys}
    own = a_med["norms"] + a_med["nan_other"]
    saving = b_med["wrapped"] - a_med["wrapped"]
    return {
        "a": a,
        "b": b,
        "median_a": a_med,
        "median_b": b_med,
        "own_s": own,
        "wrapped_saving_s": saving,
        "wall_ratio_bound": 1 + own / b_med["wall"],
        "wall_ratio_net": 1 + (own - max(saving, 0.0)) / b_med["wall"],
        "measured_wall_ratio": a_med["wall"] / b_med["wall"],
        "per_pair_wall_ratios": [x["wall"] / y["wall"] for x, y in zip(runs_a, runs_b)],
    }


def write_report(path: Path, info: dict, s: dict) -> None:
    a, b = s["median_a"], s["median_b"]
    rows = [
        ("child wall (incl. start-up)", "wall"),
        ("mergekit run", "merge"),
        ("wrapped arithmetic", "wrapped"),
        ("NAN norm step", "norms"),
        ("NAN bookkeeping", "nan_other"),
    ]
    lines = [
        f"# Merge breakdown: {s['a']} vs {s['b']}",
        "",
        f"{info['model']}; {info.get('variant', 'the plugin as shipped')}; {info['reps']} interleaved pairs; {info['date']}; git {info['git']}; "
        f"{info['cpu']}, {info['nproc']} CPUs, torch {info['versions']['torch']}. Medians in seconds.",
        "",
        f"| step | {s['a']} | {s['b']} |",
        "|---|---|---|",
        *(f"| {label} | {a[k]:.3f} | {b[k]:.3f} |" for label, k in rows),
        "",
        f"NAN's own steps take {s['own_s']:.3f} s (norm step + bookkeeping): at most "
        f"**{s['wall_ratio_bound']:.3f}** of the stock wall time. The wrapped arithmetic took "
        f"{a['wrapped']:.3f} s inside NAN, {b['wrapped']:.3f} s stock (NAN touched the inputs first); "
        f"net of that difference where it is a saving, {s['wall_ratio_net']:.3f}. Measured wall ratio of medians {s['measured_wall_ratio']:.3f} "
        f"(per pair {min(s['per_pair_wall_ratios']):.3f}-{max(s['per_pair_wall_ratios']):.3f}).",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--methods", default="nan_task_arithmetic:task_arithmetic", help="one A:B pair of merge_cost.METHODS"
    )
    ap.add_argument("--reps", type=int, default=None, help="interleaved pairs (5; smoke 1)")
    ap.add_argument("--models", type=Path, default=make_smollm2.DEFAULT_OUT)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "merge_breakdown")
    ap.add_argument("--out", type=Path, default=None, help="results path prefix (.md/.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny random LLaMA, 1 rep")
    ap.add_argument(
        "--fused-prototype",
        action="store_true",
        help="run NAN's bf16 norm step through fused_bound.py's C loop (a what-if; needs cc)",
    )
    args = ap.parse_args()

    a, b = args.methods.split(":")
    if a not in merge_cost.METHODS or b not in merge_cost.METHODS:
        ap.error(f"unknown method in {args.methods}; known: {', '.join(merge_cost.METHODS)}")
    reps = args.reps or (1 if args.smoke else 5)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    info = merge_cost.machine_info()
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="smoke-", dir=work))
        base, fts = merge_cost.build_tiny(tmp / "models")
        info["model"], out_prefix = "tiny random LLaMA (smoke)", args.out or tmp / "results"
    else:
        tmp = work
        base, fts = make_smollm2.build(args.models)
        info["model"] = "SmolLM2-135M (dequantized GGUF) + 3 synthetic fine-tunes, bf16"
        out_prefix = args.out or RESULTS
    child = CHILD
    if args.fused_prototype:
        import fused_bound

        if fused_bound.build(work / "fused") is None:
            raise SystemExit("--fused-prototype needs a C compiler (cc)")
        info["variant"] = "NAN's bf16 norm step by fused_bound.py's compiled C loop (prototype, not shipped)"
        child = CHILD.replace(
            "from mergekit.scripts.run_yaml import main",
            (
                f"import ctypes; sys.path.insert(0, {str(HERE)!r}); import fused_bound\n"
                f"fused_bound.patch_norms(ctypes.CDLL({str(work / 'fused' / 'fused.so')!r}))\n"
                "from mergekit.scripts.run_yaml import main"
            ),
        )
    env, _ = merge_cost.snapshot_plugin(tmp / "plugin-snapshot")
    merge_cost.warm_page_cache([base, *fts])

    runs = {a: [], b: []}
    for m in (a, b):
        merge_cost.write_config(tmp / f"{m}.yaml", merge_cost.merge_yaml(m, base, fts))
    for rep in range(reps):
        for m in (a, b):
            spent = run_child(tmp / f"{m}.yaml", tmp / "out", env, tmp / f"{m}.log", child)
            runs[m].append(spent)
            print(
                f"rep {rep + 1}/{reps} {m:>22}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(spent.items())),
                flush=True,
            )

    summary = summarize(a, b, runs[a], runs[b])
    info["reps"] = reps
    out_prefix = Path(out_prefix)
    out_prefix.with_suffix(".json").write_text(json.dumps({"info": info, "runs": runs, **summary}, indent=2) + "\n")
    write_report(out_prefix.with_suffix(".md"), info, summary)
    print(out_prefix.with_suffix(".md").read_text())
    if args.smoke:
        if not runs[a][0].get("norms") or not runs[b][0].get("wrapped"):
            raise SystemExit("smoke: the timers saw no norm step or no wrapped arithmetic")
        shutil.rmtree(tmp)
    shutil.rmtree(tmp / "out", ignore_errors=True)


if __name__ == "__main__":
    main()

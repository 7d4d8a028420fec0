"""Merge the cached fine-tunes with mergekit-yaml and score every task.

    python run.py --threads 2   # full tables (fine-tunes first if not cached)
    python run.py --smoke       # ~1 minute: tiny data, few steps, a few merges

Main rows (every stock method, and its NAN version at T=1) run on every
fine-tuning seed; the ablation rows (other temperatures, layer and model
granularity) run on the first seed.  DARE's drop seed is the fine-tuning seed.
Writes results/results.md, results/results.json, results/per_task.png, hits.pt
and the mergekit configs (results/configs/).  Merged models go to work/ and are
deleted after scoring.  Rows whose merge method mergekit does not know are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import yaml
from safetensors.torch import load_file

import finetune
from evaluate import Evaluator, summarize

HERE = Path(__file__).resolve().parent

# Stock settings (documented in README.md).  NAN rows reuse them unchanged and
# only add `temperature`; NAN turns the per-model `weight`s into a prior and
# redistributes their total by inverse delta norm.
METHODS = {
    # Ilharco et al.'s usual scaling: every task vector at 0.3, no normalisation
    "task_arithmetic": {"model": {"weight": 0.3}, "global": {}},
    # TIES paper: keep the top 20% of each delta, sign election, disjoint mean
    # (mergekit's default normalize: true), lambda 1
    "ties": {"model": {"weight": 1.0, "density": 0.2}, "global": {}},
    # DARE drop p=0.5 with rescale, TIES sign election, then task arithmetic at 0.3
    # (mergekit's defaults: rescale true, normalize false)
    "dare_ties": {"model": {"weight": 0.3, "density": 0.5}, "global": {}},
}
RANDOMIZED = {"dare_ties"}
GRANULARITIES = ["layer", "model"]  # ablations beside the default "tensor"
GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]


def mergekit_exe() -> str:
    local = Path(sys.executable).parent / "mergekit-yaml"
    return str(local) if local.exists() else (shutil.which("mergekit-yaml") or "mergekit-yaml")


def registered_methods() -> set[str]:
    """Method names a fresh interpreter (as mergekit-yaml starts) knows."""
    code = ("import json, mergekit.merge_methods as m; "
            "print(json.dumps([x.spec.name for x in m.registered_methods()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def write_config(path: Path, method: str, base: Path, models: list[Path],
                 model_params: dict, global_params: dict) -> None:
    config = {
        "merge_method": method,
        "base_model": str(base.resolve()),  # absolute: a relative a/b looks like a hub id
        "models": [{"model": str(m.resolve()), "parameters": dict(model_params)}
                   for m in models],
        "dtype": "float32",
    }
    if global_params:
        config["parameters"] = dict(global_params)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def run_mergekit(config: Path, out_dir: Path, seed: int | None, threads: int) -> float:
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [mergekit_exe(), str(config), str(out_dir), "--quiet", "--no-cuda"]
    if seed is not None:
        cmd += ["--random-seed", str(seed)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0


class SeedRun:
    """Every row for one fine-tuning seed: hits per row name, plus row details."""

    def __init__(self, args, seed: int):
        self.args, self.seed = args, seed
        self.root = (args.cache / "smoke" if args.smoke else args.cache) / f"seed{seed}"
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.tasks = sorted(self.meta["tasks"], key=lambda t: -self.meta["tasks"][t]["n_train"])
        self.base = self.root / "models" / "base"
        self.models = [self.root / "models" / t for t in self.tasks]
        self.hits: dict[str, dict[str, torch.Tensor]] = {}
        self.info: dict[str, dict] = {}
        t0 = time.time()
        self.test = Evaluator(self.root, "test", self.tasks, limit=args.test_per_task)
        self.val = Evaluator(self.root, "val", self.tasks)
        print(f"seed {seed}: tokenised eval sets in {time.time() - t0:.0f}s", flush=True)

    def add(self, name, hits, **info):
        self.hits[name] = hits
        self.info[name] = info
        avg = summarize(hits)["avg"]
        print(f"[seed {self.seed}] {name:36s} avg {100 * avg['acc']:6.2f}  "
              + " ".join(f"{t}={100 * hits[t].float().mean().item():.1f}" for t in self.tasks)
              + f"  ({info.get('seconds', 0):.0f}s)", flush=True)

    def merge_row(self, name, method, model_params, global_params, keep=False, **info):
        tag = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in name)
        config = self.args.out / "configs" / f"seed{self.seed}" / f"{tag}.yml"
        write_config(config, method, self.base, self.models, model_params, global_params)
        out_dir = self.args.work / f"seed{self.seed}-{tag}"
        drop_seed = self.seed if method.removeprefix("nan_") in RANDOMIZED else None
        merge_s = run_mergekit(config, out_dir, drop_seed, self.args.threads)
        t0 = time.time()
        hits = self.test.score(out_dir)
        eval_s = time.time() - t0
        if not (self.args.keep or keep):
            shutil.rmtree(out_dir, ignore_errors=True)
        self.add(name, hits, method=method, model_params=model_params,
                 global_params=global_params, merge_seconds=round(merge_s, 1),
                 eval_seconds=round(eval_s, 1), seconds=merge_s + eval_s, **info)
        return out_dir

    def reference_rows(self):
        t0 = time.time()
        self.add("pretrained (fine-tuned heads)", self.test.score(self.base),
                 seconds=time.time() - t0)
        if self.args.probe_row:  # pretrained encoder + heads trained on it (no fine-tuning)
            t0 = time.time()
            self.add("pretrained + linear probe", self.test.score(self.base, probe=True),
                     seconds=time.time() - t0)
        t0 = time.time()
        hits = {}
        for task, model in zip(self.tasks, self.models):
            hits.update(self.test.score(model, tasks=[task]))
        self.add("individual", hits, seconds=time.time() - t0)

    def grid_row(self, grid):
        """Task arithmetic, one lambda for all tasks, chosen by mean val accuracy."""
        t0 = time.time()
        base = load_file(str(self.base / "model.safetensors"))
        delta_sum = {k: v.clone().zero_() for k, v in base.items() if k.startswith("bert.")}
        for model in self.models:
            tuned = load_file(str(model / "model.safetensors"))
            for k in delta_sum:
                delta_sum[k] += tuned[k] - base[k]
        val_curve = {}
        for lam in grid:  # same formula as mergekit task_arithmetic, normalize: false
            state = {k: base[k] + lam * delta_sum[k] for k in delta_sum}
            val_curve[lam] = summarize(self.val.score(state))["avg"]["acc"]
        best = max(grid, key=lambda lam: val_curve[lam])
        search_s = time.time() - t0
        print("lambda grid (val avg): "
              + ", ".join(f"{k}:{100 * v:.1f}" for k, v in val_curve.items()))
        out_dir = self.merge_row(
            GRID_ROW, "task_arithmetic", {"weight": best}, {}, keep=True, lambda_star=best,
            search_seconds=round(search_s, 1),
            val_curve={f"{k:g}": v for k, v in val_curve.items()})
        # sanity: mergekit's output is the in-process base + lambda * sum(deltas)
        merged = load_file(str(out_dir / "model.safetensors"))
        diff = max((merged[k] - (base[k] + best * delta_sum[k])).abs().max().item()
                   for k in delta_sum)
        if not self.args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
        print(f"grid check: max |mergekit - in-process| = {diff:.2e}")
        self.info[GRID_ROW]["grid_max_abs_diff_vs_mergekit"] = diff

    def method_rows(self, method, known, temperatures, granularities, skipped):
        spec = METHODS[method]
        self.merge_row(method, method, spec["model"], spec["global"])
        nan = nan_name(method)
        if nan not in known:
            skipped.append(f"{nan}: not registered in mergekit (install mergekit-nan)")
            return
        # T=1 at tensor granularity is NAN's default; the rest are ablations
        variants = [(f"{nan} T={t:g}", {"temperature": t}, t != 1.0) for t in temperatures]
        variants += [(f"{nan} T=1 granularity={g}", {"temperature": 1.0, "granularity": g}, True)
                     for g in granularities]
        for name, extra, ablation in variants:
            try:
                self.merge_row(name, nan, spec["model"], dict(spec["global"], **extra),
                               stock=method, ablation=ablation, **extra)
            except RuntimeError as err:
                skipped.append(f"seed {self.seed} {name}: mergekit failed: "
                               f"{str(err).strip().splitlines()[-1]}")
                print("skip:", skipped[-1])


GRID_ROW = "task_arithmetic, λ from val grid"


def nan_name(method: str) -> str:
    return f"nan_{method}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=finetune.DEFAULT_CACHE)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="fine-tuning seeds (main rows on each, ablations on the first)")
    ap.add_argument("--temperatures", type=float, nargs="*", default=[0.5, 2.0],
                    help="ablation temperatures besides T=1")
    ap.add_argument("--granularities", nargs="*", default=GRANULARITIES)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--test-per-task", type=int, default=1000,
                    help="test examples per task (a random subset of the 2000 held out)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep merged models in work/")
    ap.add_argument("--probe-row", action="store_true",
                    help="also score the pretrained encoder with the linear-probe heads")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)
    t_start = time.time()
    if args.smoke:
        args.out = args.out / "smoke"
        args.seeds, args.methods, args.temperatures = args.seeds[:1], ["task_arithmetic"], []
        args.granularities = ["model"]
    grid = [0.2, 0.5] if args.smoke else GRID

    shutil.rmtree(args.out / "configs", ignore_errors=True)  # only this run's configs remain
    known = registered_methods()
    runs, skipped, t_ft = [], [], 0.0
    for i, seed in enumerate(args.seeds):
        t0 = time.time()  # fine-tunes (a no-op when cached)
        finetune.main(["--cache", str(args.cache), "--seed", str(seed),
                       "--threads", str(args.threads)] + (["--smoke"] if args.smoke else []))
        t_ft += time.time() - t0
        run = SeedRun(args, seed)
        run.reference_rows()
        first = i == 0  # ablations on the first seed only
        temps = [1.0] + [t for t in args.temperatures if first and t != 1.0]
        for method in args.methods:
            run.method_rows(method, known, temps, args.granularities if first else [], skipped)
        run.grid_row(grid)
        runs.append(run)

    total = time.time() - t_start
    from report import write_report
    write_report(runs, args, skipped, {"finetune_or_cache_seconds": round(t_ft, 1),
                                       "total_seconds": round(total, 1)})
    print(f"done in {total:.0f}s (fine-tune/cache check {t_ft:.0f}s); wrote {args.out}")


if __name__ == "__main__":
    main()

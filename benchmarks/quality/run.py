"""Merge the cached fine-tunes with mergekit-yaml and score every task.

    python run.py --threads 1   # every regime's tables (fine-tunes first if not cached)
    python run.py --smoke       # 1-2 minutes: tiny data, few steps, a few merges per regime

Per fine-tuning regime (`--regimes`, default epochs steps intensity; see
finetune.REGIMES): main rows (every stock method, its NAN version at T=1, task
arithmetic with lambda from the validation split) on every fine-tuning seed; the
other temperatures on the first seed; layer and model granularity on the first
seed of the regimes in `--granularity-regimes` (default: epochs).  DARE's drop
seed is the fine-tuning seed.  Writes results/results.md, results/results.json,
results/per_task.png, hits.pt and the mergekit configs (results/configs/<regime>/).
Merged models go to work/ and are deleted after scoring.  Each row's hits are
kept in cache/<regime>/seed<k>/rows/ and reused while its config, the fine-tunes
and the test set are unchanged (`--fresh` recomputes).  Rows whose merge method
mergekit does not know are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared benchmark helpers

import finetune
import torch
from evaluate import Evaluator, summarize
from rank_correlation import spearman
from safetensors.torch import load_file

from mergekit_nan.yaml_run import merge_config, run_mergekit_yaml, write_config

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
    # the slerp family (`--methods multislerp nuslerp`), of the task vectors, equal weights
    # (both normalize them): multislerp of every task, nuslerp of the pair with the
    # longest and the shortest encoder delta; scored, like every row, on all five tasks
    "multislerp": {"model": {"weight": 1.0}, "global": {}},
    "nuslerp": {"model": {"weight": 1.0}, "global": {}, "pair": True},
}
DEFAULT_METHODS = ["task_arithmetic", "ties", "dare_ties"]
RANDOMIZED = {"dare_ties"}
GRANULARITIES = ["layer", "model"]  # ablations beside the default "tensor"
GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]
GRID_ROW = "task_arithmetic, λ from val grid"
WEIGHTINGS = ["shrink_median", "shrink_geomean"]  # NAN's `weighting` candidates besides "paper"


def registered_methods() -> set[str]:
    """Method names a fresh interpreter (as mergekit-yaml starts) knows."""
    code = "import json, mergekit.merge_methods as m; print(json.dumps([x.spec.name for x in m.registered_methods()]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


ROW_CACHE_VERSION = 1  # bump when scoring or row bookkeeping changes


def mean_coefficients(record_path: Path, tasks: list[str]) -> dict:
    """Per task: NAN's mean coefficient over the tensors in which any model takes part
    (the model card's definition), read from the merge's nan_coefficients.json."""
    doc = json.loads(record_path.read_text())
    names = [Path(m).name for m in doc["models"]]
    sums, counts, tensors = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0), 0
    for t in doc["tensors"]:
        coefs = t["coefficients"]
        if not any(c for c in coefs if c is not None):
            continue  # no model changed this tensor (frozen word embeddings, common head)
        tensors += 1
        for name, c in zip(names, coefs):
            if c is not None:
                sums[name] += c
                counts[name] += 1
    return {"tensors": tensors, "mean_coefficient": {t: sums[t] / counts[t] for t in tasks if counts.get(t)}}


class SeedRun:
    """Every row for one regime and fine-tuning seed: hits per row name, plus row details."""

    def __init__(self, args, regime: str, seed: int):
        self.args, self.regime, self.seed = args, regime, seed
        self.root = finetune.cache_root(args.cache, regime, seed, args.smoke)
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.tasks = sorted(self.meta["tasks"], key=lambda t: -self.meta["tasks"][t]["n_train"])
        self.base = self.root / "models" / "base"
        self.models = [self.root / "models" / t for t in self.tasks]
        self.hits: dict[str, dict[str, torch.Tensor]] = {}
        self.info: dict[str, dict] = {}
        self.label = f"{regime} seed {seed}"
        # what every cached row depends on besides its own config: the fine-tunes, the test set
        fingerprint = {t: (m["recipe"], m["delta_norm"]) for t, m in self.meta["tasks"].items()}
        self.fingerprint = [ROW_CACHE_VERSION, args.test_per_task, fingerprint]
        self.row_dir = self.root / "rows"
        self._test = self._val = None
        by_norm = sorted(self.tasks, key=lambda t: self.meta["tasks"][t]["delta_norm"])
        ends = {by_norm[0], by_norm[-1]}
        self.pair = [m for t, m in zip(self.tasks, self.models) if t in ends]  # longest and shortest delta

    # evaluators are built on first use: a run whose rows are all cached never tokenises
    @property
    def test(self):
        if self._test is None:
            t0 = time.time()
            self._test = Evaluator(self.root, "test", self.tasks, limit=self.args.test_per_task)
            print(f"[{self.label}] tokenised test sets in {time.time() - t0:.0f}s", flush=True)
        return self._test

    @property
    def val(self):
        if self._val is None:
            self._val = Evaluator(self.root, "val", self.tasks)
        return self._val

    def cached(self, name, key, compute):
        """Row `name` from the row cache if its key matches, else compute() -> (hits, info)."""
        tag = _tag(name)
        digest = hashlib.sha256(json.dumps([self.fingerprint, key], sort_keys=True, default=str).encode()).hexdigest()
        path = self.row_dir / f"{tag}.pt"
        if path.exists() and not self.args.fresh:
            row = torch.load(path)
            if row["key"] == digest:
                self.add(name, row["hits"], cached=True, **row["info"])
                return row["info"]
        hits, info = compute()
        info["computed_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.row_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"key": digest, "hits": {t: h.bool() for t, h in hits.items()}, "info": info}, path)
        self.add(name, hits, **info)
        return info

    def add(self, name, hits, cached=False, **info):
        self.hits[name] = hits
        self.info[name] = dict(info, cached_row=cached)
        avg = summarize(hits)["avg"]
        print(
            f"[{self.label}] {name:36s} avg {100 * avg['acc']:6.2f}  "
            + " ".join(f"{t}={100 * hits[t].float().mean().item():.1f}" for t in self.tasks)
            + f"  ({info.get('seconds', 0):.0f}s{', cached' if cached else ''})",
            flush=True,
        )

    def merge(self, name, method, model_params, global_params):
        """Write the config to <out>/configs/<regime>/seed<k>/ (also for a cached row);
        returns (config path, output dir, mergekit-yaml options) for run_merge."""
        tag = _tag(name)
        config = merge_config(
            method,
            self.pair if METHODS.get(method.removeprefix("nan_"), {}).get("pair") else self.models,
            base=self.base,
            model_parameters=model_params,
            parameters=global_params or None,
            dtype="float32",
        )
        path = write_config(self.args.out / "configs" / self.regime / f"seed{self.seed}" / f"{tag}.yml", config)
        out_dir = self.args.work / f"{self.regime}-seed{self.seed}-{tag}"
        options = ["--quiet", "--no-cuda"]
        if method.removeprefix("nan_") in RANDOMIZED:
            options += ["--random-seed", str(self.seed)]
        return path, out_dir, options

    def run_merge(self, path, out_dir, options) -> float:
        t0 = time.time()
        run_mergekit_yaml(path, out_dir, options, threads=self.args.threads, clear=True)
        return time.time() - t0

    def merge_row(self, name, method, model_params, global_params, **info):
        path, out_dir, options = self.merge(name, method, model_params, global_params)

        def compute():
            merge_s = self.run_merge(path, out_dir, options)
            t0 = time.time()
            hits = self.test.score(out_dir)
            eval_s = time.time() - t0
            extra = {}
            record = out_dir / "nan_coefficients.json"
            if record.exists():
                extra["nan"] = mean_coefficients(record, self.tasks)
            if not self.args.keep:
                shutil.rmtree(out_dir, ignore_errors=True)
            return hits, dict(
                method=method,
                model_params=model_params,
                global_params=global_params,
                options=options,
                merge_seconds=round(merge_s, 1),
                eval_seconds=round(eval_s, 1),
                seconds=merge_s + eval_s,
                **extra,
                **info,
            )

        return self.cached(name, [path.read_text(), options], compute)

    def reference_rows(self):
        def pretrained():
            t0 = time.time()
            return self.test.score(self.base), {"seconds": time.time() - t0}

        self.cached("pretrained (fine-tuned heads)", "pretrained", pretrained)
        if self.args.probe_row:  # pretrained encoder + heads trained on it (no fine-tuning)

            def probe():
                t0 = time.time()
                return self.test.score(self.base, probe=True), {"seconds": time.time() - t0}

            self.cached("pretrained + linear probe", "probe", probe)

        def individual():
            t0 = time.time()
            hits = {}
            for task, model in zip(self.tasks, self.models):
                hits.update(self.test.score(model, tasks=[task]))
            return hits, {"seconds": time.time() - t0}

        self.cached("individual", "individual", individual)

    def grid_row(self, grid, name=GRID_ROW, method="task_arithmetic", extra=None):
        """Task arithmetic with one lambda for all tasks, chosen by mean val accuracy.

        Stock: the direction is the sum of the deltas, merged at weight = lambda. A NAN
        method (`extra`: its weighting/temperature): the direction is its merge at
        weight 1 and lambda 1 (mergekit-yaml), merged at `lambda` = the pick. Either
        way the grid is scored in-process as base + lambda * direction."""
        nan = method != "task_arithmetic"
        extra = dict(extra or {})

        def direction_config():  # a NAN direction: its merge at weight 1, lambda 1
            return self.merge(f"{name} (λ=1)", method, {"weight": 1.0}, dict(extra, **{"lambda": 1.0}))

        def compute():
            t0 = time.time()
            base = load_file(str(self.base / "model.safetensors"))
            keys = [k for k in base if k.startswith("bert.")]
            if nan:
                path, out_dir, options = direction_config()
                self.run_merge(path, out_dir, options)
                merged = load_file(str(out_dir / "model.safetensors"))
                direction = {k: merged[k] - base[k] for k in keys}
                shutil.rmtree(out_dir, ignore_errors=True)
            else:
                direction = {k: base[k].clone().zero_() for k in keys}
                for model in self.models:
                    tuned = load_file(str(model / "model.safetensors"))
                    for k in keys:
                        direction[k] += tuned[k] - base[k]
            val_curve = {}
            for lam in grid:  # the same formula as mergekit task_arithmetic, normalize: false
                state = {k: base[k] + lam * direction[k] for k in keys}
                val_curve[lam] = summarize(self.val.score(state))["avg"]["acc"]
            best = max(grid, key=lambda lam: val_curve[lam])
            search_s = time.time() - t0
            print(
                f"[{self.label}] {name} (val avg): " + ", ".join(f"{k}:{100 * v:.1f}" for k, v in val_curve.items()),
                flush=True,
            )
            if nan:
                model_params, global_params = {"weight": 1.0}, dict(extra, **{"lambda": best})
            else:
                model_params, global_params = {"weight": best}, {}
            path, out_dir, options = self.merge(name, method, model_params, global_params)
            merge_s = self.run_merge(path, out_dir, options)
            t1 = time.time()
            hits = self.test.score(out_dir)
            eval_s = time.time() - t1
            # sanity: mergekit's output is the in-process base + lambda * direction
            merged = load_file(str(out_dir / "model.safetensors"))
            diff = max((merged[k] - (base[k] + best * direction[k])).abs().max().item() for k in keys)
            more = {}
            if nan:
                more["nan"] = mean_coefficients(out_dir / "nan_coefficients.json", self.tasks)
                more.update(stock=GRID_ROW, ablation=True, **extra)
            if not self.args.keep:
                shutil.rmtree(out_dir, ignore_errors=True)
            print(f"[{self.label}] grid check: max |mergekit - in-process| = {diff:.2e}", flush=True)
            return hits, dict(
                method=method,
                model_params=model_params,
                global_params=global_params,
                options=options,
                lambda_star=best,
                search_seconds=round(search_s, 1),
                val_curve={f"{k:g}": v for k, v in val_curve.items()},
                merge_seconds=round(merge_s, 1),
                eval_seconds=round(eval_s, 1),
                seconds=search_s + merge_s + eval_s,
                grid_max_abs_diff_vs_mergekit=diff,
                **more,
            )

        info = self.cached(name, ["grid", grid, method, extra], compute)
        if self.info[name]["cached_row"]:  # a cached row leaves the configs it was merged with, as a computed one
            if nan:
                direction_config()
            self.merge(name, method, info["model_params"], info["global_params"])

    def method_rows(self, method, known, temperatures, granularities, skipped, weightings=()):
        spec = METHODS[method]
        try:
            self.merge_row(method, method, spec["model"], spec["global"])
        except RuntimeError as err:  # the stock method cannot merge these fine-tunes: no row to compare with
            skipped.append(f"{self.label} {method}: mergekit failed: {str(err).strip().splitlines()[-1]}")
            print("skip:", skipped[-1])
            return
        nan = nan_name(method)
        if nan not in known:
            skipped.append(f"{nan}: not registered in mergekit (install mergekit-nan)")
            return
        # T=1 at tensor granularity is NAN's default; the rest are ablations
        variants = [(f"{nan} T={t:g}", {"temperature": t}, t != 1.0) for t in temperatures]
        variants += [
            (f"{nan} T=1 granularity={g}", {"temperature": 1.0, "granularity": g}, True) for g in granularities
        ]
        # every NAN setting is spelled out: a row must not change with the plugin's defaults
        variants += [(f"{nan} weighting={w}", {"weighting": w, "temperature": 1.0}, True) for w in weightings]
        for name, extra, ablation in variants:
            try:
                self.merge_row(
                    name, nan, spec["model"], dict(spec["global"], **extra), stock=method, ablation=ablation, **extra
                )
            except RuntimeError as err:
                skipped.append(f"{self.label} {name}: mergekit failed: {str(err).strip().splitlines()[-1]}")
                print("skip:", skipped[-1])

    def premise(self) -> dict:
        """Delta norms, data sizes and NAN's T=1 mean coefficients (first NAN T=1 row)."""
        n = [self.meta["tasks"][t]["n_train"] for t in self.tasks]
        norms = [self.meta["tasks"][t]["delta_norm"] for t in self.tasks]
        out = {
            "tasks": self.tasks,
            "n_train": n,
            "delta_norm": norms,
            "lr": [self.meta["tasks"][t]["lr"] for t in self.tasks],
            "steps": [self.meta["tasks"][t]["steps"] for t in self.tasks],
            "spearman_norm_vs_n": spearman(norms, n),
        }
        for name, info in self.info.items():
            every_task = info.get("nan") and set(self.tasks) <= set(info["nan"]["mean_coefficient"])
            if info.get("temperature") == 1.0 and "granularity" not in info and every_task:
                coef = info["nan"]["mean_coefficient"]
                out.update(
                    coefficient_row=name,
                    mean_coefficient=[coef[t] for t in self.tasks],
                    spearman_coef_vs_n=spearman([coef[t] for t in self.tasks], n),
                )
                break
        return out


def tuned_candidates(args) -> list:
    """(label, NAN parameters) of the nan_task_arithmetic rows with lambda from the val grid."""
    out = [(f"T={t:g}", {"temperature": t}) for t in args.tuned_temperatures]
    return out + [(f"weighting={w}", {"weighting": w, "temperature": 1.0}) for w in args.weightings]


def _tag(name: str) -> str:
    return "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in name)


def nan_name(method: str) -> str:
    return f"nan_{method}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=finetune.DEFAULT_CACHE)
    ap.add_argument(
        "--regimes",
        nargs="+",
        choices=finetune.REGIME_NAMES,
        default=finetune.REGIME_NAMES,
        help="fine-tuning regimes (finetune.py)",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="fine-tuning seeds (main rows on each, ablations on the first)",
    )
    ap.add_argument(
        "--temperatures",
        type=float,
        nargs="*",
        default=[0.5, 2.0, 4.0],
        help="ablation temperatures besides T=1 (first seed of every regime)",
    )
    ap.add_argument("--granularities", nargs="*", default=GRANULARITIES)
    ap.add_argument(
        "--weightings",
        nargs="*",
        default=list(WEIGHTINGS),
        help="NAN `weighting` candidates besides the paper's, T=1 (first seed of every regime)",
    )
    ap.add_argument(
        "--tuned-temperatures",
        type=float,
        nargs="*",
        default=[1.0, 2.0],
        help="paper-weighting temperatures of the nan_task_arithmetic lambda-grid rows (first seed)",
    )
    ap.add_argument(
        "--granularity-regimes",
        nargs="*",
        default=["epochs"],
        help="regimes whose first seed gets the granularity ablation",
    )
    ap.add_argument(
        "--grid-regimes",
        nargs="*",
        default=None,
        help="regimes that get the lambda-grid row (default: all; --smoke: the first)",
    )
    ap.add_argument("--methods", nargs="*", choices=list(METHODS), default=DEFAULT_METHODS)
    ap.add_argument(
        "--test-per-task", type=int, default=1000, help="test examples per task (a random subset of the 2000 held out)"
    )
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep merged models in work/")
    ap.add_argument("--fresh", action="store_true", help="recompute rows found in the row cache")
    ap.add_argument(
        "--probe-row", action="store_true", help="also score the pretrained encoder with the linear-probe heads"
    )
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)
    t_start = time.time()
    if args.smoke:  # every regime, one seed, task arithmetic and NAN; grid and one
        args.out = args.out / "smoke"  # granularity row on the first regime only
        args.seeds, args.methods, args.temperatures = args.seeds[:1], ["task_arithmetic", "nuslerp"], []
        args.granularities, args.weightings, args.tuned_temperatures = ["model"], args.weightings[:1], []
        if args.grid_regimes is None:
            args.grid_regimes = args.regimes[:1]
    if args.grid_regimes is None:
        args.grid_regimes = args.regimes
    grid = [0.2, 0.5] if args.smoke else GRID

    # only this run's configs remain (per regime, so a run of some regimes keeps the others')
    for regime in args.regimes:
        shutil.rmtree(args.out / "configs" / regime, ignore_errors=True)
    for legacy in (args.out / "configs").glob("seed*"):  # layout before regimes existed
        shutil.rmtree(legacy, ignore_errors=True)
    known = registered_methods()
    runs: dict[str, list[SeedRun]] = {}
    skipped, t_ft = [], 0.0
    for regime in args.regimes:
        runs[regime] = []
        for i, seed in enumerate(args.seeds):
            t0 = time.time()  # fine-tunes (a no-op when cached)
            finetune.main(
                ["--cache", str(args.cache), "--regime", regime, "--seed", str(seed), "--threads", str(args.threads)]
                + (["--smoke"] if args.smoke else [])
            )
            t_ft += time.time() - t0
            run = SeedRun(args, regime, seed)
            run.reference_rows()
            first = i == 0  # ablations on the first seed only
            temps = [1.0] + [t for t in args.temperatures if first and t != 1.0]
            grans = args.granularities if first and regime in args.granularity_regimes else []
            weightings = args.weightings if first else []
            for method in args.methods:
                run.method_rows(method, known, temps, grans, skipped, weightings)
            if regime in args.grid_regimes:
                run.grid_row(grid)
                if first and "task_arithmetic" in args.methods and "nan_task_arithmetic" in known:
                    for label, extra in tuned_candidates(args):
                        run.grid_row(
                            grid, f"nan_task_arithmetic {label}, λ from val grid", "nan_task_arithmetic", extra
                        )
            runs[regime].append(run)

    total = time.time() - t_start
    from report import write_report

    write_report(runs, args, skipped, {"finetune_or_cache_seconds": round(t_ft, 1), "total_seconds": round(total, 1)})
    print(f"done in {total:.0f}s (fine-tune/cache check {t_ft:.0f}s); wrote {args.out}")


if __name__ == "__main__":
    main()

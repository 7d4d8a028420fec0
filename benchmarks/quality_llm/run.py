"""Merge SmolLM2-135M fine-tunes with stock mergekit methods and their NAN versions.

    python run.py --threads 1                        # all regimes, seeds 0 1 (fine-tunes first if not cached)
    python run.py --seeds 0 --regimes epochs         # one unit; results of units already run are reused
    python run.py --report-only                      # rebuild results/ from the saved units
    python run.py --smoke                            # CI: tiny random LLaMA, few steps, a few merges

A unit is one (regime, seed): the base and the three fine-tunes scored on every
domain, then every merge through the real `mergekit-yaml` (task_arithmetic over the
lambda grid, ties, dare_ties, and each `nan_` version with the same weights, density,
lambda and DARE seed, T=1), each scored on the held-out test examples (the grid also
on the validation examples, to pick lambda). A finished unit is saved under
cache/<tag>/units/ and reused. Merged models go to work/ and are deleted after scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import finetune  # noqa: E402
from evaluate import Scorer  # noqa: E402

from mergekit_nan.yaml_run import merge_config, run_mergekit_yaml, write_config  # noqa: E402

# Merge settings, fixed before any merge ran. Every model has weight 1, so NAN's
# budget S is 3 and lambda means the same for stock and NAN.
GRID = [0.25, 0.5, 0.75, 1.0]  # task_arithmetic lambda; also nan_task_arithmetic
METHODS = {
    # name: (model parameters, global parameters, lambda grid or None, randomized)
    "task_arithmetic": ({"weight": 1.0}, {}, GRID, False),
    # TIES: top 50% of each delta, sign election, disjoint mean (normalize: true), lambda 1
    "ties": ({"weight": 1.0, "density": 0.5}, {}, None, False),
    # DARE: drop 50% with rescale, sign election, sum (normalize: false), lambda 0.5
    "dare_ties": ({"weight": 1.0, "density": 0.5}, {"lambda": 0.5}, None, True),
    # the slerp family (`--methods multislerp nuslerp`), of the task vectors (both normalize
    # the weights): multislerp of the three fine-tunes, nuslerp of the pair with the longest
    # and the shortest delta; scored, like every row, on every domain
    "multislerp": ({"weight": 1.0}, {}, None, False),
    "nuslerp": ({"weight": 1.0}, {}, None, False),
}
DEFAULT_METHODS = ["task_arithmetic", "ties", "dare_ties"]
PAIRED = {"nuslerp"}  # merges two fine-tunes: the longest and the shortest delta
SMOKE_GRID = [1.0]  # smoke: 6 merges per regime (task_arithmetic, ties and nuslerp, each
SMOKE_METHODS = ("task_arithmetic", "ties", "nuslerp")  # with its NAN version; nuslerp a pair)
TEMPERATURE = 1.0
# NAN settings beside the paper's T=1 (`--candidates`): label -> NAN parameters. Rows are
# named `nan_<m> [label]`, compared with the stock `<m>` row at the same settings. Every
# setting is spelled out, so that a row does not change with the plugin's defaults.
CANDIDATES = {
    "T=0.5": {"temperature": 0.5},
    "T=2": {"temperature": 2.0},
    "T=4": {"temperature": 4.0},
    "weighting=shrink_median": {"weighting": "shrink_median", "temperature": TEMPERATURE},
    "weighting=shrink_geomean": {"weighting": "shrink_geomean", "temperature": TEMPERATURE},
}
EXPECTATIONS = HERE / "results" / "expectations.md"


def tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


class Context:
    """Shared by every unit of a run: data, scorers, score cache."""

    def __init__(self, args):
        self.args, self.smoke = args, args.smoke
        self.recipe = finetune.recipe_for(args.smoke)
        self.base = finetune.base_model(args.smoke)
        self.tok = finetune.tokenizer(args.smoke)
        self.doms = finetune.domains(args.smoke, self.tok)
        self.order = list(self.doms)  # model order in every config: code, prose, arith
        t0 = time.time()
        self.test = Scorer(self.doms, "test", self.tok.pad_token_id)
        self.val = Scorer(self.doms, "val", self.tok.pad_token_id)
        print(f"eval sets ready in {time.time() - t0:.0f}s", flush=True)
        self.root = finetune.cache_root(args.smoke)
        self.units = self.root / "units"
        self.scores = self.root / "scores"  # per fine-tune / base, shared by units
        self.grid = SMOKE_GRID if args.smoke else GRID
        self.methods = {m: METHODS[m] for m in (SMOKE_METHODS if args.smoke else args.methods)}
        self.candidates = args.candidates

    def cached_score(self, key: str, model_dir: Path, with_val: bool = False) -> dict:
        path = self.scores / f"{key}.pt"
        if path.exists():
            got = torch.load(path)
            if not with_val or "val" in got:
                return got
        t0 = time.time()
        model = _load(model_dir)
        got = {"test": self.test.score(model)}
        if with_val:
            got["val"] = self.val.score(model)
        got["eval_seconds"] = round(time.time() - t0, 1)
        _save(got, path)
        return got


def _save(obj, path: Path) -> None:
    """Write then rename: a unit run in another process never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _load(model_dir: Path):
    from evaluate import load_model

    return load_model(model_dir)


def coefficient_summary(out_dir: Path, models: list[Path], order: list[str]) -> dict:
    rec = json.loads((out_dir / "nan_coefficients.json").read_text())
    index = {str(Path(m).resolve()): d for m, d in zip(models, order)}
    names = [index[str(Path(m).resolve())] for m in rec["models"]]
    per = {d: [] for d in names}
    norms = {d: [] for d in names}
    for t in rec["tensors"]:
        for d, c, n in zip(names, t["coefficients"], t["norms"]):
            if c is not None:
                per[d].append(c)
                norms[d].append(n)
    return {
        "models": names,
        "n_tensors": len(rec["tensors"]),
        "mean_coefficient": {d: sum(v) / len(v) for d, v in per.items()},
        "min_coefficient": {d: min(v) for d, v in per.items()},
        "max_coefficient": {d: max(v) for d, v in per.items()},
        "mean_tensor_norm": {d: sum(v) / len(v) for d, v in norms.items()},
        "parameters": rec.get("parameters", {}),
        # per tensor: each model's coefficient, for rank checks in the report
        "tensor_coefficients": [[t["coefficients"][names.index(d)] for d in order] for t in rec["tensors"]],
    }


def run_unit(ctx: Context, regime: str, seed: int) -> dict:
    args = ctx.args
    path = ctx.units / f"{regime}-seed{seed}.pt"
    row_cache = ctx.root / "rows" / f"{regime}-seed{seed}"  # one file per merge row, so a unit can resume
    if not ctx.smoke:
        text = EXPECTATIONS.read_text() if EXPECTATIONS.exists() else ""
        if f"## {regime}" not in text:
            raise SystemExit(
                f"write the expectation for regime '{regime}' into {EXPECTATIONS} "
                f"(a '## {regime}' section, dated) before running its merges"
            )
    t_unit = time.time()
    jobs = finetune.plan(ctx.recipe, ctx.doms, seed, regime)
    metas = finetune.ensure(ctx.smoke, [seed], [regime], doms=ctx.doms)
    metas = {m["key"]: m for m in metas}
    models = [finetune.ft_dir(ctx.smoke, jobs[d]["key"]) for d in ctx.order]
    by_norm = sorted(ctx.order, key=lambda d: metas[jobs[d]["key"]]["delta_norm"])
    pair = [d for d in ctx.order if d in (by_norm[0], by_norm[-1])]
    unit = {
        "regime": regime,
        "seed": seed,
        "order": ctx.order,
        "fine_tunes": {d: metas[jobs[d]["key"]] for d in ctx.order},
        "rows": {},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for m in unit["fine_tunes"].values():
        m.pop("loss_curve", None)

    def add(name, scores, **info):
        unit["rows"][name] = dict(info, test=scores["test"], val=scores.get("val"))
        t = scores["test"]
        print(
            f"[{regime} s{seed}] {name:34s} "
            + "  ".join(f"{d} {t[d]['loss'].mean().item():.4f}" for d in ctx.order)
            + f"  EM {100 * t['arith']['hit'].float().mean().item():.1f}"
            + (
                f"  ({info['merge_seconds']:.0f}s merge, {info['eval_seconds']:.0f}s eval)"
                if "merge_seconds" in info
                else ""
            ),
            flush=True,
        )

    base_scores = ctx.cached_score("base", ctx.base, with_val=True)
    add("base", base_scores, kind="reference", eval_seconds=base_scores["eval_seconds"])
    for d, model in zip(ctx.order, models):
        got = ctx.cached_score(jobs[d]["key"], model)
        add(f"fine-tune {d}", got, kind="reference", domain=d, eval_seconds=got["eval_seconds"])

    configs = args.out / "configs" / regime / f"seed{seed}"
    work = args.work / ("smoke" if ctx.smoke else "")
    variants = [("", {"temperature": TEMPERATURE})] + [(c, CANDIDATES[c]) for c in ctx.candidates]
    for stock, (model_params, params, grid, randomized) in ctx.methods.items():
        members = pair if stock in PAIRED else ctx.order
        merged = [m for d, m in zip(ctx.order, models) if d in members]
        for lam in ctx.grid if grid else [None]:
            for label, nan_params in [(None, {})] + variants:
                nan = label is not None
                method = f"nan_{stock}" if nan else stock
                glob_params = dict(params)
                if lam is not None:
                    glob_params["lambda"] = lam
                glob_params.update(nan_params)
                name = method + (f" [{label}]" if label else "") + (f" λ={lam:g}" if lam is not None else "")
                config = merge_config(
                    method, merged, ctx.base, model_parameters=model_params, parameters=glob_params, dtype="float32"
                )
                cfg_path = write_config(configs / f"{tag(name)}.yml", config)
                options = ["--no-cuda", "--quiet", "--num-threads", str(args.threads)]
                if randomized:
                    options += ["--random-seed", str(seed)]
                key = [cfg_path.read_text(), options, [metas[jobs[d]["key"]]["delta_norm"] for d in ctx.order]]
                cached = row_cache / f"{tag(name)}.pt"
                if cached.exists() and not args.force:
                    row = torch.load(cached)
                    if row["key"] == key:
                        add(name, row["scores"], **row["info"])
                        continue
                out = work / f"{regime}-seed{seed}-{tag(name)}"
                t0 = time.time()
                run_mergekit_yaml(cfg_path, out, options, threads=args.threads, clear=True)
                merge_s = time.time() - t0
                t0 = time.time()
                model = _load(out)
                scores = {"test": ctx.test.score(model)}
                if lam is not None:
                    scores["val"] = ctx.val.score(model)
                eval_s = time.time() - t0
                info = {
                    "kind": "merge",
                    "method": method,
                    "stock": stock if nan else None,
                    "candidate": label,
                    "lambda": lam if lam is not None else params.get("lambda", 1.0),
                    "grid": lam is not None,
                    "model_parameters": model_params,
                    "parameters": glob_params,
                    "options": options,
                    "merge_seconds": round(merge_s, 1),
                    "eval_seconds": round(eval_s, 1),
                }
                if stock in PAIRED:
                    info["members"] = members
                if nan:
                    info["coefficients"] = coefficient_summary(out, merged, members)
                del model
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
                _save({"key": key, "scores": scores, "info": info}, cached)
                add(name, scores, **info)
    unit["seconds"] = round(time.time() - t_unit, 1)
    unit["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    unit["threads"] = args.threads
    _save(unit, path)
    return unit


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--regimes", nargs="+", default=list(finetune.RECIPE["regimes"]))
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--keep", action="store_true", help="keep merged models in work/")
    ap.add_argument("--force", action="store_true", help="rerun merge rows already saved")
    ap.add_argument(
        "--candidates",
        nargs="*",
        choices=list(CANDIDATES),
        default=[],
        help="NAN settings to run beside the paper's T=1 (--smoke: weighting=shrink_median)",
    )
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    sys.stdout.reconfigure(line_buffering=True)
    if args.smoke:
        args.out, args.seeds = args.out / "smoke", args.seeds[:1]
        args.candidates = ["weighting=shrink_median"]
    t0 = time.time()
    units = []
    if args.report_only:
        root = finetune.cache_root(args.smoke) / "units"
        for regime in args.regimes:
            for seed in args.seeds:
                p = root / f"{regime}-seed{seed}.pt"
                if p.exists():
                    units.append(torch.load(p))
        ctx = None
    else:
        ctx = Context(args)
        for regime in args.regimes:
            for seed in args.seeds:
                units.append(run_unit(ctx, regime, seed))
    from report import write_report

    write_report(
        units,
        args.out,
        {"this_call_seconds": round(time.time() - t0, 1), "threads": args.threads, "smoke": args.smoke},
        finetune.recipe_for(args.smoke),
        {
            "grid": SMOKE_GRID if args.smoke else GRID,
            "methods": {k: METHODS[k][:2] for k in (SMOKE_METHODS if args.smoke else args.methods)},
            "temperature": TEMPERATURE,
            "candidates": [""] + args.candidates,
        },
    )
    print(f"done in {time.time() - t0:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()

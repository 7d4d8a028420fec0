"""NAN in the paper's own setting: merging least-squares models fine-tuned by SGD.

Section 3 of Si et al. 2025 (arXiv 2505.16148) argues from linear least squares
Y = X W: the joint solution over all tasks is a Gram-weighted average of the
per-task solutions (eq. 8), which for isotropic inputs becomes the
sample-size-weighted average W = sum_k n_k W_k / sum_k n_k (eq. 9). NAN then
estimates n_k without data, assuming the task update norm shrinks as data grows,
and uses alpha_k = softmax_k(-ln ||W_k - W0||_F / T).

This benchmark builds that setting and checks both steps:

* a shared initial W0 (d_in x d_out); K tasks with true W_k = W0 + U + P_k
  (U shared by all tasks, P_k task-specific), Gaussian inputs scaled by a
  per-task factor s_k, label noise sigma, and training sets of different sizes n_k;
* each task fine-tuned from W0 by minibatch SGD (same lr and batch for all), in
  two regimes: a fixed number of EPOCHS (more data -> more steps) and a fixed
  number of STEPS (same compute per task);
* two input settings: "iso" (every s_k = 1, eq. 9's assumption) and "scaled"
  (the s_k differ, so eq. 9 is no longer the optimum, eq. 8 still is);
* merges compared on held-out data of every task: the joint least-squares
  solution (oracle), eq. 8 (Gram-weighted, needs the data), eq. 9 (n-weighted,
  needs n_k), NAN (alpha-weighted average, and the plugin's weights w = K*alpha
  that keep the budget S = K), uniform averaging, task arithmetic with lambda=1
  and with the best lambda on a validation split (an oracle-ish reference).
  Two scores: the mean of the per-task test MSEs (tasks count equally) and the
  pooled, n_k-weighted test MSE (the objective the joint solution and eq. 9 optimize);
* how well NAN's alpha tracks n_k (Spearman rank correlation per seed), in the
  runs above and in a label-noise sweep (iso inputs), since the norm only carries
  information about n_k through the fitted noise.

NAN's coefficients come from mergekit_nan/core/coefficients.py, loaded by file path
so that neither mergekit nor torch is imported. Pure numpy, float64, one thread.

    python benchmarks/theory/run.py            # full run, writes results.md/.json here
    python benchmarks/theory/run.py --smoke    # a few seconds, for CI; writes nothing
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import copy
import datetime
import importlib.util
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared benchmark helpers
from rank_correlation import spearman

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COEFFICIENTS_PY = REPO / "mergekit_nan" / "core" / "coefficients.py"


def load_coefficients():
    """Import mergekit_nan/core/coefficients.py alone (not the package __init__)."""
    name = "_nan_coefficients"
    spec = importlib.util.spec_from_file_location(name, COEFFICIENTS_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses looks the module up while building
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- data


def make_tasks(seed, cfg, scales):
    """W0, the tasks' true W_k and their train/val/test sets, for one seed.

    The random draws do not depend on `scales`, so "iso" and "scaled" see the
    same W0, W_k, standard-normal inputs and noise (paired comparison).
    """
    rng = np.random.default_rng(seed)
    d_in, d_out = cfg.d_in, cfg.d_out
    W0 = rng.standard_normal((d_in, d_out)) / math.sqrt(d_in)
    shared = cfg.shared * rng.standard_normal((d_in, d_out)) / math.sqrt(d_in)
    tasks = []
    for n, s in zip(cfg.sizes, scales):
        W_true = W0 + shared + cfg.specific * rng.standard_normal((d_in, d_out)) / math.sqrt(d_in)
        splits = {}
        for split, m in (("train", n), ("val", cfg.n_val), ("test", cfg.n_test)):
            X = s * rng.standard_normal((m, d_in))
            Y = X @ W_true + cfg.noise * rng.standard_normal((m, d_out))
            splits[split] = (X, Y)
        tasks.append({"n": n, "scale": s, "W_true": W_true, **splits})
    return W0, tasks


def sgd(W0, X, Y, cfg, rng, epochs=None, steps=None):
    """Minibatch SGD on 0.5*mean ||x W - y||^2 from W0; stops after `epochs` or `steps`."""
    W = W0.copy()
    n = len(X)
    done = epoch = 0
    while True:
        order = rng.permutation(n)
        for start in range(0, n, cfg.batch):
            idx = order[start : start + cfg.batch]
            Xb, Yb = X[idx], Y[idx]
            W -= cfg.lr * (Xb.T @ (Xb @ W - Yb)) / len(idx)
            done += 1
            if steps is not None and done >= steps:
                break
        else:
            epoch += 1
            if epochs is None or epoch < epochs:
                continue
        if not np.all(np.isfinite(W)):
            raise FloatingPointError("SGD diverged; lower --lr")
        return W, done


# ----------------------------------------------------------------------------- metrics


def mse(W, data):
    X, Y = data
    return float(np.mean((X @ W - Y) ** 2))


# ----------------------------------------------------------------------------- one run

METHODS = [
    ("oracle", "joint least squares (oracle, all data)"),
    ("eq8", "eq. 8 Gram-weighted (needs X_k^T X_k)"),
    ("eq9", "eq. 9 n-weighted (needs n_k)"),
    ("nan_avg_T1", "NAN alpha-average, T=1"),
    ("nan_avg_T0.5", "NAN alpha-average, T=0.5"),
    ("nan_S_T1", "NAN plugin w=K*alpha (S=K), T=1"),
    ("nan_S_T0.5", "NAN plugin w=K*alpha (S=K), T=0.5"),
    ("uniform", "uniform average"),
    ("ta_1", "task arithmetic, lambda=1"),
    ("ta_best", "task arithmetic, best lambda on val"),
    ("individual", "own fine-tuned model per task (no merge)"),
    ("base", "W0 (no fine-tuning)"),
]


def finetune_all(seed, W0, tasks, regime, cfg):
    rng = np.random.default_rng([seed, 1])  # SGD order; same for every setting/regime
    kw = {"epochs": cfg.epochs} if regime == "epochs" else {"steps": cfg.steps}
    runs = [sgd(W0, *task["train"], cfg, rng, **kw) for task in tasks]
    return [W for W, _ in runs], [done for _, done in runs]


def run_one(seed, setting, scales, regime, cfg, coeffs):
    W0, tasks = make_tasks(seed, cfg, scales)
    K = len(tasks)
    finetuned, steps = finetune_all(seed, W0, tasks, regime, cfg)
    deltas = [W - W0 for W in finetuned]
    norms = [float(np.linalg.norm(D)) for D in deltas]
    n = np.array([t["n"] for t in tasks], dtype=float)

    def add(weights):
        return W0 + sum(w * D for w, D in zip(weights, deltas))

    merged = {}
    X_all = np.concatenate([t["train"][0] for t in tasks])
    Y_all = np.concatenate([t["train"][1] for t in tasks])
    merged["oracle"] = np.linalg.lstsq(X_all, Y_all, rcond=None)[0]
    grams = [t["train"][0].T @ t["train"][0] for t in tasks]
    merged["eq8"] = np.linalg.solve(sum(grams), sum(G @ W for G, W in zip(grams, finetuned)))
    merged["eq9"] = add(n / n.sum())
    alphas, weights = {}, {}
    for T in (1.0, 0.5):
        tag = f"T{T:g}"
        alphas[tag] = list(coeffs.inverse_norm_softmax(norms, T))
        weights[tag] = list(coeffs.nan_weights(norms, None, T).weights)
        assert abs(sum(alphas[tag]) - 1) < 1e-9 and abs(sum(weights[tag]) - K) < 1e-9
        merged[f"nan_avg_{tag}"] = add(alphas[tag])
        merged[f"nan_S_{tag}"] = add(weights[tag])
    merged["uniform"] = add([1.0 / K] * K)
    merged["ta_1"] = add([1.0] * K)
    grid = [round(0.05 * i, 2) for i in range(41)]  # 0 .. 2
    val = [np.mean([mse(add([lam] * K), t["val"]) for t in tasks]) for lam in grid]
    best_lambda = grid[int(np.argmin(val))]
    merged["ta_best"] = add([best_lambda] * K)
    merged["base"] = W0

    per_task = {m: [mse(W, t["test"]) for t in tasks] for m, W in merged.items()}
    per_task["individual"] = [mse(W, t["test"]) for W, t in zip(finetuned, tasks)]
    info = [t["n"] * t["scale"] ** 2 for t in tasks]  # trace(X^T X)/d_in in expectation
    return {
        "seed": seed,
        "setting": setting,
        "regime": regime,
        "steps": steps,
        "norms": norms,
        "alpha": alphas,
        "nan_weights": weights,
        "best_lambda": best_lambda,
        "spearman_alpha_n": {tag: spearman(a, n) for tag, a in alphas.items()},
        "spearman_alpha_info": {tag: spearman(a, info) for tag, a in alphas.items()},
        "test_mse": per_task,
        "test_mse_mean": {m: float(np.mean(v)) for m, v in per_task.items()},
        "test_mse_pooled": {m: float(np.dot(v, n) / n.sum()) for m, v in per_task.items()},
        "test_mse_rel_base": {m: float(np.mean(np.array(v) / np.array(per_task["base"]))) for m, v in per_task.items()},
    }


def proxy_sweep(cfg, coeffs):
    """Does alpha rank the tasks by n_k? Iso inputs, several label-noise levels, both regimes."""
    rows = []
    for noise in cfg.sweep_noise:
        c = copy.copy(cfg)
        c.noise = noise
        for regime in ("epochs", "steps"):
            norms, rhos, ratios = [], [], []
            for seed in range(cfg.seeds):
                W0, tasks = make_tasks(seed, c, [1.0] * len(cfg.sizes))
                finetuned, _ = finetune_all(seed, W0, tasks, regime, c)
                nk = [float(np.linalg.norm(W - W0)) for W in finetuned]
                alpha = coeffs.inverse_norm_softmax(nk, 1.0)
                norms.append(nk)
                rhos.append(spearman(alpha, cfg.sizes))
                big, small = int(np.argmax(cfg.sizes)), int(np.argmin(cfg.sizes))
                ratios.append(alpha[big] / alpha[small])
            rows.append(
                {
                    "noise": noise,
                    "regime": regime,
                    "norms": [stats(col) for col in zip(*norms)],
                    "spearman_alpha_n": stats(rhos),
                    "alpha_ratio_maxn_minn": stats(ratios),
                }
            )
    return rows


# ----------------------------------------------------------------------------- report


def stats(values):
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def pm(values, digits=3):
    mean, std = stats(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(runs, cfg, settings):
    out = {}
    for setting, scales in settings.items():
        for regime in ("epochs", "steps"):
            rs = [r for r in runs if r["setting"] == setting and r["regime"] == regime]
            block = {"scales": scales, "methods": {}, "tasks": []}
            for m, _ in METHODS:
                block["methods"][m] = {
                    "mean_mse": stats([r["test_mse_mean"][m] for r in rs]),
                    "pooled_mse": stats([r["test_mse_pooled"][m] for r in rs]),
                    "rel_base": stats([r["test_mse_rel_base"][m] for r in rs]),
                    "per_task": [stats([r["test_mse"][m][k] for r in rs]) for k in range(len(cfg.sizes))],
                }
            for k, (n, s) in enumerate(zip(cfg.sizes, scales)):
                block["tasks"].append(
                    {
                        "n": n,
                        "scale": s,
                        "steps": stats([r["steps"][k] for r in rs]),
                        "norm": stats([r["norms"][k] for r in rs]),
                        "alpha_T1": stats([r["alpha"]["T1"][k] for r in rs]),
                        "alpha_T0.5": stats([r["alpha"]["T0.5"][k] for r in rs]),
                        "n_share": n / sum(cfg.sizes),
                    }
                )
            for tag in ("T1", "T0.5"):
                block[f"spearman_alpha_n_{tag}"] = stats([r["spearman_alpha_n"][tag] for r in rs])
                block[f"spearman_alpha_info_{tag}"] = stats([r["spearman_alpha_info"][tag] for r in rs])
            block["best_lambda"] = stats([r["best_lambda"] for r in rs])
            out[f"{setting}/{regime}"] = block
    return out


def markdown(summary, sweep, cfg, meta):
    regime_name = {"epochs": f"fixed epochs (E={cfg.epochs})", "steps": f"fixed steps ({cfg.steps})"}
    lines = [
        "# NAN in the least-squares setting (paper section 3)",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['platform']}, {meta['cpu_count']} CPUs, python {meta['python']}, numpy {meta['numpy']}",
        f"- command: `{meta['command']}`",
        f"- wall time: {meta['wall_s']:.1f} s",
        f"- config: d_in={cfg.d_in}, d_out={cfg.d_out}, n_k={cfg.sizes}, scaled-setting s_k={cfg.scales}, "
        f"noise sigma={cfg.noise}, shared={cfg.shared}, specific={cfg.specific}, SGD lr={cfg.lr} batch={cfg.batch}, "
        f"epochs={cfg.epochs} / steps={cfg.steps}, n_val={cfg.n_val}, n_test={cfg.n_test}, seeds={cfg.seeds}",
        "- numbers: mean ± sample std over seeds. MSE = mean squared error on each task's held-out test set "
        f"(noise floor sigma^2 = {cfg.noise**2:g}); 'mean MSE' averages the tasks equally, 'pooled MSE' weights "
        "them by n_k (the objective the joint least-squares oracle and eq. 9 optimize); "
        "'rel. W0' = mean over tasks of MSE / MSE(W0).",
        "",
    ]
    for metric, title in (("mean_mse", "mean test MSE over tasks"), ("pooled_mse", "pooled (n_k-weighted) test MSE")):
        lines += [
            f"## Summary: {title}",
            "",
            "| setting / regime | Spearman(alpha, n) | oracle | eq. 8 | eq. 9 | NAN avg T=1 | NAN avg T=0.5 "
            "| NAN S=K T=1 | uniform | TA lambda=1 | TA best lambda |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, b in summary.items():
            setting, regime = key.split("/")
            row = [f"{setting} / {regime_name[regime]}", pm_s(b["spearman_alpha_n_T1"], 2)]
            for m in ("oracle", "eq8", "eq9", "nan_avg_T1", "nan_avg_T0.5", "nan_S_T1", "uniform", "ta_1", "ta_best"):
                row.append(pm_s(b["methods"][m][metric]))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        "## Does the norm proxy rank tasks by n_k? (iso inputs, T=1, label-noise sweep)",
        "",
        "| noise sigma | regime | "
        + " | ".join(f"‖Δ‖ n={n}" for n in cfg.sizes)
        + " | Spearman(alpha, n) | alpha(n_max) / alpha(n_min) |",
        "|---" * (4 + len(cfg.sizes)) + "|",
    ]
    for row in sweep:
        cells = [f"{row['noise']:g}", regime_name[row["regime"]]]
        cells += [f"{mean:.2f}" for mean, _ in row["norms"]]
        cells += [pm_s(row["spearman_alpha_n"], 2), pm_s(row["alpha_ratio_maxn_minn"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"(for reference, eq. 9's weights have n_max / n_min = {max(cfg.sizes) / min(cfg.sizes):g})",
        "",
    ]
    for key, b in summary.items():
        setting, regime = key.split("/")
        lines += [f"## {setting} inputs (s_k = {b['scales']}), {regime_name[regime]}", ""]
        head = " | ".join(f"task {k} (n={t['n']}, s={t['scale']:g})" for k, t in enumerate(b["tasks"]))
        lines += [f"| method | mean MSE | pooled MSE | rel. W0 | {head} |", "|---" * (4 + len(b["tasks"])) + "|"]
        for m, label in METHODS:
            mm = b["methods"][m]
            cells = [label, pm_s(mm["mean_mse"]), pm_s(mm["pooled_mse"]), pm_s(mm["rel_base"])]
            cells += [f"{mean:.3f}" for mean, _ in mm["per_task"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "| task | n_k | s_k | SGD steps | ‖Δ_k‖_F | alpha T=1 | alpha T=0.5 | n_k / N (eq. 9) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k, t in enumerate(b["tasks"]):
            lines.append(
                f"| {k} | {t['n']} | {t['scale']:g} | {t['steps'][0]:.0f} | {pm_s(t['norm'])} | "
                f"{pm_s(t['alpha_T1'])} | {pm_s(t['alpha_T0.5'])} | {t['n_share']:.3f} |"
            )
        lines += [
            "",
            f"Spearman(alpha, n_k): T=1 {pm_s(b['spearman_alpha_n_T1'], 2)}, T=0.5 {pm_s(b['spearman_alpha_n_T0.5'], 2)} "
            f"(alpha is monotone in the norm, so both temperatures rank alike). "
            f"Spearman(alpha, n_k s_k^2): {pm_s(b['spearman_alpha_info_T1'], 2)}. "
            f"Best task-arithmetic lambda: {pm_s(b['best_lambda'], 2)}.",
            "",
        ]
    return "\n".join(lines)


def pm_s(mean_std, digits=3):
    mean, std = mean_std
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes, 2 seeds, a few seconds; writes no files unless --out-dir"
    )
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--d-out", type=int, default=8)
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000, 5000], help="n_k per task")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[1.5, 0.5, 2.0, 1.0],
        help="input scale s_k per task in the 'scaled' setting ('iso' uses 1)",
    )
    p.add_argument("--noise", type=float, default=1.0, help="label noise std")
    p.add_argument("--shared", type=float, default=1.0, help="size of the shared shift U")
    p.add_argument("--specific", type=float, default=1.0, help="size of the task-specific shift P_k")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10, help="'epochs' regime: epochs per task")
    p.add_argument("--steps", type=int, default=1000, help="'steps' regime: SGD steps per task")
    p.add_argument(
        "--sweep-noise",
        type=float,
        nargs="+",
        default=[0.1, 0.5, 1.0, 3.0],
        help="label-noise levels for the proxy sweep",
    )
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=5000)
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help=f"where results.md/.json go (default {HERE.relative_to(REPO)} for a full run, none for --smoke)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        # --smoke overrides these, whatever else is on the command line
        args.seeds, args.d_in, args.d_out = 2, 16, 4
        args.sizes, args.epochs, args.steps = [20, 40, 80, 160], 5, 100
        args.n_val, args.n_test = 200, 200
    elif args.out_dir is None:
        args.out_dir = HERE
    if len(args.scales) != len(args.sizes):
        p.error("--scales needs one value per --sizes entry")
    if len(args.sizes) < 2:
        p.error("need at least two tasks")
    return args


def main(argv=None):
    start = time.perf_counter()
    cfg = parse_args(argv)
    coeffs = load_coefficients()
    settings = {"iso": [1.0] * len(cfg.sizes), "scaled": list(cfg.scales)}
    runs = []
    for seed in range(cfg.seeds):
        for setting, scales in settings.items():
            for regime in ("epochs", "steps"):
                runs.append(run_one(seed, setting, scales, regime, cfg, coeffs))
    summary = summarize(runs, cfg, settings)
    sweep = proxy_sweep(cfg, coeffs)
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    args_shown = sys.argv[1:] if argv is None else list(argv)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "command": "python " + shlex.join([str(shown), *args_shown]),
        "wall_s": time.perf_counter() - start,
    }
    md = markdown(summary, sweep, cfg, meta)
    print(md)
    # sanity for CI: every number finite
    for r in runs:
        for v in r["test_mse_mean"].values():
            if not math.isfinite(v):
                print("non-finite MSE", file=sys.stderr)
                return 1
    if cfg.out_dir is not None:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        (cfg.out_dir / "results.md").write_text(md + "\n")
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
        payload = {
            "meta": meta,
            "config": config,
            "methods": dict(METHODS),
            "summary": summary,
            "proxy_sweep": sweep,
            "runs": runs,
        }
        (cfg.out_dir / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
        print(f"\nwrote {cfg.out_dir / 'results.md'} and {cfg.out_dir / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

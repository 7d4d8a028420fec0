"""Markdown tables, JSON and per-task plot for run.py's results.

    python report.py [RESULTS_DIR]   # redraw per_task.png from results.json

One section per fine-tuning regime, and a summary table (regime x method) on top.
Main table: each row's per-example hits are averaged over the fine-tuning seeds;
"NAN − stock" is a paired difference on the same test examples (95% CI over
examples, seeds averaged first), and its per-seed values show the seed spread.
Ablation table: first seed only, paired against the same seed's rows.
Premise check: Spearman's rank correlation between NAN's per-model mean
coefficient (T=1) and the training-set size, per seed.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from evaluate import paired_diff_ci, summarize


def _mean_hits(runs, name):
    return {t: torch.stack([r.hits[name][t].float() for r in runs]).mean(0) for t in runs[0].tasks}


def _diff(a, b, tasks):
    d, half = paired_diff_ci({t: a[t] for t in tasks}, {t: b[t] for t in tasks})
    return {"mean": d, "lo": d - half, "hi": d + half}


def _per_task_diffs(a, b, tasks):
    out = {t: _diff(a, b, [t]) for t in tasks}
    out["avg"] = _diff(a, b, tasks)
    return out


def _pct(x):
    return f"{100 * x:.1f}"


def _diff_cell(d):
    return f"{100 * d['mean']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"


def build_rows(runs):
    """Table rows as plain data: main (all seeds) and ablation (first seed)."""
    tasks, first = runs[0].tasks, runs[0]
    main, ablation = [], []
    stock_names = {i["stock"] for i in first.info.values() if i.get("stock")}
    for name, info in first.info.items():
        if not info.get("ablation") and all(name in r.hits for r in runs):
            hits = _mean_hits(runs, name)
            seed_avgs = [summarize(r.hits[name])["avg"]["acc"] for r in runs]
            row = {
                "name": name,
                "seeds": [r.seed for r in runs],
                "scores": summarize(hits),
                "seed_avgs": seed_avgs,
                "info": [r.info[name] for r in runs],
            }
            stock = info.get("stock")
            if stock:
                row["stock"] = stock
                row["diff_vs_stock"] = _per_task_diffs(hits, _mean_hits(runs, stock), tasks)
                row["seed_diffs"] = [_diff(r.hits[name], r.hits[stock], tasks)["mean"] for r in runs]
            main.append(row)
        if info.get("stock") or name in stock_names:
            hits = first.hits[name]
            row = {"name": name, "seeds": [first.seed], "scores": summarize(hits), "info": [info]}
            stock = info.get("stock")
            if stock:
                row["stock"] = stock
                row["diff_vs_stock"] = _per_task_diffs(hits, first.hits[stock], tasks)
                default = f"nan_{stock} T=1"
                if name != default and default in first.hits:
                    row["diff_vs_default"] = _diff(hits, first.hits[default], tasks)
            ablation.append(row)
    return main, ablation


def regime_note(recipe: dict, meta: dict) -> str:
    """One line describing a regime's fine-tuning recipe, from the cache's meta.json."""
    if "steps" in recipe:
        first = max(meta.values(), key=lambda m: m["n_train"])
        last = min(meta.values(), key=lambda m: m["n_train"])
        text = (
            f"{recipe['steps']} optimizer steps for every task ({first['epochs']:.3g} epochs "
            f"of the largest set ... {last['epochs']:.3g} of the smallest)"
        )
    else:
        text = f"{recipe['epochs']} epochs (>= {recipe['min_steps']} steps) per task: more data, more steps"
    text += f", batch {recipe['batch_size']}, lr {recipe['lr']:g}"
    if recipe.get("lr_mult"):
        text += (
            " times a per-task multiplier ("
            + ", ".join(f"{t} x{m:g}" for t, m in recipe["lr_mult"].items())
            + "; not monotone in data size)"
        )
    return text


def premise_summary(runs) -> dict:
    """Per seed: data sizes, delta norms, NAN's mean coefficients and both Spearman values."""
    per_seed = {r.seed: r.premise() for r in runs}
    rho_c = [p.get("spearman_coef_vs_n") for p in per_seed.values()]
    rho_n = [p["spearman_norm_vs_n"] for p in per_seed.values()]
    tasks = runs[0].tasks

    def mean(key):  # per task, over seeds
        return [statistics.mean(p[key][i] for p in per_seed.values()) for i in range(len(tasks))]

    out = {
        "tasks": tasks,
        "n_train": per_seed[runs[0].seed]["n_train"],
        "lr": per_seed[runs[0].seed]["lr"],
        "steps": per_seed[runs[0].seed]["steps"],
        "delta_norm_mean": mean("delta_norm"),
        "per_seed": per_seed,
        "spearman_norm_vs_n": rho_n,
        "spearman_norm_vs_n_mean": statistics.mean(rho_n),
    }
    if all(r is not None for r in rho_c):
        out.update(
            spearman_coef_vs_n=rho_c,
            spearman_coef_vs_n_mean=statistics.mean(rho_c),
            mean_coefficient_mean=mean("mean_coefficient"),
        )
    return out


def regime_section(regime, runs, args) -> tuple[list[str], dict]:
    tasks = runs[0].tasks
    metas = {r.seed: r.meta["tasks"] for r in runs}
    meta0 = runs[0].meta["tasks"]
    main, ablation = build_rows(runs)
    n_test = len(runs[0].hits["individual"][tasks[0]])
    seeds = [r.seed for r in runs]
    premise = premise_summary(runs)

    def task_head():
        return " | ".join(f"{t} ({meta0[t]['n_train']})" for t in tasks)

    lines = [
        f"## Regime `{regime}`",
        "",
        regime_note(runs[0].meta["recipe"], meta0) + ".",
        "",
        f"### All fine-tuning seeds ({', '.join(map(str, seeds))}): mean over seeds",
        "",
        "NAN rows: T=1, tensor granularity. avg ±: spread (sd) of the seeds' averages. "
        "NAN − stock: paired on the same test examples, per-example hits averaged over seeds "
        "first, 95% CI; then each seed's own difference.",
        "",
        f"| method | {task_head()} | avg | NAN − stock (avg, paired 95% CI) | per seed |",
        "|" + "---|" * (len(tasks) + 4),
    ]
    for row in main:
        sc, sd = row["scores"], (statistics.stdev(row["seed_avgs"]) if len(seeds) > 1 else 0.0)
        diff = row.get("diff_vs_stock")
        lines.append(
            f"| {row['name']} | "
            + " | ".join(_pct(sc[t]["acc"]) for t in tasks)
            + f" | {_pct(sc['avg']['acc'])}"
            + (f" ±{100 * sd:.1f}" if len(seeds) > 1 else "")
            + " | "
            + (_diff_cell(diff["avg"]) if diff else "")
            + " | "
            + (" / ".join(f"{100 * d:+.1f}" for d in row["seed_diffs"]) if diff else "")
            + " |"
        )
    ablation_kinds = sorted(
        {
            k
            for r in ablation
            for k in ("temperature", "granularity", "weighting")
            if r["info"][0].get("ablation") and k in r["info"][0] and (k != "temperature" or r["info"][0][k] != 1.0)
        }
    )
    lines += [
        "",
        f"### {' and '.join(k.capitalize() if i == 0 else k for i, k in enumerate(ablation_kinds)) or 'Ablations'} "
        f"(fine-tuning seed {seeds[0]})",
        "",
        "± is the 95% CI half-width of the macro average (normal approximation). "
        "Both differences are paired on the same test examples.",
        "",
        f"| method | {task_head()} | avg | NAN − stock | NAN − same at T=1, tensor |",
        "|" + "---|" * (len(tasks) + 4),
    ]
    for row in ablation:
        sc = row["scores"]
        half = 50 * (sc["avg"]["hi"] - sc["avg"]["lo"])
        lines.append(
            f"| {row['name']} | "
            + " | ".join(_pct(sc[t]["acc"]) for t in tasks)
            + f" | {_pct(sc['avg']['acc'])} ±{half:.1f} | "
            + (_diff_cell(row["diff_vs_stock"]["avg"]) if row.get("stock") else "")
            + " | "
            + (_diff_cell(row["diff_vs_default"]) if row.get("diff_vs_default") else "")
            + " |"
        )

    lines += [
        "",
        "### Tasks, fine-tunes and NAN's coefficients",
        "",
        "| task | classes | train | val | test | steps (epochs) | lr "
        "| val acc, fine-tuned (per seed) | ‖Δ‖_F encoder (per seed) "
        "| NAN mean coefficient, T=1 (per seed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(tasks):
        m = meta0[t]
        coefs = [p.get("mean_coefficient") for p in premise["per_seed"].values()]
        lines.append(
            f"| {t} | {m['num_labels']} | {m['n_train']} | {m['n_val']} | {n_test} | "
            f"{m['steps']} ({m['epochs']:.3g}) | {m.get('lr', 1e-4):.3g} | "
            + " / ".join(_pct(metas[s][t]["val_acc"]) for s in seeds)
            + " | "
            + " / ".join(f"{metas[s][t]['delta_norm']:.2f}" for s in seeds)
            + " | "
            + (" / ".join(f"{c[i]:.3f}" for c in coefs) if all(coefs) else "")
            + " |"
        )
    lines += [
        "",
        "Premise check (Spearman rank correlation with the training-set size, per seed; "
        "+1: more data, more weight): "
        + (f"NAN coefficient {_rhos(premise['spearman_coef_vs_n'])}; " if "spearman_coef_vs_n" in premise else "")
        + f"delta norm {_rhos(premise['spearman_norm_vs_n'])}.",
    ]
    grids = [(r, next((i for i in r.info.values() if "val_curve" in i), None)) for r in runs]
    if any(g for _, g in grids):
        lines += ["", "Lambda grid (mean val accuracy; per seed):"]
    for r, g in grids:
        if g:
            lines.append(
                f"- seed {r.seed}: "
                + ", ".join(f"{k}: {100 * v:.1f}" for k, v in g["val_curve"].items())
                + f" → λ* = {g['lambda_star']:g}; mergekit output − (base + λ·Σδ): "
                f"max |diff| {g['grid_max_abs_diff_vs_mergekit']:.1e}"
            )
    ft_seconds = {s: sum(metas[s][t]["seconds"] for t in tasks) for s in seeds}
    lines += [
        "",
        "Fine-tuning time per seed (all 5 tasks, "
        f"{meta0[tasks[0]].get('threads', '?')} thread(s)): "
        + ", ".join(f"seed {s} {v / 60:.1f} min" for s, v in ft_seconds.items())
        + ".",
    ]
    data = {
        "tasks": {s: metas[s] for s in seeds},
        "task_order": tasks,
        "recipe": runs[0].meta["recipe"],
        "n_test_per_task": n_test,
        "seeds": seeds,
        "main": main,
        "ablation": ablation,
        "premise": premise,
        "finetune_seconds": ft_seconds,
    }
    return lines, data


def _rhos(values) -> str:
    return f"**{statistics.mean(values):+.2f}** (" + " / ".join(f"{v:+.2f}" for v in values) + ")"


def summary_lines(sections: dict) -> list[str]:
    methods = []
    for data in sections.values():
        for row in data["main"]:
            if row.get("stock") and row["stock"] not in methods:
                methods.append(row["stock"])
    sizes = " / ".join(str(n) for n in next(iter(sections.values()))["premise"]["n_train"])
    lines = [
        "## Summary: NAN minus stock, per fine-tuning regime",
        "",
        "Average test accuracy over the 5 tasks, NAN (T=1, tensor granularity) minus the same stock "
        "method with the same settings, in points: per-example hits averaged over the fine-tuning "
        "seeds, paired 95% CI over test examples. ρ: Spearman rank correlation with the training-set "
        f"size ({sizes}), mean over seeds (per seed in brackets); for the NAN "
        "coefficient (per-model mean over tensors, T=1) +1 means more data, more weight, as the "
        "paper assumes. ‖Δ‖: encoder delta norm per task in that size order, mean over seeds.",
        "",
        "| regime | "
        + " | ".join(f"nan_{m} − {m}" for m in methods)
        + " | λ-grid task arithmetic − best stock | ρ(NAN coef, data) | ρ(‖Δ‖, data) | ‖Δ‖_F per task |",
        "|---|" + "---|" * (len(methods) + 4),
    ]
    for regime, data in sections.items():
        cells = []
        for m in methods:
            row = next((r for r in data["main"] if r.get("stock") == m), None)
            cells.append(_diff_cell(row["diff_vs_stock"]["avg"]) if row else "")
        by_name = {r["name"]: r for r in data["main"]}
        stock_avgs = {m: by_name[m]["scores"]["avg"]["acc"] for m in methods if m in by_name}
        grid = next((r for r in data["main"] if "val_curve" in r["info"][0]), None)
        if grid and stock_avgs:
            best = max(stock_avgs, key=stock_avgs.get)
            grid_cell = f"{100 * (grid['scores']['avg']['acc'] - stock_avgs[best]):+.2f} (vs {best})"
        else:
            grid_cell = ""
        pr = data["premise"]
        lines.append(
            f"| {regime} | "
            + " | ".join(cells)
            + f" | {grid_cell} | "
            + (_rhos(pr["spearman_coef_vs_n"]) if "spearman_coef_vs_n" in pr else "")
            + " | "
            + _rhos(pr["spearman_norm_vs_n"])
            + " | "
            + " / ".join(f"{v:.2f}" for v in pr["delta_norm_mean"])
            + " |"
        )
    return lines


def write_report(runs: dict, args, skipped: list[str], timing: dict) -> None:
    """runs: regime -> list of SeedRun (one per fine-tuning seed)."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sections, body = {}, []
    for regime, regime_runs in runs.items():
        lines, data = regime_section(regime, regime_runs, args)
        sections[regime] = data
        body += lines + [""]
    first = next(iter(runs.values()))
    n_test = len(first[0].hits["individual"][first[0].tasks[0]])
    merges = [i for rr in runs.values() for r in rr for i in r.info.values() if "merge_seconds" in i]
    lines = (
        [
            "# Merge quality: all-MiniLM-L6-v2, 5 real text tasks, 3 fine-tuning regimes",
            "",
            f"Test accuracy (%), {n_test} test examples per task (column headers: training-set size). "
            f"Generated {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} with "
            f"{args.threads} thread(s). DARE's drop seed is the fine-tuning seed. Regimes:",
            "",
        ]
        + [f"- `{k}`: {regime_note(rr[0].meta['recipe'], rr[0].meta['tasks'])}" for k, rr in runs.items()]
        + [
            "",
        ]
        + summary_lines(sections)
        + [""]
        + body
    )
    lines += [
        "## Timing",
        "",
        f"- this run: fine-tune / cache check {timing['finetune_or_cache_seconds']:.0f} s; "
        f"whole run {timing['total_seconds']:.0f} s ({len(merges)} merge rows, "
        f"{sum(1 for rr in runs.values() for r in rr for i in r.info.values() if i.get('cached_row'))} "
        "from the row cache)",
    ]
    if merges:
        lines += [
            f"- per merge, as measured when each row was computed: mergekit-yaml "
            f"{statistics.mean(i['merge_seconds'] for i in merges):.1f} s, scoring "
            f"{statistics.mean(i['eval_seconds'] for i in merges):.1f} s; all rows together "
            f"{sum(i.get('seconds', 0) for rr in runs.values() for r in rr for i in r.info.values()) / 60:.0f} min"
        ]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in skipped]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    data = {
        "regimes": sections,
        "seeds": first and [r.seed for r in first],
        "n_test_per_task": n_test,
        "skipped": skipped,
        "timing": timing,
    }
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    torch.save(
        {
            regime: {f"seed{r.seed}": {k: {t: v.bool() for t, v in h.items()} for k, h in r.hits.items()} for r in rr}
            for regime, rr in runs.items()
        },
        out / "hits.pt",
    )
    plot(data, out / "per_task.png")


FAMILY_CMAPS = {"task_arithmetic": "Blues", "ties": "Reds", "dare_ties": "Greens"}


def _color(row, shade=None):
    import matplotlib.pyplot as plt

    name = row["name"]
    if name.startswith("pretrained"):
        return "#aaaaaa"
    if name == "individual":
        return "#333333"
    if "val_curve" in row["info"][0]:
        return "#7b3294"
    family = row.get("stock") or name
    shade = shade if shade is not None else (0.55 if row.get("stock") else 0.9)
    return plt.get_cmap(FAMILY_CMAPS.get(family, "Greys"))(shade)


def plot(data, path) -> None:
    """Per regime: per-task accuracy of the main rows, and NAN − stock per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = data["regimes"]
    fig, axes = plt.subplots(
        len(regimes), 2, figsize=(17, 6.5 * len(regimes)), gridspec_kw={"width_ratios": [3, 2]}, squeeze=False
    )
    for ax_row, (regime, rdata) in zip(axes, regimes.items()):
        _plot_regime(ax_row, regime, rdata)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_regime(axes, regime, data) -> None:
    order = data["task_order"]
    seed0 = data["seeds"][0]
    meta0 = data["tasks"][seed0] if seed0 in data["tasks"] else data["tasks"][str(seed0)]
    cols = order + ["avg"]
    labels = [f"{t}\n(n={meta0[t]['n_train']})" for t in order] + ["avg"]

    ax, rows = axes[0], data["main"]
    width = 0.85 / len(rows)
    lowest = 100.0
    for i, row in enumerate(rows):
        xs = [j + (i - len(rows) / 2 + 0.5) * width for j in range(len(cols))]
        acc = [100 * row["scores"][t]["acc"] for t in cols]
        lowest = min(lowest, *acc)
        ax.bar(xs, acc, width, label=row["name"], color=_color(row))
    ax.set_ylim(max(0, lowest - 8), 100)
    ax.set_xticks(range(len(cols)), labels)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"regime {regime}: per-task test accuracy, mean over seeds {data['seeds']}")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))

    ax = axes[1]  # NAN minus stock, per task, paired
    nan_rows = [r for r in data["main"] if r.get("stock")]
    nan_rows += [dict(r, name=f"{r['name']} (seed {seed0})") for r in data["ablation"] if r["info"][0].get("ablation")]
    width = 0.85 / max(1, len(nan_rows))
    for i, row in enumerate(nan_rows):
        xs = [j + (i - len(nan_rows) / 2 + 0.5) * width for j in range(len(cols))]
        d = row["diff_vs_stock"]
        means = [100 * d[t]["mean"] for t in cols]
        errs = [100 * (d[t]["hi"] - d[t]["mean"]) for t in cols]
        main_row = not row["info"][0].get("ablation")
        ax.bar(
            xs,
            means,
            width,
            yerr=errs,
            label=row["name"],
            color=_color(row, None if main_row else 0.3 + 0.1 * (i % 4)),
            hatch=None if main_row else "//",
            error_kw={"elinewidth": 0.6},
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(cols)), labels)
    ax.set_ylabel("accuracy difference (points)")
    ax.set_title(f"regime {regime}: NAN − same stock method (paired 95% CI); hatched: ablations, one seed", fontsize=10)
    if nan_rows:
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    else:
        ax.text(0.5, 0.5, "no NAN rows (mergekit-nan not installed)", ha="center", transform=ax.transAxes)


if __name__ == "__main__":
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    plot(json.loads((results / "results.json").read_text()), results / "per_task.png")

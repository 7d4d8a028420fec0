"""Markdown tables, JSON and per-task plot for run.py's results.

    python report.py [RESULTS_DIR]   # redraw per_task.png from results.json

Main table: each row's per-example hits are averaged over the fine-tuning seeds;
"NAN − stock" is a paired difference on the same test examples (95% CI over
examples, seeds averaged first), and its per-seed values show the seed spread.
Ablation table: first seed only, paired against the same seed's rows.
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
    return {t: torch.stack([r.hits[name][t].float() for r in runs]).mean(0)
            for t in runs[0].tasks}


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
            row = {"name": name, "seeds": [r.seed for r in runs],
                   "scores": summarize(hits), "seed_avgs": seed_avgs,
                   "info": [r.info[name] for r in runs]}
            stock = info.get("stock")
            if stock:
                row["stock"] = stock
                row["diff_vs_stock"] = _per_task_diffs(hits, _mean_hits(runs, stock), tasks)
                row["seed_diffs"] = [_diff(r.hits[name], r.hits[stock], tasks)["mean"]
                                     for r in runs]
            main.append(row)
        if info.get("stock") or name in stock_names:
            hits = first.hits[name]
            row = {"name": name, "seeds": [first.seed], "scores": summarize(hits),
                   "info": [info]}
            stock = info.get("stock")
            if stock:
                row["stock"] = stock
                row["diff_vs_stock"] = _per_task_diffs(hits, first.hits[stock], tasks)
                default = f"nan_{stock} T=1"
                if name != default and default in first.hits:
                    row["diff_vs_default"] = _diff(hits, first.hits[default], tasks)
            ablation.append(row)
    return main, ablation


def write_report(runs, args, skipped: list[str], timing: dict) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tasks = runs[0].tasks
    metas = {r.seed: r.meta["tasks"] for r in runs}
    meta0 = runs[0].meta["tasks"]
    main, ablation = build_rows(runs)
    n_test = len(runs[0].hits["individual"][tasks[0]])
    seeds = [r.seed for r in runs]

    def task_head():
        return " | ".join(f"{t} ({meta0[t]['n_train']})" for t in tasks)

    lines = [
        "# Merge quality: all-MiniLM-L6-v2, 5 real text tasks", "",
        f"Test accuracy (%), {n_test} test examples per task (column headers: training-set size). "
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} with "
        f"{args.threads} thread(s). DARE's drop seed is the fine-tuning seed.", "",
        f"## All fine-tuning seeds ({', '.join(map(str, seeds))}): mean over seeds", "",
        "NAN rows: T=1, tensor granularity. avg ±: spread (sd) of the seeds' averages. "
        "NAN − stock: paired on the same test examples, per-example hits averaged over seeds "
        "first, 95% CI; then each seed's own difference.", "",
        f"| method | {task_head()} | avg | NAN − stock (avg, paired 95% CI) | per seed |",
        "|" + "---|" * (len(tasks) + 4),
    ]
    for row in main:
        sc, sd = row["scores"], (statistics.stdev(row["seed_avgs"]) if len(seeds) > 1 else 0.0)
        diff = row.get("diff_vs_stock")
        lines.append(
            f"| {row['name']} | " + " | ".join(_pct(sc[t]["acc"]) for t in tasks)
            + f" | {_pct(sc['avg']['acc'])}" + (f" ±{100 * sd:.1f}" if len(seeds) > 1 else "") + " | "
            + (_diff_cell(diff["avg"]) if diff else "") + " | "
            + (" / ".join(f"{100 * d:+.1f}" for d in row["seed_diffs"]) if diff else "") + " |")
    lines += [
        "", f"## Temperature and granularity (fine-tuning seed {seeds[0]})", "",
        "± is the 95% CI half-width of the macro average (normal approximation). "
        "Both differences are paired on the same test examples.", "",
        f"| method | {task_head()} | avg | NAN − stock | NAN − same at T=1, tensor |",
        "|" + "---|" * (len(tasks) + 4),
    ]
    for row in ablation:
        sc = row["scores"]
        half = 50 * (sc["avg"]["hi"] - sc["avg"]["lo"])
        lines.append(
            f"| {row['name']} | " + " | ".join(_pct(sc[t]["acc"]) for t in tasks)
            + f" | {_pct(sc['avg']['acc'])} ±{half:.1f} | "
            + (_diff_cell(row["diff_vs_stock"]["avg"]) if row.get("stock") else "") + " | "
            + (_diff_cell(row["diff_vs_default"]) if row.get("diff_vs_default") else "") + " |")

    lines += ["", "## Tasks and fine-tunes", "",
              "| task | classes | train | val | test | steps | val acc, fine-tuned (per seed) "
              "| ‖Δ‖_F encoder (per seed) |", "|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        m = meta0[t]
        lines.append(
            f"| {t} | {m['num_labels']} | {m['n_train']} | {m['n_val']} | {n_test} | {m['steps']} | "
            + " / ".join(_pct(metas[s][t]["val_acc"]) for s in seeds) + " | "
            + " / ".join(f"{metas[s][t]['delta_norm']:.2f}" for s in seeds) + " |")
    lines += ["", "Lambda grid (mean val accuracy; per seed):"]
    for r in runs:
        g = next((i for i in r.info.values() if "val_curve" in i), None)
        if g:
            lines.append(f"- seed {r.seed}: " + ", ".join(
                f"{k}: {100 * v:.1f}" for k, v in g["val_curve"].items())
                + f" → λ* = {g['lambda_star']:g}; mergekit output − (base + λ·Σδ): "
                f"max |diff| {g['grid_max_abs_diff_vs_mergekit']:.1e}")
    merges = [i for r in runs for i in r.info.values() if "merge_seconds" in i]
    lines += ["", "## Timing", "",
              f"- fine-tune / cache check: {timing['finetune_or_cache_seconds']:.0f} s; "
              f"whole run: {timing['total_seconds']:.0f} s ({len(merges)} merges)",
              f"- per merge: mergekit-yaml {statistics.mean(i['merge_seconds'] for i in merges):.1f} s, "
              f"scoring {statistics.mean(i['eval_seconds'] for i in merges):.1f} s"]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in skipped]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    data = {"tasks": {s: metas[s] for s in seeds}, "task_order": tasks,
            "recipe": runs[0].meta["recipe"], "n_test_per_task": n_test, "seeds": seeds,
            "main": main, "ablation": ablation, "skipped": skipped, "timing": timing}
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    torch.save({f"seed{r.seed}": {k: {t: v.bool() for t, v in h.items()}
                                  for k, h in r.hits.items()} for r in runs}, out / "hits.pt")
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = data["task_order"]
    meta0 = data["tasks"][data["seeds"][0]] if data["seeds"][0] in data["tasks"] \
        else data["tasks"][str(data["seeds"][0])]
    cols = order + ["avg"]
    labels = [f"{t}\n(n={meta0[t]['n_train']})" for t in order] + ["avg"]
    fig, axes = plt.subplots(1, 2, figsize=(17, 7), gridspec_kw={"width_ratios": [3, 2]})

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
    ax.set_title(f"Per-task test accuracy, mean over fine-tuning seeds {data['seeds']}")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))

    ax = axes[1]  # NAN minus stock, per task, paired
    nan_rows = [r for r in data["main"] if r.get("stock")]
    nan_rows += [dict(r, name=f"{r['name']} (seed {data['seeds'][0]})") for r in data["ablation"]
                 if r["info"][0].get("ablation")]
    width = 0.85 / max(1, len(nan_rows))
    for i, row in enumerate(nan_rows):
        xs = [j + (i - len(nan_rows) / 2 + 0.5) * width for j in range(len(cols))]
        d = row["diff_vs_stock"]
        means = [100 * d[t]["mean"] for t in cols]
        errs = [100 * (d[t]["hi"] - d[t]["mean"]) for t in cols]
        main_row = not row["info"][0].get("ablation")
        ax.bar(xs, means, width, yerr=errs, label=row["name"],
               color=_color(row, None if main_row else 0.3 + 0.1 * (i % 4)),
               hatch=None if main_row else "//", error_kw={"elinewidth": 0.6})
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(cols)), labels)
    ax.set_ylabel("accuracy difference (points)")
    ax.set_title("NAN − same stock method (paired 95% CI); hatched: ablations, one seed")
    if nan_rows:
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    else:
        ax.text(0.5, 0.5, "no NAN rows (mergekit-nan not installed)", ha="center",
                transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    plot(json.loads((results / "results.json").read_text()), results / "per_task.png")

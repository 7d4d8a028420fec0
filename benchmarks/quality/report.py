"""Markdown table, JSON and per-task plot for run.py's results.

    python report.py [RESULTS_DIR]   # redraw per_task.png from results.json + hits.pt
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from evaluate import paired_diff_ci


def _cell(score: dict) -> str:
    return f"{100 * score['acc']:.1f} ±{50 * (score['hi'] - score['lo']):.1f}"


def write_report(bench, skipped: list[str], timing: dict) -> None:
    out = bench.out
    out.mkdir(parents=True, exist_ok=True)
    tasks, meta = bench.tasks, bench.meta["tasks"]
    bench.rows.sort(key=lambda r: "val_curve" in r)  # data-using reference last

    # NAN minus its stock method, paired on the same test examples (and DARE seeds)
    for row in bench.rows:
        stock = row.get("stock")
        if stock and stock in bench.hits:
            d, half = paired_diff_ci(bench.hits[row["name"]], bench.hits[stock])
            row["diff_vs_stock"] = {"mean": d, "lo": d - half, "hi": d + half}

    head = "| method | " + " | ".join(
        f"{t} ({meta[t]['n_train']})" for t in tasks)
    head += " | avg | NAN − stock (avg, paired 95% CI) |"
    lines = [
        "# Merge quality: all-MiniLM-L6-v2, 5 real text tasks",
        "",
        f"Test accuracy (%) ± 95% CI half-width (Wilson per task; normal approximation for the "
        f"macro average). Column headers give the training-set size. Fine-tuning seed "
        f"{bench.args.seed}; randomized methods averaged over DARE seeds "
        f"{bench.args.dare_seeds}. Generated {time.strftime('%Y-%m-%d %H:%M')} on "
        f"{platform.machine()} with {bench.args.threads} thread(s).",
        "",
        head,
        "|" + "---|" * (len(tasks) + 3),
    ]
    for row in bench.rows:
        sc = row["scores"]
        diff = row.get("diff_vs_stock")
        diff_s = (f"{100 * diff['mean']:+.2f} [{100 * diff['lo']:+.2f}, {100 * diff['hi']:+.2f}]"
                  if diff else "")
        lines.append(f"| {row['name']} | " + " | ".join(_cell(sc[t]) for t in tasks)
                     + f" | {_cell(sc['avg'])} | {diff_s} |")
    lines += ["", "## Tasks and fine-tunes", "",
              "| task | classes | train | val | test | steps | val acc (probe → fine-tuned) "
              "| ‖Δ‖_F encoder |", "|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        m = meta[t]
        lines.append(f"| {t} | {m['num_labels']} | {m['n_train']} | {m['n_val']} | {m['n_test']} "
                     f"| {m['steps']} "
                     f"| {100 * m['probe_val_acc']:.1f} → {100 * m['val_acc']:.1f} "
                     f"| {m['delta_norm']:.3f} |")
    grid = next((r for r in bench.rows if "val_curve" in r), None)
    if grid:
        lines += ["", "Lambda grid (mean val accuracy): " + ", ".join(
            f"{k}: {100 * v:.1f}" for k, v in grid["val_curve"].items())
            + f"; mergekit output equals base + λ·Σδ: {grid.get('grid_matches_mergekit')}"]
    lines += ["", "## Timing", "",
              f"- fine-tune / cache check: {timing['finetune_or_cache_seconds']:.0f} s; "
              f"whole run: {timing['total_seconds']:.0f} s",
              f"- per merge (one seed): mergekit-yaml {_per_merge(bench.rows, 'merge_seconds'):.1f} s, "
              f"scoring {_per_merge(bench.rows, 'eval_seconds'):.1f} s"]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in skipped]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    (out / "results.json").write_text(json.dumps({
        "tasks": {t: meta[t] for t in tasks},
        "recipe": bench.meta["recipe"],
        "rows": bench.rows, "skipped": skipped, "timing": timing,
    }, indent=1, default=str))
    torch.save({k: {t: v.half() for t, v in h.items()} for k, h in bench.hits.items()},
               out / "hits.pt")
    plot(bench, out / "per_task.png")


def _per_merge(rows, key):
    xs = [r[key] / max(1, len(r["seeds"])) for r in rows if key in r]
    return sum(xs) / len(xs) if xs else 0.0


FAMILY_CMAPS = {"task_arithmetic": "Blues", "ties": "Reds", "dare_ties": "Greens"}


def _color(row):
    """Stock method dark, its NAN rows lighter with rising T; references grey/black/purple."""
    import matplotlib.pyplot as plt

    name = row["name"]
    if name.startswith("pretrained"):
        return "#aaaaaa"
    if name == "individual":
        return "#333333"
    if "val_curve" in row:
        return "#7b3294"
    family = row.get("stock") or row.get("method")
    shade = 0.9 if not row.get("stock") else 0.75 - 0.12 * [0.5, 1.0, 2.0].index(
        row["temperature"]) if row.get("temperature") in (0.5, 1.0, 2.0) else 0.5
    return plt.get_cmap(FAMILY_CMAPS.get(family, "Greys"))(shade)


def plot(bench, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = bench.tasks + ["avg"]
    labels = [f"{t}\n(n={bench.meta['tasks'][t]['n_train']})" for t in bench.tasks] + ["avg"]
    rows = [r for r in bench.rows if "linear probe" not in r["name"]]
    fig, axes = plt.subplots(1, 2, figsize=(17, 7), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    width = 0.85 / len(rows)
    lowest = 100.0
    for i, row in enumerate(rows):
        xs = [j + (i - len(rows) / 2 + 0.5) * width for j in range(len(tasks))]
        acc = [100 * row["scores"][t]["acc"] for t in tasks]
        err = [[100 * (row["scores"][t]["acc"] - row["scores"][t]["lo"]) for t in tasks],
               [100 * (row["scores"][t]["hi"] - row["scores"][t]["acc"]) for t in tasks]]
        lowest = min(lowest, *acc)
        ax.bar(xs, acc, width, yerr=err, label=row["name"], color=_color(row),
               error_kw={"elinewidth": 0.6})
    ax.set_ylim(max(0, lowest - 8), 100)
    ax.set_xticks(range(len(tasks)), labels)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Per-task test accuracy (95% Wilson CI); n = training-set size")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))

    ax = axes[1]  # NAN minus stock, per task, paired
    nan_rows = [r for r in bench.rows if r.get("stock") in bench.hits]
    width = 0.85 / max(1, len(nan_rows))
    for i, row in enumerate(nan_rows):
        xs = [j + (i - len(nan_rows) / 2 + 0.5) * width for j in range(len(tasks))]
        ds, errs = [], []
        for t in tasks:
            sel = bench.tasks if t == "avg" else [t]
            d, h = paired_diff_ci({k: bench.hits[row["name"]][k] for k in sel},
                                  {k: bench.hits[row["stock"]][k] for k in sel})
            ds.append(100 * d)
            errs.append(100 * h)
        ax.bar(xs, ds, width, yerr=errs, label=row["name"], color=_color(row),
               error_kw={"elinewidth": 0.6})
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(tasks)), labels)
    ax.set_ylabel("accuracy difference (points)")
    ax.set_title("NAN − same stock method (paired 95% CI)")
    if nan_rows:
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    else:
        ax.text(0.5, 0.5, "no NAN rows (mergekit-nan not installed)", ha="center",
                transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(results_dir: Path) -> None:
    """Redraw per_task.png from results.json + hits.pt (no merging or scoring)."""
    data = json.loads((results_dir / "results.json").read_text())
    hits = torch.load(results_dir / "hits.pt")
    bench = SimpleNamespace(
        rows=data["rows"], meta={"tasks": data["tasks"]},
        tasks=sorted(data["tasks"], key=lambda t: -data["tasks"][t]["n_train"]),
        hits={k: {t: v.float() for t, v in h.items()} for k, h in hits.items()})
    plot(bench, results_dir / "per_task.png")


if __name__ == "__main__":
    replot(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results")

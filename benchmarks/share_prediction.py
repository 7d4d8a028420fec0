"""Does `mergekit-nan inspect`'s report predict what switching to a nan_ method does?

    python share_prediction.py            # every committed benchmark set whose fine-tunes are cached here
    python share_prediction.py --smoke    # CI: the two quality smokes' sets (run their --smoke first)
    python share_prediction.py --redraw   # results.md and the plot again, from results.json

For each benchmark set (family x regime x fine-tuning seed) and stock method (ties, dare_ties, task_arithmetic at
its fixed setting), it runs `mergekit-nan inspect` on the committed stock config of that set and reads the stock
weights' largest `sign_election_share` and `delta_share` (and NAN's for the same model), then sets them beside the
measured difference of the method's nan_ default against stock (the committed results, as select_weighting.py
reads them: MiniLM average accuracy in points, SmolLM2 macro held-out loss in nats/token, sign flipped so that
positive is better). A set whose fine-tunes are not cached on this machine (the caches do not survive a new
machine; `run.py` of each benchmark rebuilds them) is listed as not run. Writes results.md, results.json and
prediction.png under share_prediction/ (smoke: share_prediction/smoke/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from select_weighting import HERE, case_name, minilm_cells, smollm2_cells

from mergekit_nan.core.parameters import shared_default

METHODS = {  # stock method -> (MiniLM config name, SmolLM2 config name)
    "ties": ("ties.yml", "ties.yml"),
    "dare_ties": ("dare_ties.yml", "dare_ties.yml"),
    "task_arithmetic": ("task_arithmetic.yml", "task_arithmetic_1.yml"),  # SmolLM2's fixed setting is λ = 1
}
MINILM = HERE / "quality" / "results"
SMOLLM2 = HERE / "quality_llm" / "results"


def runs(smoke: bool) -> list[tuple[str, Path]]:
    """(family, results folder) of every committed run: candidates and confirmations, or the smokes."""
    if smoke:
        return [("MiniLM", MINILM / "smoke"), ("SmolLM2", SMOLLM2 / "smoke")]
    found = []
    for family, root in (("MiniLM", MINILM), ("SmolLM2", SMOLLM2)):
        for kind in ("candidates", "confirmation"):
            for results in sorted((root / kind).glob("results.json")) + sorted((root / kind).glob("*/results.json")):
                found.append((family, results.parent))
    return found


def sets(family: str, folder: Path, smoke: bool) -> list[dict]:
    """The sets of one run: regime, seed, the stock configs and the measured cells (of each method's nan_
    default; the smokes run T=1 only)."""
    doc = json.loads((folder / "results.json").read_text())
    cells = minilm_cells(doc) if family == "MiniLM" else smollm2_cells(doc)
    out = []
    for regime in doc["regimes"]:
        for seed_dir in sorted((folder / "configs" / regime).glob("seed*")):
            seed = int(seed_dir.name.removeprefix("seed"))
            case = case_name(family, regime, [seed])
            for method, names in METHODS.items():
                config = seed_dir / names[0 if family == "MiniLM" else 1]
                default = "T=1" if smoke else f"T={shared_default('temperature', method):g}"
                measured = cells.get((method, default), {}).get(case if family == "MiniLM" else f"{case} loss")
                if config.exists() and measured:
                    out.append({"case": case, "method": method, "config": config, "default": default, "cell": measured})
    return out


def inspect(config: Path, options: list[str]) -> dict | None:
    """shares.json of `mergekit-nan inspect` on `config`, or None when its models are not on this machine."""
    text = yaml.safe_load(config.read_text())
    paths = [text["base_model"]] + [m["model"] for m in text["models"]]
    if not all(Path(p).exists() for p in paths):
        return None
    with tempfile.TemporaryDirectory() as out:
        command = [str(Path(sys.executable).parent / "mergekit-nan"), "inspect", str(config), "--out", out]
        run = subprocess.run(command + options, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
        return json.loads((Path(out) / "shares.json").read_text())


def largest(shares: dict, key: str) -> dict | None:
    """The model with the largest stock share, its stock and NAN share (whole model)."""
    whole = shares["whole_model"]
    figures = {m: whole["stock"][m][key] for m in shares["models"] if whole["stock"][m][key]}
    if not figures:
        return None
    model = max(figures, key=lambda m: figures[m]["value"])
    return {
        "model": Path(model).name.split("-")[0],  # SmolLM2's fine-tunes: code-64steps-... -> code
        "stock": figures[model]["value"],
        "nan": whole["nan"][model][key]["value"],
        "equal": 1 / len(shares["models"]),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--redraw", action="store_true", help="rewrite results.md and the plot from results.json")
    args = ap.parse_args(argv)
    out = args.out or HERE / "share_prediction" / ("smoke" if args.smoke else "")
    if args.redraw:
        saved = json.loads((out / "results.json").read_text())
        (out / "results.md").write_text(report(saved["rows"], saved["not_run"]))
        plot(saved["rows"], out / "prediction.png")
        return
    rows, missing = [], []
    for family, folder in runs(args.smoke):
        if not (folder / "results.json").exists():
            missing.append(f"{folder.relative_to(HERE)}: no results.json")
            continue
        for item in sets(family, folder, args.smoke):
            seed = item["config"].parent.name.removeprefix("seed")
            options = ["--random-seed", seed] if item["method"] == "dare_ties" else []
            shares = inspect(item["config"], options)
            if shares is None:
                missing.append(f"{item['case']} {item['method']}: fine-tunes not cached here")
                continue
            mean, lo, hi, margin = item["cell"]
            rows.append(
                {
                    "case": item["case"],
                    "method": item["method"],
                    "nan_setting": item["default"],
                    "config": str(item["config"].relative_to(HERE)),
                    "sign_election": largest(shares, "sign_election_share"),
                    "delta": largest(shares, "delta_share"),
                    "measured": {"mean": mean, "lo": lo, "hi": hi, "margin": margin},
                    "unit": "points" if item["case"].startswith("MiniLM") else "nats/token (lower loss = positive)",
                }
            )
            print(f"{item['case']:28s} {item['method']:16s} measured {mean:+.3f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "not_run": missing}, indent=1) + "\n")
    (out / "results.md").write_text(report(rows, missing))
    plot(rows, out / "prediction.png")
    print(f"wrote {out}")


def _share(figure: dict | None) -> str:
    if not figure:
        return "—"
    equal = f" (of {round(1 / figure['equal'])})"
    return f"{figure['model']} {100 * figure['stock']:.0f}% → {100 * figure['nan']:.0f}%{equal}"


def report(rows: list[dict], missing: list[str]) -> str:
    lines = [
        "# Does inspect's report predict the switch?",
        "",
        "Written by `python benchmarks/share_prediction.py`. Per benchmark set and stock method: the model with the "
        "largest share under the stock weights (whole model), its share under NAN's default, and the measured "
        "nan_ − stock difference at that default (paired 95% CI; MiniLM accuracy points, SmolLM2 macro loss in "
        "nats/token, sign flipped: positive = better).",
        "",
        "| set | method | largest sign-election share (stock → nan) | largest delta share (stock → nan) "
        "| measured nan_ − stock |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["measured"]
        digits = 2 if r["case"].startswith("MiniLM") else 3
        measured = f"{m['mean']:+.{digits}f} [{m['lo']:+.{digits}f}, {m['hi']:+.{digits}f}]"
        lines.append(
            f"| {r['case']} | `{r['method']}` → {r['nan_setting']} | {_share(r['sign_election'])} "
            f"| {_share(r['delta'])} | {measured} |"
        )
    if missing:
        lines += ["", "Not run here:"] + [f"- {m}" for m in missing]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Measured difference against the stock weights' largest share, one panel per figure and family."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    families = ["MiniLM", "SmolLM2"]
    keys = [("sign_election", "largest sign-election share, stock"), ("delta", "largest delta share, stock")]
    figure, axes = plt.subplots(2, 2, squeeze=False, layout="constrained", figsize=(10, 7))
    markers = {"ties": "o", "dare_ties": "s", "task_arithmetic": "^"}
    colours = {"ties": "C0", "dare_ties": "C1", "task_arithmetic": "C2"}
    for row, family in enumerate(families):
        for column, (key, label) in enumerate(keys):
            ax = axes[row][column]
            for r in rows:
                if not r["case"].startswith(family) or not r[key]:
                    continue
                m = r["measured"]
                ax.errorbar(
                    r[key]["stock"],
                    m["mean"],
                    yerr=[[m["mean"] - m["lo"]], [m["hi"] - m["mean"]]],
                    fmt=markers[r["method"]],
                    color=colours[r["method"]],
                    capsize=2,
                    label=r["method"],
                )
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel(f"{family}: nan_ − stock ({'points' if family == 'MiniLM' else 'nats, flipped'})", fontsize=8)
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles))
            if unique:
                ax.legend(unique.values(), unique.keys(), fontsize=7)
    figure.suptitle("inspect's stock shares against the measured switch, per benchmark set", fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()

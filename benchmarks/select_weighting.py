"""Apply the weighting-selection rule (benchmarks/quality/results/expectations.md, 2026-12-02) to the
candidate results of both quality benchmarks, and write the table it decides from.

    python select_weighting.py [--minilm quality/results/candidates/*/results.json]
                               [--smollm2 quality_llm/results/candidates/results.json] [--out candidates.md]
                               [--readme ../README.md [--check]]

The runs on the confirmation seeds (`results/confirmation/` of each benchmark) are shown after the pick, with
the same cells and the same "safe" test; they take no part in it.

With `--readme`, the two "When NAN helps" tables of the repository README (the paper's T=1 and each method's
pick, seed 0 and confirmation seeds) are rewritten between their `<!-- select_weighting:... -->` markers, in
the README's units (SmolLM2 loss not flipped: negative = better); `--check` only says whether they are current.

Each option takes zero or more results.json (a regime's run each, or one run of several regimes); the
defaults are every candidate run committed under the two benchmarks.

Per wrapped method and candidate, every case (regime x family; SmolLM2 gives two measures: macro held-out
loss and arithmetic exact match) shows candidate - stock with its paired 95% CI, signed so that positive is
better. A candidate is safe when no CI lies entirely below zero; among safe ones the pick has the most CIs
entirely above zero, then the highest mean MiniLM difference, then the simplest setting.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from mergekit_nan.core.parameters import shared_default

HERE = Path(__file__).resolve().parent
MINILM_GRID_ROW = "task_arithmetic, λ from val grid"
TUNED = "task_arithmetic, λ from val"
ROW_NAME = re.compile(r"^nan_(\w+)(?: \[([^\]]+)\])?(?: (.*))?$")  # nan_<stock> [candidate] λ=...
METHOD_ORDER = ["task_arithmetic", TUNED, "ties", "dare_ties"]
# the rule's last tie-break: the paper's default, then the shrink weightings, then other temperatures
SIMPLICITY = ["T=1", "weighting=shrink_median", "weighting=shrink_geomean", "T=2", "T=0.5", "T=4"]


def case_name(family: str, regime: str, seeds: list[int]) -> str:
    """A case is a family and regime on the picking seed 0; other seeds (the confirmation runs) are named, so two
    seeds of one regime stay two cases."""
    return f"{family} {regime}" + ("" if seeds == [0] else " seed " + ",".join(map(str, seeds)))


def minilm_cells(doc: dict) -> dict:
    """{(method, candidate): {case: (mean, lo, hi) in accuracy points}} from MiniLM's results.json."""
    cells: dict = {}
    for regime, section in doc["regimes"].items():
        for row in section["ablation"]:
            stock, name = row.get("stock"), row["name"]
            if not stock or "granularity=" in name:
                continue
            if stock == MINILM_GRID_ROW:
                method, label = TUNED, name.removeprefix("nan_task_arithmetic ").removesuffix(", λ from val grid")
            else:
                method, label = stock, name.removeprefix(f"nan_{stock} ")
            d = row["diff_vs_stock"]["avg"]
            case = case_name("MiniLM", regime, row["seeds"])
            cells.setdefault((method, label), {})[case] = tuple(100 * d[k] for k in ("mean", "lo", "hi"))
    return cells


def smollm2_cells(doc: dict) -> dict:
    """The same from SmolLM2's results.json: loss (nats/token, sign flipped: positive = lower loss) and exact
    match (points); task arithmetic at λ = 1 stands for its fixed setting."""
    cells: dict = {}
    for regime, section in doc["regimes"].items():
        case = case_name("SmolLM2", regime, section["seeds"])
        for name, row in section["rows"].items():
            diff = row.get("nan_minus_stock")
            if not diff or not name.startswith("nan_"):
                continue
            match = ROW_NAME.match(name)
            stock, label, tail = match.group(1), match.group(2) or "T=1", match.group(3) or ""
            if stock == "task_arithmetic":
                if tail == "λ=1":
                    method = "task_arithmetic"
                elif tail == "λ from val":
                    method = TUNED
                else:
                    continue
            else:
                method = stock
            loss = diff["loss_macro"]
            out = cells.setdefault((method, label), {})
            out[f"{case} loss"] = tuple(-loss[k] for k in ("mean", "hi", "lo"))
            for domain, em in diff["exact_match"].items():
                out[f"{case} EM {domain}"] = tuple(100 * em[k] for k in ("mean", "lo", "hi"))
    return cells


def simplicity(label: str) -> int:
    """The rule's last tie-break, also the order rows are shown in (unknown labels last)."""
    return SIMPLICITY.index(label) if label in SIMPLICITY else len(SIMPLICITY)


def case_order(cells: dict) -> list[str]:
    return sorted({c for v in cells.values() for c in v}, key=lambda c: (not c.startswith("MiniLM"), c))


def interval(mean: float, lo: float, hi: float, digits: int = 2) -> str:
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def shown(row: dict, cases: list[str]) -> str:
    return " | ".join(interval(*row[c]) if c in row else "" for c in cases)


def decide(cells: dict) -> dict:
    """Per method: each candidate's verdict and the pick (None: no candidate is safe)."""
    out = {}
    for method in METHOD_ORDER:
        candidates = {label: cases for (m, label), cases in cells.items() if m == method}
        verdicts = {}
        for label, cases in candidates.items():
            worse = [c for c, (_, lo, hi) in cases.items() if hi < 0]
            better = [c for c, (_, lo, hi) in cases.items() if lo > 0]
            minilm = [v[0] for c, v in cases.items() if c.startswith("MiniLM")]
            verdicts[label] = {
                "safe": not worse,
                "worse_in": worse,
                "better_in": better,
                "mean_minilm": sum(minilm) / len(minilm) if minilm else float("nan"),
            }
        safe = [label for label, v in verdicts.items() if v["safe"]]
        pick = max(
            safe,
            key=lambda label: (len(verdicts[label]["better_in"]), verdicts[label]["mean_minilm"], -simplicity(label)),
            default=None,
        )
        out[method] = {"verdicts": verdicts, "pick": pick}
    return out


def table(cells: dict, decisions: dict) -> list[str]:
    cases = case_order(cells)
    lines = []
    for method in METHOD_ORDER:
        verdicts = decisions[method]["verdicts"]
        if not verdicts:
            continue
        lines += [
            f"### {method}: pick **{decisions[method]['pick'] or 'none (stock)'}**",
            "",
            "| candidate | " + " | ".join(cases) + " | safe | better in |",
            "|---|" + "---|" * (len(cases) + 2),
        ]
        for label in sorted(verdicts, key=simplicity):
            v = verdicts[label]
            lines.append(
                f"| {label} | {shown(cells[(method, label)], cases)} | {'yes' if v['safe'] else 'no'} "
                f"| {len(v['better_in'])} |"
            )
        lines.append("")
    return lines


def confirmation(cells: dict, picks: dict) -> list[str]:
    """Every candidate run on the confirmation seeds, judged by the same rule, the seed-0 pick of each method
    marked."""
    cases = case_order(cells)
    lines = [
        "## Confirmation seeds (they did not take part in the pick)",
        "",
        "| method | candidate | " + " | ".join(cases) + " | safe |",
        "|---|---|" + "---|" * (len(cases) + 1),
    ]
    for method, decision in decide(cells).items():
        pick = picks[method]["pick"]
        for label in sorted(decision["verdicts"], key=simplicity):
            marked = label + (" (pick)" if label == pick else "")
            safe = "yes" if decision["verdicts"][label]["safe"] else "no"
            lines.append(f"| {method} | {marked} | {shown(cells[(method, label)], cases)} | {safe} |")
    return lines + [""]


README_METHOD = {
    "task_arithmetic": "`task_arithmetic` (MiniLM weight 0.3, SmolLM2 λ = 1)",
    TUNED: "`task_arithmetic`, λ tuned on validation",
    "ties": "`ties`",
    "dare_ties": "`dare_ties`",
}
README_REGIMES = ["epochs", "steps", "intensity"]
README_MARKER = re.compile(r"(<!-- select_weighting:(\w+) -->\n).*?(<!-- /select_weighting -->)", re.S)


def readme_setting(label: str) -> str:
    """`T=4` -> `temperature: 4`, `weighting=shrink_median` -> `weighting: shrink_median`."""
    key, value = label.split("=", 1)
    return f"`{'temperature' if key == 'T' else key}: {value}`"


def readme_cell(row: dict, case: str) -> str:
    """One README cell: candidate - stock [CI], bold when measurably better, italic when measurably worse; for
    SmolLM2 the loss in nats/token (negative = better) then the arithmetic exact match."""

    def marked(text: str, lo_hi: tuple) -> str:
        return f"**{text}**" if lo_hi[0] > 0 else f"*{text}*" if lo_hi[1] < 0 else text

    if case.startswith("MiniLM"):
        if case not in row:
            return ""
        mean, lo, hi = row[case]
        return marked(interval(mean, lo, hi), (lo, hi))
    if f"{case} loss" not in row:
        return ""
    mean, lo, hi = row[f"{case} loss"]  # flipped: positive = lower loss
    loss = marked(interval(-mean, -hi, -lo, digits=3), (lo, hi))
    mean, lo, hi = row[f"{case} EM arith"]
    return f"{loss}; EM {marked(interval(mean, lo, hi), (lo, hi))}"


def readme_title(case: str) -> str:
    """`SmolLM2 epochs seed 1` -> SmolLM2 `epochs` seed 1."""
    family, regime, *seed = case.split(" ", 2)
    return f"{family} `{regime}`" + "".join(f" {s}" for s in seed)


def readme_table(cells: dict, decisions: dict, cases: list[str], notes: bool) -> str:
    """The paper's T=1 and the pick of each method over `cases`; `notes` marks the pick and the plugin default."""
    lines = [
        "| wrapped method | setting | " + " | ".join(map(readme_title, cases)) + " |",
        "|---|---|" + "---|" * len(cases),
    ]
    for method in METHOD_ORDER:
        pick = decisions[method]["pick"]
        wrapped = "task_arithmetic" if method == TUNED else method
        default = f"T={shared_default('temperature', wrapped):g}"
        labels = ["T=1"] + ([pick] if pick and pick != "T=1" else [])
        for i, label in enumerate(labels):
            setting = readme_setting(label)
            if notes:
                tags = (["paper"] if label == "T=1" else []) + (["pick"] if label == pick else [])
                tags += ["**default**"] if label == default else []
                setting += f" ({', '.join(tags)})"
            row = cells.get((method, label), {})
            shown_cells = " | ".join(readme_cell(row, case) for case in cases)
            lines.append(f"| {README_METHOD[method] if i == 0 else ''} | {setting} | {shown_cells} |")
    return "\n".join(lines) + "\n"


def readme_tables(cells: dict, confirm: dict, decisions: dict) -> dict:
    """{marker name: table} for the README: seed 0 of the six cases, then every confirmation set run."""
    seed0 = [f"{family} {regime}" for family in ("MiniLM", "SmolLM2") for regime in README_REGIMES]
    sets = {c.removesuffix(" loss") for v in confirm.values() for c in v if " EM " not in c}
    order = {regime: i for i, regime in enumerate(README_REGIMES)}
    confirmed = sorted(sets, key=lambda c: (not c.startswith("MiniLM"), order[c.split()[1]], c))
    return {
        "picks": readme_table(cells, decisions, seed0, notes=True),
        "confirmation": readme_table(confirm, decisions, confirmed, notes=False),
    }


def rewrite_readme(text: str, tables: dict) -> str:
    """`text` with each marked table replaced; a marker with no table, or a table with no marker, is an error."""
    found = [m.group(2) for m in README_MARKER.finditer(text)]
    if sorted(found) != sorted(tables):
        raise SystemExit(f"README markers {found} do not match the tables {sorted(tables)}")
    return README_MARKER.sub(lambda m: m.group(1) + tables[m.group(2)] + m.group(3), text)


def read_cells(minilm: list[Path], smollm2: list[Path]) -> tuple[dict, list[str]]:
    """The cells of every results.json given, and the files they came from."""
    cells: dict = {}
    sources = []
    for paths, reader in ((minilm, minilm_cells), (smollm2, smollm2_cells)):
        for path in paths:
            for key, cases in reader(json.loads(path.read_text())).items():
                cells.setdefault(key, {}).update(cases)
            sources.append(str(path.relative_to(HERE)) if path.is_relative_to(HERE) else str(path))
    return cells, sources


def committed(folder: Path) -> list[Path]:
    """The results.json of every candidate run under `folder` (itself, or one sub-folder per run)."""
    return sorted(folder.glob("results.json")) + sorted(folder.glob("*/results.json"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minilm", type=Path, nargs="*", default=committed(HERE / "quality" / "results" / "candidates"))
    ap.add_argument(
        "--smollm2", type=Path, nargs="*", default=committed(HERE / "quality_llm" / "results" / "candidates")
    )
    ap.add_argument(
        "--confirm-minilm", type=Path, nargs="*", default=committed(HERE / "quality" / "results" / "confirmation")
    )
    ap.add_argument(
        "--confirm-smollm2", type=Path, nargs="*", default=committed(HERE / "quality_llm" / "results" / "confirmation")
    )
    ap.add_argument("--out", type=Path, default=HERE / "candidates.md")
    ap.add_argument("--readme", type=Path, help="rewrite this README's When NAN helps tables")
    ap.add_argument("--check", action="store_true", help="with --readme: exit 1 if its tables are not current")
    args = ap.parse_args(argv)
    cells, sources = read_cells(args.minilm, args.smollm2)
    decisions = decide(cells)
    confirm, confirm_sources = read_cells(args.confirm_minilm, args.confirm_smollm2)
    lines = [
        "# Weighting candidates: candidate − stock, every case (positive = candidate better)",
        "",
        f"Written by `python benchmarks/select_weighting.py` from {', '.join(sources) or 'no results'}. "
        "MiniLM: average accuracy, points; SmolLM2: macro held-out loss (nats/token, sign flipped) and arithmetic "
        "exact match (points). Paired 95% CIs. Rule: benchmarks/quality/results/expectations.md (2026-12-02).",
        "",
    ] + table(cells, decisions)
    if confirm:
        lines += confirmation(confirm, decisions) + [f"(from {', '.join(confirm_sources)})", ""]
    if args.readme:
        text = args.readme.read_text()
        new = rewrite_readme(text, readme_tables(cells, confirm, decisions))
        if args.check:
            if new != text:
                raise SystemExit(
                    f"{args.readme}: the When NAN helps tables are not current; "
                    f"run python benchmarks/select_weighting.py --readme {args.readme}"
                )
            return decisions
        args.readme.write_text(new)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return decisions


if __name__ == "__main__":
    main()

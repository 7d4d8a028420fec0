"""Apply the weighting-selection rule (benchmarks/quality/results/expectations.md, 2026-12-02) to the
candidate results of both quality benchmarks, and write the table it decides from.

    python select_weighting.py [--minilm quality/results/candidates/*/results.json]
                               [--smollm2 quality_llm/results/candidates/results.json] [--out candidates.md]
                               [--docs ../README.md ../docs/benchmarks.md [--check]]

The runs on the confirmation seeds (`results/confirmation/` of each benchmark) are shown after the pick, with
the same cells and the same "safe" test; they take no part in it.

With `--docs`, the marked tables of the given files are rewritten between their `<!-- select_weighting:NAME -->`
markers, in the docs' units (SmolLM2 loss not flipped: negative = better): `which` (the README's one row per
method), `picks` and `confirmation` (the paper's T=1 and each method's pick, seed 0 and the confirmation seeds) and
`verdicts` (every setting over every set, measurably worse and worse beyond the margin side by side), each marker
in exactly one of the files; `--check` only says whether they are current.

The margin (expectations.md, 2026-12-06): 1% of the stock merge's gain over the base model in that set and
measure; a measurably worse cell is *beyond the margin* when its CI's far end lies past it, else *a hair worse*.

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
MINILM_BASE_ROW = "pretrained (fine-tuned heads)"
MARGIN_SHARE = 0.01
HAIR_WORSE = "°"  # marks a cell that is measurably worse, its whole CI within the margin
TUNED = "task_arithmetic, λ from val"
ROW_NAME = re.compile(r"^nan_(\w+)(?: \[([^\]]+)\])?(?: (.*))?$")  # nan_<stock> [candidate] λ=...
SLERP = ["multislerp", "nuslerp"]
METHOD_ORDER = ["task_arithmetic", TUNED, "ties", "dare_ties", *SLERP]
# the rule's last tie-break: the paper's default, then the shrink weightings, then other temperatures
SIMPLICITY = ["T=1", "weighting=shrink_median", "weighting=shrink_geomean", "T=2", "T=0.5", "T=4"]


def margin(stock_gain: float) -> float:
    """The margin of a measure (expectations.md, 2026-12-06): 1% of the stock merge's gain over the base model,
    0 where stock gained nothing."""
    return MARGIN_SHARE * max(stock_gain, 0.0)


def beyond_margin(cell: tuple) -> bool:
    """Measurably worse, with the CI's far end past the margin (positive = better)."""
    _, lo, hi, m = cell
    return hi < 0 and lo < -m


def case_name(family: str, regime: str, seeds: list[int]) -> str:
    """A case is a family and regime on the picking seed 0; other seeds (the confirmation runs) are named, so two
    seeds of one regime stay two cases."""
    return f"{family} {regime}" + ("" if seeds == [0] else " seed " + ",".join(map(str, seeds)))


def minilm_cells(doc: dict) -> dict:
    """{(method, candidate): {case: (mean, lo, hi, margin) in accuracy points}} from MiniLM's results.json."""
    cells: dict = {}
    for regime, section in doc["regimes"].items():
        accuracy = {row["name"]: row["scores"]["avg"]["acc"] for row in section["main"] + section["ablation"]}
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
            gain = 100 * (accuracy[stock] - accuracy[MINILM_BASE_ROW])
            cells.setdefault((method, label), {})[case] = (*(100 * d[k] for k in ("mean", "lo", "hi")), margin(gain))
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
            tail = f" {tail}" if tail else ""
            if stock == "task_arithmetic":
                if tail == " λ=1":
                    method = "task_arithmetic"
                elif tail == " λ from val":
                    method = TUNED
                else:
                    continue
            else:
                method = stock
            base, stock_scores = section["rows"]["base"]["scores"], section["rows"][stock + tail]["scores"]
            loss = diff["loss_macro"]
            out = cells.setdefault((method, label), {})
            loss_gain = base["loss_macro"]["mean"] - stock_scores["loss_macro"]["mean"]
            out[f"{case} loss"] = (*(-loss[k] for k in ("mean", "hi", "lo")), margin(loss_gain))
            for domain, em in diff["exact_match"].items():
                em_gain = 100 * (stock_scores[domain]["exact_match"]["mean"] - base[domain]["exact_match"]["mean"])
                out[f"{case} EM {domain}"] = (*(100 * em[k] for k in ("mean", "lo", "hi")), margin(em_gain))
    return cells


def simplicity(label: str) -> int:
    """The rule's last tie-break, also the order rows are shown in (unknown labels last)."""
    return SIMPLICITY.index(label) if label in SIMPLICITY else len(SIMPLICITY)


def case_order(cells: dict) -> list[str]:
    return sorted({c for v in cells.values() for c in v}, key=lambda c: (not c.startswith("MiniLM"), c))


def interval(mean: float, lo: float, hi: float, digits: int = 2) -> str:
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def shown(row: dict, cases: list[str]) -> str:
    return " | ".join(interval(*row[c][:3]) if c in row else "" for c in cases)


def decide(cells: dict) -> dict:
    """Per method: each candidate's verdict and the pick (None: no candidate is safe)."""
    out = {}
    for method in METHOD_ORDER:
        candidates = {label: cases for (m, label), cases in cells.items() if m == method}
        verdicts = {}
        for label, cases in candidates.items():
            worse = [c for c, (_, lo, hi, _) in cases.items() if hi < 0]
            better = [c for c, (_, lo, hi, _) in cases.items() if lo > 0]
            beyond = [c for c in worse if beyond_margin(cases[c])]
            minilm = [v[0] for c, v in cases.items() if c.startswith("MiniLM")]
            verdicts[label] = {
                "safe": not worse,
                "worse_in": worse,
                "beyond_margin_in": beyond,
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
    "multislerp": "`multislerp` (with a base model)",
    "nuslerp": "`nuslerp` (with a base model; a pair)",
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

    def marked(text: str, cell: tuple) -> str:
        _, lo, hi, _ = cell
        if lo > 0:
            return f"**{text}**"
        if hi < 0:
            return f"*{text}*" if beyond_margin(cell) else f"*{text}*{HAIR_WORSE}"
        return text

    if case.startswith("MiniLM"):
        if case not in row:
            return ""
        mean, lo, hi, _ = row[case]
        return marked(interval(mean, lo, hi), row[case])
    if f"{case} loss" not in row:
        return ""
    mean, lo, hi, _ = row[f"{case} loss"]  # flipped: positive = lower loss
    loss = marked(interval(-mean, -hi, -lo, digits=3), row[f"{case} loss"])
    mean, lo, hi, _ = row[f"{case} EM arith"]
    return f"{loss}; EM {marked(interval(mean, lo, hi), row[f'{case} EM arith'])}"


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
        if not any(m == method for m, _ in cells):
            continue
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
    """{marker name: table} for the docs: seed 0 of the six cases, every confirmation set run, every setting over
    all of them, and the README's one row per method."""
    seed0 = [f"{family} {regime}" for family in ("MiniLM", "SmolLM2") for regime in README_REGIMES]
    confirmed = sets_of(c for v in confirm.values() for c in v)
    everything = {key: {**cells.get(key, {}), **confirm.get(key, {})} for key in {*cells, *confirm}}
    return {
        "picks": readme_table(cells, decisions, seed0, notes=True),
        "confirmation": readme_table(confirm, decisions, confirmed, notes=False),
        "verdicts": verdict_table(everything),
        "which": which_table(everything),
    }


def sets_of(cases) -> list[str]:
    """The fine-tune sets (case names without their SmolLM2 measure) that `cases` covers, in table order."""
    names = {re.sub(r" (loss|EM \w+)$", "", c) for c in cases}
    order = {regime: i for i, regime in enumerate(README_REGIMES)}
    return sorted(names, key=lambda c: (not c.startswith("MiniLM"), order[c.split()[1]], c))


def tally(cases: dict) -> dict:
    """Counts of one setting's measures over every set it ran in, under both verdicts."""
    worse = [c for c, (_, lo, hi, _) in cases.items() if hi < 0]
    beyond = [c for c in worse if beyond_margin(cases[c])]
    return {
        "sets": len(sets_of(cases)),
        "measures": len(cases),
        "better": sum(lo > 0 for _, lo, _, _ in cases.values()),
        "worse": len(worse),
        "beyond": beyond,
        "hair": [c for c in worse if c not in beyond],
    }


def verdict_table(everything: dict) -> str:
    """Every setting over every set run (seed 0 and confirmation), both verdicts side by side."""
    lines = [
        "| wrapped method | setting | sets | measures | measurably better | measurably worse (CI excludes 0) "
        "| worse beyond the margin | a hair worse (whole CI within the margin) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in METHOD_ORDER:
        labels = sorted((label for m, label in everything if m == method), key=simplicity)
        for i, label in enumerate(labels):
            cases = everything[(method, label)]
            t = tally(cases)
            lines.append(
                f"| {README_METHOD[method] if i == 0 else ''} | {readme_setting(label)} | {t['sets']} "
                f"| {t['measures']} | {t['better']} | {t['worse']} | {len(t['beyond'])}{where(t['beyond'], cases)} "
                f"| {len(t['hair'])}{where(t['hair'], cases)} |"
            )
    return "\n".join(lines) + "\n"


def where(cases: list[str], cells: dict) -> str:
    """` (set: difference, ...)` in the README's units, or nothing."""
    return f" ({', '.join(difference(c, cells[c]) for c in cases)})" if cases else ""


def difference(case: str, cell: tuple) -> str:
    """`MiniLM `epochs` seed 1: -0.40 points`; SmolLM2 loss in nats/token (negative = better), EM in points."""
    measure = re.search(r" (loss|EM \w+)$", case)
    title = readme_title(case.removesuffix(measure.group(0)) if measure else case)
    if measure and measure.group(1) == "loss":
        return f"{title}: {-cell[0]:+.3f} nats/token"
    unit = "EM points" if measure else "points"
    return f"{title}: {cell[0]:+.2f} {unit}"


# The README's "which method" table: per benchmarked method, the plugin method, the measure of its default
# setting over every set run, and when to keep the stock method.
UNBENCHMARKED = ["dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]
README_ADVICE = {
    "task_arithmetic": (
        "`nan_task_arithmetic`",
        "your longest fine-tune is also the one trained on the most data: NAN takes weight from it "
        "(`inspect` shows its `x weight` well below 1)",
    ),
    TUNED: ("`nan_task_arithmetic`, same λ tuning", "the same"),
    "ties": ("`nan_ties`", "no case found; with delta norms within ~20% of each other it changes little"),
    "dare_ties": ("`nan_dare_ties`", "as for task arithmetic"),
    "multislerp": (
        "not recommended (`nan_multislerp`)",
        "always, on both seeds: multislerp already gives every model an equal say in the direction, and NAN's "
        "weights shrink the merge further (stock `multislerp` cannot merge the MiniLM fine-tunes: a frozen tensor)",
    ),
    "nuslerp": (
        "not recommended by the rule (`nan_nuslerp`)",
        "by the rule (no setting safe); `temperature: 4` was better in 9 of 18 measures over both seeds, never "
        "worse beyond the margin, a hair worse in 2 (SmolLM2 `steps`, both seeds, at most +0.003 nats/token): the "
        "setting to try",
    ),
}


def which_table(everything: dict) -> str:
    """One row per benchmarked wrapped method: its NAN default measured over every set, both verdicts."""
    lines = [
        "| you merge with | switch to | default | measured over every benchmark set run (candidate − stock) "
        "| keep the stock method when |",
        "|---|---|---|---|---|",
    ]
    for method in METHOD_ORDER:
        wrapped = "task_arithmetic" if method == TUNED else method
        default = f"T={shared_default('temperature', wrapped):g}"
        if (method, default) not in everything:
            continue
        cases = everything[(method, default)]
        t = tally(cases)
        beyond = (
            f"worse beyond the margin in {len(t['beyond'])}{where(t['beyond'], cases)}"
            if t["beyond"]
            else "never worse beyond the margin"
        )
        hair = f", a hair worse in {len(t['hair'])}" if t["hair"] else ""
        measured = f"{t['sets']} sets, {t['measures']} measures: better in {t['better']}, {beyond}{hair}"
        switch, keep = README_ADVICE[method]
        lines.append(f"| {README_METHOD[method]} | {switch} | {readme_setting(default)} | {measured} | {keep} |")
    unmeasured = ", ".join(f"`{m}`" for m in UNBENCHMARKED)
    lines.append(
        f"| {unmeasured} | `nan_` + the same name | `temperature: 1` | not benchmarked | "
        "not known: read `inspect` first |"
    )
    unmeasured_slerp = [m for m in SLERP if (m, "T=1") not in everything]
    if unmeasured_slerp:
        lines.append(
            f"| {', '.join(f'`{m}`' for m in unmeasured_slerp)} (with a base model) | "
            f"{', '.join(f'`nan_{m}`' for m in unmeasured_slerp)} | `temperature: 1` | not benchmarked; "
            "`base_model:` required, `nan_nuslerp` takes exactly two models | not known: read `inspect` first |"
        )
    lines.append(
        "| `linear` (no base model) | `nan_linear` | `temperature: 1` | not benchmarked; weighs each model by the "
        "inverse norm of its own weights, which are nearly equal, so it stays close to the config's weights | — |"
    )
    return "\n".join(lines) + "\n"


def rewrite_docs(texts: dict, tables: dict) -> dict:
    """{path: text} with each marked table replaced; a marker with no table, a table marked twice or a table
    with no marker in any of the files is an error."""
    found = [m.group(2) for text in texts.values() for m in README_MARKER.finditer(text)]
    if sorted(found) != sorted(tables):
        raise SystemExit(f"markers {found} in {', '.join(map(str, texts))} do not match the tables {sorted(tables)}")
    return {
        path: README_MARKER.sub(lambda m: m.group(1) + tables[m.group(2)] + m.group(3), text)
        for path, text in texts.items()
    }


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
    ap.add_argument("--docs", type=Path, nargs="*", help="rewrite the marked tables in these files")
    ap.add_argument("--check", action="store_true", help="with --docs: exit 1 if their tables are not current")
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
    if args.docs:
        texts = {path: path.read_text() for path in args.docs}
        new = rewrite_docs(texts, readme_tables(cells, confirm, decisions))
        if args.check:
            stale = [str(path) for path in texts if new[path] != texts[path]]
            if stale:
                raise SystemExit(
                    f"{', '.join(stale)}: the benchmark tables are not current; run "
                    f"python benchmarks/select_weighting.py --docs {' '.join(map(str, args.docs))}"
                )
            return decisions
        for path, text in new.items():
            path.write_text(text)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return decisions


if __name__ == "__main__":
    main()

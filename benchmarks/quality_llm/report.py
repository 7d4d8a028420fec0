"""results.md, results.json and scores.pt from run.py's units.

    python run.py --report-only    # (report.py is a module of run.py)

Seeds are pooled the way benchmarks/quality does it: a row's per-example values
(loss, exact match) are averaged over the fine-tuning seeds first, then NAN minus
stock is a paired difference on the same held-out examples with a 95% CI over
examples; each seed's own difference is shown beside it. The loss difference is a
macro average over the three domains (each domain's mean weighted equally).
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from evaluate import macro_ci, mean_ci

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared benchmark helpers
from rank_correlation import spearman

VAL_PICK = "λ from val"


def macro_val(row, order):
    return sum(row["val"][d]["loss"].mean().item() for d in order) / len(order)


def add_val_picks(unit):
    """Virtual rows: task_arithmetic and each NAN version (candidate) at the lambda with the
    lowest macro-average validation loss, each picked on its own grid."""
    rows, order = unit["rows"], unit["order"]
    grids = {}
    for n, r in list(rows.items()):
        if r.get("method") in ("task_arithmetic", "nan_task_arithmetic") and r.get("grid"):
            grids.setdefault(n.rsplit(" λ=", 1)[0], []).append((n, r))
    for prefix, grid in grids.items():
        name, best = min(grid, key=lambda nr: (macro_val(nr[1], order), nr[1]["lambda"]))
        nan = prefix.startswith("nan_")
        rows[f"{prefix} {VAL_PICK}"] = dict(
            best, picked_from=name, virtual=True, stock="task_arithmetic" if nan else None
        )
    fts = [r for n, r in rows.items() if n.startswith("fine-tune ")]
    if fts:
        own = {}
        for r in fts:
            own[r["domain"]] = r["test"][r["domain"]]
        rows["fine-tunes, each on its own domain"] = {"kind": "reference", "test": own, "virtual": True}


def stock_of(name: str) -> str:
    """The stock row a NAN row is compared with: `nan_ties [weighting=x]` -> `ties`."""
    return re.sub(r" \[[^\]]*\]", "", name.removeprefix("nan_"))


def seed_mean(units, name, domain, key):
    vals = [u["rows"][name]["test"][domain][key].double() for u in units]
    return torch.stack(vals).mean(0)


def regime_rows(units):
    """Row names present in every seed's unit, in run order."""
    names = list(units[0]["rows"])
    return [n for n in names if all(n in u["rows"] for u in units)]


def diff(units, a, b, order):
    loss_parts = [seed_mean(units, a, d, "loss") - seed_mean(units, b, d, "loss") for d in order]
    out = {
        "loss_macro": macro_ci(loss_parts),
        "loss_per_domain": {d: mean_ci(p) for d, p in zip(order, loss_parts)},
        "loss_macro_per_seed": [
            sum((u["rows"][a]["test"][d]["loss"] - u["rows"][b]["test"][d]["loss"]).mean().item() for d in order)
            / len(order)
            for u in units
        ],
    }
    em = [d for d in order if "hit" in units[0]["rows"][a]["test"][d]]
    out["exact_match"] = {d: mean_ci(seed_mean(units, a, d, "hit") - seed_mean(units, b, d, "hit")) for d in em}
    out["exact_match_per_seed"] = {
        d: [
            (u["rows"][a]["test"][d]["hit"].double() - u["rows"][b]["test"][d]["hit"].double()).mean().item()
            for u in units
        ]
        for d in em
    }
    return out


def row_scores(units, name, order):
    s = {}
    for d in order:
        if d not in units[0]["rows"][name]["test"]:
            continue
        s[d] = {"loss": mean_ci(seed_mean(units, name, d, "loss"))}
        if "hit" in units[0]["rows"][name]["test"][d]:
            s[d]["exact_match"] = mean_ci(seed_mean(units, name, d, "hit"))
    if all(d in s for d in order):
        s["loss_macro"] = macro_ci([seed_mean(units, name, d, "loss") for d in order])
        s["loss_macro_per_seed"] = [
            sum(u["rows"][name]["test"][d]["loss"].mean().item() for d in order) / len(order) for u in units
        ]
    return s


def premise(units, order):
    out = []
    for u in units:
        nan_rows = [  # rows that weighed every fine-tune (not a pair's)
            (n, r)
            for n, r in u["rows"].items()
            if r.get("coefficients") and not r.get("virtual") and set(r["coefficients"]["models"]) == set(order)
        ]
        if not nan_rows:
            continue
        ref_name, ref = next(((n, r) for n, r in nan_rows if n == "nan_task_arithmetic λ=1"), nan_rows[0])
        coef = ref["coefficients"]["mean_coefficient"]
        spread = max(abs(r["coefficients"]["mean_coefficient"][d] - coef[d]) for _, r in nan_rows for d in order)
        ft = u["fine_tunes"]
        sizes = [ft[d]["n_train"] for d in order]
        tensors = [t for t in ref["coefficients"]["tensor_coefficients"] if all(c is not None for c in t)]
        per_tensor = [spearman(t, sizes) for t in tensors]
        out.append(
            {
                "regime": u["regime"],
                "seed": u["seed"],
                "from_row": ref_name,
                "domains": {
                    d: {
                        "n_train": ft[d]["n_train"],
                        "train_tokens": ft[d]["train_tokens"],
                        "steps": ft[d]["steps"],
                        "epochs": ft[d]["epochs"],
                        "lr": ft[d]["lr"],
                        "delta_norm": ft[d]["delta_norm"],
                        "mean_coefficient": coef[d],
                        "min_coefficient": ref["coefficients"]["min_coefficient"][d],
                        "max_coefficient": ref["coefficients"]["max_coefficient"][d],
                        "key": ft[d]["key"],
                    }
                    for d in order
                },
                "spearman_coef_vs_data": spearman([coef[d] for d in order], sizes),
                "spearman_coef_vs_tokens": spearman([coef[d] for d in order], [ft[d]["train_tokens"] for d in order]),
                "spearman_norm_vs_data": spearman([ft[d]["delta_norm"] for d in order], sizes),
                "per_tensor_spearman_mean": statistics.mean(per_tensor) if per_tensor else None,
                "per_tensor_share_positive": (sum(s > 0 for s in per_tensor) / len(per_tensor) if per_tensor else None),
                "coefficients_max_spread_across_nan_rows": spread,
            }
        )
    return out


def _f(x, nd=4):
    return f"{x:.{nd}f}"


def _ci(c, scale=1.0, nd=4, sign=True):
    fmt = f"{{:{'+' if sign else ''}.{nd}f}}"
    return f"{fmt.format(scale * c['mean'])} [{fmt.format(scale * c['lo'])}, {fmt.format(scale * c['hi'])}]"


def write_report(units, out: Path, timing: dict, recipe: dict, merge_settings: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not units:
        print("no units to report")
        return
    for u in units:
        add_val_picks(u)
    order = units[0]["order"]
    regimes = list(dict.fromkeys(u["regime"] for u in units))
    by_regime = {r: sorted([u for u in units if u["regime"] == r], key=lambda u: u["seed"]) for r in regimes}
    seeds = sorted({u["seed"] for u in units})
    em_dom = [d for d in order if "hit" in units[0]["rows"]["base"]["test"][d]]

    results = {
        "generated": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.machine(),
        "order": order,
        "recipe": recipe,
        "merge_settings": merge_settings,
        "timing": timing,
        "regimes": {},
    }
    for regime, us in by_regime.items():
        names = regime_rows(us)
        rows = {
            n: {
                "scores": row_scores(us, n, order),
                "info": [
                    {k: v for k, v in u["rows"][n].items() if k not in ("test", "val", "coefficients")} for u in us
                ],
            }
            for n in names
        }
        for n in names:
            r0 = us[0]["rows"][n]
            if r0.get("method", "").startswith("nan_") or (r0.get("stock") and "nan_" in n):
                stock = stock_of(n)
                if stock in names:
                    rows[n]["nan_minus_stock"] = diff(us, n, stock, order)
            if r0.get("val") is not None and r0.get("grid"):
                rows[n]["val_loss_macro_per_seed"] = [macro_val(u["rows"][n], order) for u in us]
        results["regimes"][regime] = {
            "seeds": [u["seed"] for u in us],
            "rows": rows,
            "unit_seconds": [u.get("seconds") for u in us],
            "premise": premise(us, order),
            "fine_tunes": [u["fine_tunes"] for u in us],
        }

    L = ["# Merge quality on a causal LM: SmolLM2-135M, three domains, three training regimes", ""]
    if timing.get("smoke"):
        L += ["**SMOKE RUN: a tiny random LLaMA, a few steps; the numbers mean nothing.**", ""]
    L += [
        f"Generated {results['generated']}; seeds {', '.join(map(str, seeds))}. "
        "Held-out loss: mean NLL (nats/token) over each example's target tokens; "
        f"exact match on `{', '.join(em_dom)}` (teacher-forced argmax of every answer token "
        "= greedy decoding). NAN rows: T=1, tensor granularity, same weights, density, lambda "
        "and DARE seed as the stock row. Differences are NAN minus stock, paired on the same "
        "held-out examples, per-example values averaged over seeds first, 95% CI over examples; "
        "loss is the macro average over the domains (negative = NAN better); exact match in "
        "points (positive = NAN better). See README.md for the settings.",
        "",
        "## Summary: NAN minus stock",
        "",
        "| regime | method | Δ loss, macro avg [95% CI] | per seed | "
        + " | ".join(f"Δ exact match {d} (points) [95% CI] | per seed" for d in em_dom)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(em_dom),
    ]
    summary_methods = []
    for label in merge_settings.get("candidates", [""]):
        c = f" [{label}]" if label else ""
        summary_methods += (
            [f"nan_task_arithmetic{c} {VAL_PICK}"]
            + [f"nan_task_arithmetic{c} λ={lam:g}" for lam in merge_settings["grid"]]
            + [f"nan_ties{c}", f"nan_dare_ties{c}"]
        )
    for regime in regimes:
        rows = results["regimes"][regime]["rows"]
        for n in summary_methods:
            if n not in rows or "nan_minus_stock" not in rows[n]:
                continue
            dd = rows[n]["nan_minus_stock"]
            cells = [f"{_ci(dd['loss_macro'])}", " / ".join(f"{x:+.4f}" for x in dd["loss_macro_per_seed"])]
            for d in em_dom:
                cells += [
                    _ci(dd["exact_match"][d], 100, 1),
                    " / ".join(f"{100 * x:+.1f}" for x in dd["exact_match_per_seed"][d]),
                ]
            label = n.replace("nan_", "", 1)
            if n.endswith(VAL_PICK):
                lam = [(i.get("lambda"), j.get("lambda")) for i, j in zip(rows[n]["info"], rows[stock_of(n)]["info"])]
                label += " (λ NAN/stock: " + ", ".join(f"{a:g}/{b:g}" for a, b in lam) + ")"
            L.append(f"| {regime} | {label} | " + " | ".join(cells) + " |")

    L += [
        "",
        "## Premise check: does NAN give the larger data set the larger coefficient?",
        "",
        "Per regime and seed: each fine-tune's training data, its delta norm ‖θ_ft − θ_base‖_F "
        "over all tensors, and NAN's mean coefficient over the merge's tensors (from "
        "`nan_coefficients.json`; the same for every `nan_` row of a unit up to the spread "
        "shown). Spearman ρ between mean coefficient and training examples: positive = the "
        "paper's premise (more data, smaller delta, larger weight) holds; with three models ρ "
        "is one of ±0.5, ±1. Per tensor: mean ρ over tensors and the share of tensors with "
        "ρ > 0.",
        "",
        "| regime | seed | "
        + " | ".join(f"{d}: examples / tokens / steps / epochs / lr / ‖Δ‖ / coef" for d in order)
        + " | ρ(coef, examples) | ρ(‖Δ‖, examples) | per-tensor ρ mean (share > 0) |",
        "|---|---|" + "---|" * len(order) + "---|---|---|",
    ]
    for regime in regimes:
        for p in results["regimes"][regime]["premise"]:
            cells = []
            for d in order:
                x = p["domains"][d]
                cells.append(
                    f"{x['n_train']} / {x['train_tokens']} / {x['steps']} / "
                    f"{x['epochs']:.2f} / {x['lr']:g} / {x['delta_norm']:.3f} / "
                    f"{x['mean_coefficient']:.3f}"
                )
            L.append(
                f"| {regime} | {p['seed']} | "
                + " | ".join(cells)
                + f" | {p['spearman_coef_vs_data']:+.2f} | {p['spearman_norm_vs_data']:+.2f}"
                + f" | {p['per_tensor_spearman_mean']:+.2f} "
                f"({100 * p['per_tensor_share_positive']:.0f}%) |"
            )

    for regime in regimes:
        rg = results["regimes"][regime]
        rows = rg["rows"]
        L += [
            "",
            f"## Regime `{regime}`: every row (test; mean over seeds {rg['seeds']})",
            "",
            "Loss per domain (nats/token) with the macro average and its 95% CI; exact match in %; "
            "for grid rows the macro validation loss per seed (what picks λ). "
            "NAN − stock: macro loss difference, then exact-match difference (points).",
            "",
            "| row | "
            + " | ".join(f"{d} loss" for d in order)
            + " | avg loss [95% CI] | "
            + " | ".join(f"{d} EM %" for d in em_dom)
            + " | val avg loss (per seed) | NAN − stock: loss | NAN − stock: EM |",
            "|---|" + "---|" * len(order) + "---|" + "---|" * len(em_dom) + "---|---|---|",
        ]
        for n, r in rows.items():
            s = r["scores"]
            cells = [_f(s[d]["loss"]["mean"]) if d in s else "" for d in order]
            cells.append(_ci(s["loss_macro"], sign=False) if "loss_macro" in s else "")
            cells += [f"{100 * s[d]['exact_match']['mean']:.1f}" if d in s else "" for d in em_dom]
            cells.append(
                " / ".join(_f(v) for v in r["val_loss_macro_per_seed"]) if "val_loss_macro_per_seed" in r else ""
            )
            dd = r.get("nan_minus_stock")
            cells.append(_ci(dd["loss_macro"]) if dd else "")
            cells.append(" ".join(_ci(dd["exact_match"][d], 100, 1) for d in em_dom) if dd else "")
            L.append(f"| {n} | " + " | ".join(cells) + " |")
        L += ["", "Per-domain NAN − stock loss differences [95% CI]:", ""]
        for n, r in rows.items():
            if r.get("nan_minus_stock"):
                L.append(
                    f"- {n}: " + "; ".join(f"{d} {_ci(c)}" for d, c in r["nan_minus_stock"]["loss_per_domain"].items())
                )

    L += [
        "",
        "## Fine-tunes",
        "",
        "| key | regime(s) | steps | epochs | lr | ‖Δ‖_F | final train loss (mean of last 8 steps) "
        "| train s | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    seen = {}
    for regime in regimes:
        for fts in results["regimes"][regime]["fine_tunes"]:
            for d in order:
                m = fts[d]
                seen.setdefault(m["key"], (m, []))[1].append(regime)
    for key, (m, regs) in seen.items():
        L.append(
            f"| {key} | {', '.join(dict.fromkeys(regs))} | {m['steps']} | {m['epochs']:.2f} | "
            f"{m['lr']:g} | {m['delta_norm']:.3f} | {m['final_loss_mean8']:.3f} | "
            f"{m['train_seconds']:.0f} | {m['seconds_per_step']:.2f} |"
        )

    merges = [r for u in units for r in u["rows"].values() if "merge_seconds" in r and not r.get("virtual")]
    L += ["", "## Timing", ""]
    for regime in regimes:
        rg = results["regimes"][regime]
        L.append(
            f"- {regime}: unit wall time per seed (merges + scoring, s): "
            + ", ".join(f"{s:.0f}" if s else "?" for s in rg["unit_seconds"])
        )
    if merges:
        by = {}
        for r in merges:
            by.setdefault(r["method"], []).append(r)
        for m, rs in by.items():
            L.append(
                f"- {m}: mergekit-yaml {statistics.mean(r['merge_seconds'] for r in rs):.1f} s, "
                f"scoring {statistics.mean(r['eval_seconds'] for r in rs):.1f} s "
                f"(mean of {len(rs)})"
            )
    L.append(f"- this call: {timing.get('this_call_seconds', 0):.0f} s at {timing.get('threads')} thread(s)")
    (out / "results.md").write_text("\n".join(L) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    torch.save(
        {
            f"{u['regime']}-seed{u['seed']}": {
                n: {"test": r["test"], "val": r.get("val")} for n, r in u["rows"].items() if not r.get("virtual")
            }
            for u in units
        },
        out / "scores.pt",
    )

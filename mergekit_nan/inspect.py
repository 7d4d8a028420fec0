"""`mergekit-nan inspect`: the coefficients a merge would use, without writing a model.

Runs mergekit's own planner and executor over the config (so lazy loading,
--lora-merge-cache, --device/--cuda and the progress bar are mergekit's), with the
NAN methods in a dry mode: every tensor's norms and coefficients are computed by the
same code as in a real merge and recorded, and the wrapped merge is skipped. The
numbers are therefore the merge's, to the last bit, at the memory cost of a few
tensors.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from mergekit_nan.adapters import generation
from mergekit_nan.adapters.lifecycle import (
    cache_use,
    check_merge_config,
    config_model_order,
    inputs_as_stored,
    nan_method,
    norm_cache_kept,
    open_norm_cache,
)
from mergekit_nan.adapters.mergekit_io import adapters_on_base, run_tensor_tasks
from mergekit_nan.core import record
from mergekit_nan.core.parameters import NanConfigError
from mergekit_nan.core.session import MergeSession, opened
from mergekit_nan.core.shares import SETTINGS, reading, report

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class Inspection:
    """What `inspect` found: the coefficient record, and what the weights do to the merge
    (`core.shares.report`, stock weights against NAN's; None for a method outside the
    task-arithmetic family). `stock_config`: the config named the stock method."""

    document: Dict[str, Any]
    shares: Optional[Dict[str, Any]]
    stock_method: str
    nan_method: str
    stock_config: bool


def inspect_merge(merge_config, options, per_tensor: bool = False, shares: bool = True) -> Inspection:
    """Inspect a config of a nan_* method, or of a stock method NAN wraps (inspected as its
    nan_ version). Fails where the merge would: the same config check, the same planning,
    the same per-tensor NAN code (only the wrapped arithmetic is skipped)."""
    stock_config = nan_method(merge_config) is None
    if stock_config:
        wrapped = f"nan_{merge_config.merge_method}"
        if wrapped not in generation().registered_names():
            raise NanConfigError(
                f"inspect needs a nan_* merge method or a stock method that one wraps, not "
                f"{merge_config.merge_method!r}"
            )
        merge_config = merge_config.model_copy(update={"merge_method": wrapped})
    check_merge_config(merge_config)
    from mergekit.io.tasks import LoaderCache

    LoaderCache().setup(options=options)
    session = MergeSession(
        dry_run=True,
        adapters=adapters_on_base(merge_config),  # before planning touches any loader
        model_order=config_model_order(merge_config),
        measure_shares=shares,
        norm_cache=open_norm_cache(),
        inputs_as_stored=inputs_as_stored(merge_config),
    )
    with opened(session), norm_cache_kept(session):
        run_tensor_tasks(merge_config, options)
    document = record.to_json(session.records, norm_cache=cache_use(session))
    measured = report(session.shares, document["models"], layer_of, per_tensor) if session.shares else None
    return Inspection(
        document=document,
        shares=measured,
        stock_method=merge_config.merge_method.removeprefix("nan_"),
        nan_method=merge_config.merge_method,
        stock_config=stock_config,
    )


def inspect_config(merge_config, options) -> Dict[str, Any]:
    """The coefficient record (as in nan_coefficients.json) a merge of `merge_config` would write."""
    return inspect_merge(merge_config, options).document


def layer_of(name: str) -> str:
    """The transformer block a tensor belongs to ('12'), or 'other' (embeddings, final norm)."""
    match = _LAYER.search(name)
    return match.group(1) if match else "other"


def kind_of(name: str) -> str:
    """The tensor's type within its block: 'self_attn.q_proj.weight', 'embed_tokens.weight'."""
    match = _LAYER.search(name)
    return name[match.end() :] if match else name.split(".", 1)[-1] if name.count(".") > 1 else name


def rows(document: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per tensor and model: the CSV's content."""
    out = []
    for tensor in document["tensors"]:
        for index, model in enumerate(document["models"]):
            if tensor["norms"][index] is None:
                continue
            out.append(
                {
                    "name": tensor["name"],
                    "layer": layer_of(tensor["name"]),
                    "model": model,
                    "norm": tensor["norms"][index],
                    "coefficient": tensor["coefficients"][index],
                    "weight": tensor["weights"][index],
                }
            )
    return out


def _mean_by(table: List[Dict[str, Any]], key: str) -> Dict[str, Dict[str, float]]:
    sums: Dict[str, Dict[str, List[float]]] = {}
    for row in table:
        sums.setdefault(row[key], {}).setdefault(row["model"], []).append(row["coefficient"])
    return {k: {m: sum(v) / len(v) for m, v in by_model.items()} for k, by_model in sums.items()}


def short_names(models: List[str]) -> Dict[str, str]:
    """Each model's shortest distinct trailing path part: /a/b/ft-math -> ft-math."""
    parts = {m: m.replace("\\", "/").rstrip("/").split("/") for m in models}
    for depth in range(1, max((len(p) for p in parts.values()), default=1) + 1):
        names = {m: "/".join(p[-depth:]) for m, p in parts.items()}
        if len(set(names.values())) == len(models):
            return names
    return {m: m for m in models}


def _layer_order(key: str):
    return (not key.isdigit(), int(key) if key.isdigit() else 0, key)


def summary_text(document: Dict[str, Any]) -> str:
    """Compact tables for a terminal: per model, then per layer and per tensor type, and
    the hints (NAN close to uniform, or mostly dropping a model)."""
    models = document["models"]
    lines = [
        f"{document['merge_method']} over {len(document['tensors'])} tensors, parameters {document['parameters']}",
        "",
    ]
    if "norm_cache" in document:
        use = document["norm_cache"]
        lines[1:1] = [
            f"layer/model norms: {use['read']} read from the norm cache, {use['added']} computed and added to it"
        ]
    if not models:
        lines.append(
            "No model other than the base takes part: there is nothing to weigh, and the merge "
            "writes the base model's tensors."
        )
        return "\n".join(lines)
    short = short_names(models)
    width = max(5, *(len(n) for n in short.values()))
    lines.append(
        f"{'model':<{width}} {'rel. norm':>9} {'mean coef':>9} {'min':>6} {'max':>6} {'x weight':>8} {'mean norm':>10}  path"
    )
    for row in record.model_summary(document):
        lines.append(
            f"{short[row['model']]:<{width}} {row['relative_norm']:>9.2f} {row['mean_coefficient']:>9.3f}"
            f" {row['min_coefficient']:>6.3f} {row['max_coefficient']:>6.3f} {row['weight_factor']:>8.3f}"
            f" {row['mean_norm']:>10.4g}  {row['model']}"
        )
    lines.append(
        "(rel. norm: the model's delta norm over the geometric mean of all models', median over tensors;"
        " x weight: the factor NAN applies to its configured `weight`, mean over the tensors it changes)"
    )
    table = rows(document)
    for row in table:
        row["kind"] = kind_of(row["name"])
    column = max(8, *(len(n) for n in short.values()))
    for key, title in (("layer", "layer"), ("kind", "tensor type")):
        means = _mean_by(table, key)
        order = sorted(means, key=_layer_order)
        label = max([len(title)] + [len(k) for k in order])
        lines += [
            "",
            f"mean coefficient per {title}:",
            f"{title:>{label}} " + " ".join(f"{short[m]:>{column}}" for m in models),
        ]
        for k in order:
            lines.append(
                f"{k:>{label}} "
                + " ".join(f"{means[k][m]:>{column}.3f}" if m in means[k] else f"{'-':>{column}}" for m in models)
            )
    found = record.hints(document)
    if found:
        lines += [""] + [f"note: {hint}" for hint in found]
    return "\n".join(lines)


def write_outputs(inspection: Inspection, out_dir: str) -> List[str]:
    """coefficients.json, coefficients.csv and, with matplotlib, coefficients.png; for the
    task-arithmetic family also shares.json, shares.csv and shares.png."""
    os.makedirs(out_dir, exist_ok=True)
    document = inspection.document
    written = []
    written.append(record.write(document, os.path.join(out_dir, "coefficients.json")))
    path = os.path.join(out_dir, "coefficients.csv")
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "layer", "model", "norm", "coefficient", "weight"])
        writer.writeheader()
        writer.writerows(rows(document))
    written.append(path)
    heatmap = write_heatmap(document, os.path.join(out_dir, "coefficients.png"))
    if heatmap:
        written.append(heatmap)
    for stale in ("shares.json", "shares.csv", "shares.png"):  # an earlier inspect's, of another config
        path = os.path.join(out_dir, stale)
        if os.path.exists(path):
            os.remove(path)
    if inspection.shares:
        path = os.path.join(out_dir, "shares.json")
        content = dict(inspection.shares, stock_method=inspection.stock_method, nan_method=inspection.nan_method)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=1, allow_nan=False)
            handle.write("\n")
        written.append(path)
        path = os.path.join(out_dir, "shares.csv")
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=SHARE_COLUMNS)
            writer.writeheader()
            writer.writerows(share_rows(inspection.shares))
        written.append(path)
        plot = write_share_plot(inspection, os.path.join(out_dir, "shares.png"))
        if plot:
            written.append(plot)
    return written


def _print_values(ax, grid, norm) -> None:
    """Each cell's value in it (the callers do this while the cells are large enough)."""
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            if value == value:  # not NaN
                dark = abs(float(norm(value)) - 0.5) > 0.3  # white text on the deep colours
                colour = "white" if dark else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color=colour)


def write_heatmap(document: Dict[str, Any], path: str) -> Optional[str]:
    """One panel per tensor type (layers down, models across) plus one for the tensors
    outside the layers (embeddings, final norm, head); each cell is the mean coefficient,
    coloured against an equal share 1/K (white) on a scale fitted to the data. None (with
    a hint) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
    except ImportError:
        # mergekit-nan is not on the package index, so `pip install mergekit-nan[plot]` would fail
        print(
            "hint: for a heatmap of the coefficients, pip install matplotlib"
            ' (or pip install ".[plot]" from a checkout of mergekit-nan)'
        )
        return None
    models = document["models"]
    table = rows(document)
    if not models or not table:
        return None
    short = short_names(models)
    panels: Dict[str, Dict[str, Dict[str, float]]] = {}  # panel -> row label -> model -> mean
    for row in table:
        inside = row["layer"] != "other"
        panel = kind_of(row["name"]) if inside else "outside the layers"
        label = row["layer"] if inside else row["name"]
        panels.setdefault(panel, {}).setdefault(label, {}).setdefault(row["model"], []).append(row["coefficient"])
    equal = 1.0 / len(models)
    values = [row["coefficient"] for row in table]
    spread = max(abs(v - equal) for v in values) or equal
    norm = TwoSlopeNorm(vcenter=equal, vmin=max(0.0, equal - spread), vmax=min(1.0, equal + spread))
    if norm.vmin >= equal:
        norm.vmin = equal / 2
    names = sorted(panels, key=lambda k: (k == "outside the layers", k))
    tallest = max(len(panels[n]) for n in names)
    columns = min(4, len(names))
    panel_rows = -(-len(names) // columns)
    cell_height = 0.22 if tallest <= 40 else 0.11
    figure, axes = plt.subplots(
        panel_rows,
        columns,
        squeeze=False,
        layout="constrained",
        figsize=(columns * (0.75 * len(models) + 2.2) + 1.2, panel_rows * (cell_height * tallest + 1.6)),
    )
    image = None
    for ax, name in zip(axes.flat, names):
        labels = sorted(panels[name], key=_layer_order)
        grid = [[float("nan")] * len(models) for _ in labels]
        for i, label in enumerate(labels):
            for j, model in enumerate(models):
                found = panels[name][label].get(model)
                if found:
                    grid[i][j] = sum(found) / len(found)
        image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(models)), [short[m] for m in models], fontsize=7, rotation=30, ha="right")
        step = 1 if len(labels) <= 40 else max(1, len(labels) // 20)
        ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=6 if name == "outside the layers" else 7)
        if name != "outside the layers":
            ax.set_ylabel("layer", fontsize=7)
        if len(labels) <= 40 and len(models) <= 10:
            _print_values(ax, grid, norm)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label=f"NAN coefficient (white: equal share 1/{len(models)})")
    figure.suptitle(f"{document['merge_method']}: mean NAN coefficient per tensor type and layer", fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def shares_text(inspection: Inspection) -> str:
    """What the weights do, per model: the shares under the stock weights and NAN's, the
    readings in words, and the pairwise cosine of the task vectors."""
    shares = inspection.shares
    if not shares:
        return ""
    whole, models = shares["whole_model"], shares["models"]
    short = short_names(models)
    width = max(5, *(len(n) for n in short.values()))
    stock, nan = inspection.stock_method, inspection.nan_method
    sampled = f", {whole['sampled_tensors']} of them sampled" if whole["sampled_tensors"] else ""
    lines = [
        "",
        f"what the weights do to the merge, {stock} (the config's weights) against {nan} "
        f"(over {whole['tensors']} tensors{sampled}):",
        f"{'model':<{width}} {'delta share':>18} {'sign election':>18}",
    ]

    def pair(key, model):
        figures = [whole[setting][model][key] for setting in SETTINGS]
        if any(f is None or f["value"] is None for f in figures):
            return f"{'-':>18}"
        return f"{100 * figures[0]['value']:>7.1f}% -> {100 * figures[1]['value']:>5.1f}%"

    for model in models:
        lines.append(f"{short[model]:<{width}} {pair('delta_share', model)} {pair('sign_election_share', model)}")
    lines.append("")
    for model in models:
        said = reading(whole, model, stock, nan)
        if said:
            lines.append(f"{short[model]}: {said}")
    if whole["estimated"]:
        lines.append(
            f"({stock} draws a random mask: its shares are estimated with a mask of inspect's own, not the merge's)"
        )
    if whole["sampled_tensors"]:
        lines.append("(± : 95% interval from the sampled coordinates of large tensors)")
    lines += ["", "cosine of the task vectors:", " " * width + " " + " ".join(f"{short[m]:>{width}}" for m in models)]
    for a in models:
        cells = [whole["cosine"][a][b] for b in models]
        lines.append(
            f"{short[a]:<{width}} "
            + " ".join(f"{c:>{width}.3f}" if c is not None else f"{'-':>{width}}" for c in cells)
        )
    return "\n".join(lines)


SHARE_COLUMNS = [
    "scope",
    "key",
    "setting",
    "model",
    "delta_share",
    "delta_share_stderr",
    "sign_election_share",
    "sign_election_share_stderr",
]


def share_rows(shares: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per scope (whole model, layer, tensor), setting and model: the CSV's content."""
    scopes = [("model", "all", shares["whole_model"])]
    scopes += [("layer", k, v) for k, v in sorted(shares["layers"].items(), key=lambda kv: _layer_order(kv[0]))]
    scopes += [("tensor", k, v) for k, v in shares.get("tensors", {}).items()]
    out = []
    for scope, key, summary in scopes:
        for setting in SETTINGS:
            for model in shares["models"]:
                figures = summary[setting][model]
                row = {"scope": scope, "key": key, "setting": setting, "model": model}
                for name in ("delta_share", "sign_election_share"):
                    figure = figures[name] or {"value": None, "stderr": None}
                    row[name], row[f"{name}_stderr"] = figure["value"], figure["stderr"]
                out.append(row)
    return out


def write_share_plot(inspection: Inspection, path: str) -> Optional[str]:
    """Heatmaps in the coefficients' style: layers down, models across, one panel per figure
    (delta share; sign-election share where the method has an election) and weights (the
    config's, NAN's), coloured against an equal share (delta) or one half (election).
    None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
    except ImportError:
        return None  # write_heatmap has printed the hint
    shares, models = inspection.shares, inspection.shares["models"]
    layers = sorted(shares["layers"], key=_layer_order)
    has_election = shares["whole_model"]["stock"][models[0]]["sign_election_share"] is not None
    keys = [("delta_share", 1.0 / len(models))] + ([("sign_election_share", 0.5)] if has_election else [])
    short = short_names(models)
    cell_height = 0.22 if len(layers) <= 40 else 0.11
    figure, axes = plt.subplots(
        len(keys),
        2,
        squeeze=False,
        layout="constrained",
        figsize=(2 * (0.75 * len(models) + 2.2) + 1.5, len(keys) * (cell_height * len(layers) + 1.6)),
    )
    for row, (key, centre) in enumerate(keys):
        norm = TwoSlopeNorm(vcenter=centre, vmin=0.0, vmax=1.0)
        image = None
        for column, setting in enumerate(SETTINGS):
            ax = axes[row][column]
            grid = []
            for layer in layers:
                cells = []
                for model in models:
                    found = shares["layers"][layer][setting][model][key]
                    cells.append(found["value"] if found and found["value"] is not None else float("nan"))
                grid.append(cells)
            image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
            method = inspection.stock_method if setting == "stock" else inspection.nan_method
            ax.set_title(f"{key.replace('_', ' ')}, {method}", fontsize=8)
            ax.set_xticks(range(len(models)), [short[m] for m in models], fontsize=7, rotation=30, ha="right")
            step = 1 if len(layers) <= 40 else max(1, len(layers) // 20)
            ax.set_yticks(range(0, len(layers), step), layers[::step], fontsize=7)
            ax.set_ylabel("layer", fontsize=7)
            if len(layers) <= 40 and len(models) <= 10:
                _print_values(ax, grid, norm)
        figure.colorbar(image, ax=list(axes[row]), shrink=0.8, label=f"white: {centre:.2g}")
    figure.suptitle(
        f"what the weights do, per layer: {inspection.stock_method} against {inspection.nan_method}", fontsize=9
    )
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

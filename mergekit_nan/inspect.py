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
import os
import re
from typing import Any, Dict, List, Optional

from mergekit_nan import methods, prepass, record

_LAYER = re.compile(r"\.(\d+)\.")


def inspect_config(merge_config, options) -> Dict[str, Any]:
    """Return the coefficient record (as in nan_coefficients.json) for `merge_config`."""
    from mergekit.architecture import get_architecture_info
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    if not merge_config.merge_method.startswith("nan_"):
        raise ValueError(f"inspect needs a nan_* merge method, not {merge_config.merge_method!r}")
    prepass.clear()
    arch_info = get_architecture_info(merge_config, options)
    LoaderCache().setup(options=options)
    adapters = _adapters_on_base(merge_config)  # before planning touches any loader
    out_config = _model_out_config(merge_config, arch_info, trust_remote_code=options.trust_remote_code)
    planner = MergePlanner(merge_config, arch_info, options=options, out_model_config=out_config)
    # mergekit 0.1.5's plan_in_memory() cannot build its ReturnTensor tasks, so take
    # the per-tensor merge tasks straight from the plan.
    planner._plan()
    executor = Executor(
        targets=[task for _, task in planner._tensors],
        math_device=options.device,
        storage_device=options.device if options.low_cpu_memory else "cpu",
    )
    with record.recording() as records, methods.dry_run(adapters):
        for _ in executor.run(quiet=options.quiet):
            pass
    return record.to_json(records)


def _adapters_on_base(merge_config) -> Dict[Any, Dict[str, float]]:
    """LoRA references on the merge's own base: their norms from the adapter files.

    Their loaders are pointed at the base model, so mergekit never merges them into
    a full model (no --lora-merge-cache entry); the NAN methods substitute the
    adapter's ||s B A|| for the (zero) measured delta.
    """
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache

    from mergekit_nan.lora import adapter_delta_norms

    base = merge_config.base_model
    if base is None or base.lora is not None:
        return {}
    found = {}
    for model in merge_config.referenced_models():
        if model.lora is not None and model.model == base.model:
            found[model] = adapter_delta_norms(model.lora.path)
            cache = LoaderCache()
            cache.loaders[model] = cache.get(ModelReference(model=model.model))
    return found


def layer_of(name: str) -> str:
    """The transformer block a tensor belongs to ('12'), or 'other' (embeddings, final norm)."""
    match = _LAYER.search(name)
    return match.group(1) if match else "other"


def kind_of(name: str) -> str:
    """The tensor's type within its block: 'self_attn.q_proj.weight', 'embed_tokens.weight'."""
    match = _LAYER.search(name)
    return name[match.end():] if match else name.split(".", 1)[-1] if name.count(".") > 1 else name


def rows(document: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per tensor and model: the CSV's content."""
    out = []
    for tensor in document["tensors"]:
        for index, model in enumerate(document["models"]):
            if tensor["norms"][index] is None:
                continue
            out.append({
                "name": tensor["name"], "layer": layer_of(tensor["name"]), "model": model,
                "norm": tensor["norms"][index], "coefficient": tensor["coefficients"][index],
                "weight": tensor["weights"][index],
            })
    return out


def _mean_by(table: List[Dict[str, Any]], key: str) -> Dict[str, Dict[str, float]]:
    sums: Dict[str, Dict[str, List[float]]] = {}
    for row in table:
        sums.setdefault(row[key], {}).setdefault(row["model"], []).append(row["coefficient"])
    return {k: {m: sum(v) / len(v) for m, v in by_model.items()} for k, by_model in sums.items()}


def summary_text(document: Dict[str, Any]) -> str:
    """Compact tables for a terminal: per model, then per layer and per tensor type."""
    models = document["models"]
    short = {m: f"model {i}" for i, m in enumerate(models)}
    lines = [f"{document['merge_method']} over {len(document['tensors'])} tensors, parameters {document['parameters']}", ""]
    lines.append(f"{'':8} {'mean coef':>9} {'min':>6} {'max':>6} {'mean norm':>10}  model")
    for row in record.model_summary(document):
        lines.append(f"{short[row['model']]:8} {row['mean_coefficient']:>9.3f} {row['min_coefficient']:>6.3f}"
                     f" {row['max_coefficient']:>6.3f} {row['mean_norm']:>10.4g}  {row['model']}")
    table = rows(document)
    for key, title in (("layer", "layer"), ("kind", "tensor type")):
        for row in table:
            row["kind"] = kind_of(row["name"])
        means = _mean_by(table, key)
        order = sorted(means, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
        width = max(len(title), *(len(k) for k in order))
        lines += ["", f"mean coefficient per {title}:", f"{title:>{width}} " + " ".join(f"{short[m]:>8}" for m in models)]
        for k in order:
            lines.append(f"{k:>{width}} " + " ".join(
                f"{means[k][m]:>8.3f}" if m in means[k] else f"{'-':>8}" for m in models))
    return "\n".join(lines)


def write_outputs(document: Dict[str, Any], out_dir: str) -> List[str]:
    """coefficients.json, coefficients.csv and, with matplotlib, coefficients.png."""
    os.makedirs(out_dir, exist_ok=True)
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
    return written


def write_heatmap(document: Dict[str, Any], path: str) -> Optional[str]:
    """Layers x models, one panel per tensor type; None (with a hint) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("hint: pip install 'mergekit-nan[plot]' for a heatmap of the coefficients")
        return None
    table = [r for r in rows(document) if r["layer"] != "other"]
    kinds = sorted({kind_of(r["name"]) for r in table})
    if not kinds:
        return None
    models = document["models"]
    layers = sorted({int(r["layer"]) for r in table})
    columns = min(4, len(kinds))
    panel_rows = (len(kinds) + columns - 1) // columns
    figure, axes = plt.subplots(panel_rows, columns, squeeze=False, layout="constrained",
                                figsize=(3.2 * columns + 1, panel_rows * (0.12 * len(layers) + 1.6)))
    for ax, kind in zip(axes.flat, kinds):
        grid = [[float("nan")] * len(models) for _ in layers]
        for r in table:
            if kind_of(r["name"]) == kind:
                grid[layers.index(int(r["layer"]))][models.index(r["model"])] = r["coefficient"]
        image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(kind, fontsize=8)
        ax.set_xticks(range(len(models)), [f"model {i}" for i in range(len(models))], fontsize=7)
        step = max(1, len(layers) // 12)
        ax.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]], fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label="NAN coefficient")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

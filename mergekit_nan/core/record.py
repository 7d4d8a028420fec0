"""The coefficient record: what NAN chose for every tensor of a merge, and how to read it.

The NAN methods build one small `TensorRecord` per tensor (never a tensor) into the
merge's session; when mergekit has written every tensor, the records become one JSON
document, saved next to the model, summarized in the model card and by `inspect`.
Pure Python.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from mergekit_nan.core.coefficients import PAPER_URL

RECORD_FILENAME = "nan_coefficients.json"
RECORD_FORMAT = "mergekit-nan/coefficients/1"
# The JSON Schema (draft 2020-12) of RECORD_FORMAT, shipped inside the package: mergekit_nan/<this>.
SCHEMA_PATH = "schema/nan_coefficients-1.json"

# Regime hints (see `hints`): a coefficient within 10% of an equal share is "uniform";
# one below a quarter of an equal share is "small"; "almost all" is 90% of tensors.
UNIFORM_TOLERANCE = 0.10
SMALL_SHARE = 0.25
ALMOST_ALL = 0.90


@dataclass(frozen=True)
class TensorRecord:
    tensor: str
    method: str
    wrapped_method: str
    base_model: Optional[str]  # None for nan_linear
    models: Tuple[str, ...]  # non-base inputs present for this tensor, in order
    base_norm: Optional[float]
    norms: Tuple[float, ...]
    coefficients: Tuple[float, ...]
    priors: Tuple[float, ...]
    weights: Tuple[float, ...]
    parameters: Tuple[Tuple[str, Any], ...]  # shared parameters, sorted by name


def to_json(records: List[TensorRecord], norm_cache: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """The record as one JSON document: columns per tensor, aligned to `models`.
    `norm_cache`: how many of the layer/model norms were read from the norm cache and
    how many were added to it, where it was used."""
    models: List[str] = []
    for record in records:
        models.extend(m for m in record.models if m not in models)
    methods = sorted({(r.method, r.wrapped_method) for r in records})
    common = dict(records[0].parameters) if records else {}
    for record in records[1:]:
        mine = dict(record.parameters)
        common = {k: v for k, v in common.items() if k in mine and mine[k] == v}

    def column(record: TensorRecord, values: Tuple[float, ...]) -> List[Optional[float]]:
        by_model = dict(zip(record.models, values))
        return [by_model.get(m) for m in models]

    tensors = []
    for record in records:
        entry: Dict[str, Any] = {"name": record.tensor, "base_norm": record.base_norm}
        own = {k: v for k, v in record.parameters if common.get(k, object()) != v}
        if own:
            entry["parameters"] = own
        entry["norms"] = column(record, record.norms)
        entry["coefficients"] = column(record, record.coefficients)
        entry["priors"] = column(record, record.priors)
        entry["weights"] = column(record, record.weights)
        tensors.append(entry)
    document = {
        "format": RECORD_FORMAT,
        "paper": PAPER_URL,
        "merge_method": ", ".join(m for m, _ in methods),
        "wrapped_method": ", ".join(w for _, w in methods),
        "base_model": records[0].base_model if records else None,
        "models": models,
        "parameters": common,
    }
    if norm_cache:
        document["norm_cache"] = dict(norm_cache)
    document["tensors"] = tensors
    return document


def record_schema() -> Dict[str, Any]:
    """The JSON Schema of a record document, read from the installed package (validating
    with it needs `jsonschema`, which mergekit-nan itself does not use)."""
    resource = importlib.resources.files("mergekit_nan")
    for part in SCHEMA_PATH.split("/"):  # one at a time: Python 3.10's joinpath takes one
        resource = resource.joinpath(part)
    return json.loads(resource.read_text(encoding="utf-8"))


def write(document: Dict[str, Any], path: str) -> str:
    """Write a record document (see to_json) atomically to `path`; returns the path."""
    partial = path + ".partial"
    document = dict(document)
    tensors = document.pop("tensors")
    head = json.dumps(document, indent=1, allow_nan=False)
    # One line per tensor keeps a 1000-tensor record readable with grep and diff.
    rows = ",\n".join("  " + json.dumps(t, allow_nan=False) for t in tensors)
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(head[:-2] + ',\n "tensors": [\n' + rows + "\n ]\n}\n")
    os.replace(partial, path)
    return path


def _shares(tensor: Dict[str, Any]) -> List[Optional[float]]:
    """Each model's coefficient as a multiple of an equal share among the tensor's
    participants (1.0 = what equal weights give); None where the model takes no part."""
    live = [c for c in tensor["coefficients"] if c]
    return [c * len(live) if c else None for c in tensor["coefficients"]]


def model_summary(document: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per model: mean delta norm, its norm relative to the others (median over tensors
    of norm / geometric mean of the tensor's norms), mean/min/max coefficient, and the
    mean of weight / prior: the factor NAN applies to the weight the config gives it."""
    rows = []
    tensors = document["tensors"]
    for index, model in enumerate(document["models"]):
        norms = [t["norms"][index] for t in tensors if t["norms"][index] is not None]
        coefs = [t["coefficients"][index] for t in tensors if t["coefficients"][index] is not None]
        factors = [
            t["weights"][index] / t["priors"][index] for t in tensors if t["coefficients"][index] and t["priors"][index]
        ]
        relative = []
        for t in tensors:
            own = t["norms"][index]
            positive = [n for n in t["norms"] if n]
            if own and len(positive) > 1:
                relative.append(own / math.exp(math.fsum(math.log(n) for n in positive) / len(positive)))
        rows.append(
            {
                "model": model,
                "tensors": len(coefs),
                "mean_norm": sum(norms) / len(norms) if norms else float("nan"),
                "relative_norm": statistics.median(relative) if relative else float("nan"),
                "mean_coefficient": sum(coefs) / len(coefs) if coefs else float("nan"),
                "min_coefficient": min(coefs, default=float("nan")),
                "max_coefficient": max(coefs, default=float("nan")),
                "weight_factor": sum(factors) / len(factors) if factors else float("nan"),
            }
        )
    return rows


def hints(document: Dict[str, Any]) -> List[str]:
    """Plain warnings that tell a user what NAN will do to their merge, naming models:
    coefficients nearly uniform (NAN changes little), or one model's coefficient small
    on almost every tensor it takes part in (NAN mostly drops it)."""
    shares = [_shares(t) for t in document["tensors"]]
    shares = [row for row in shares if sum(s is not None for s in row) > 1]
    if not shares:
        return []
    found = []
    uniform = sum(all(abs(s - 1) <= UNIFORM_TOLERANCE for s in row if s is not None) for row in shares)
    if uniform >= ALMOST_ALL * len(shares):
        found.append(
            f"NAN's coefficients are within {UNIFORM_TOLERANCE:.0%} of an equal share on {uniform} of "
            f"{len(shares)} tensors: the deltas have similar norms, so NAN will change little "
            "against the wrapped method with equal weights."
        )
    for index, model in enumerate(document["models"]):
        mine = [row[index] for row in shares if row[index] is not None]
        small = sum(s < SMALL_SHARE for s in mine)
        if mine and small >= ALMOST_ALL * len(mine):
            found.append(
                f"{model} gets less than {SMALL_SHARE:.0%} of an equal share on {small} of the {len(mine)} "
                "tensors it changes: its delta is much larger than the others', so NAN will mostly drop it."
            )
    return found


def card_section(document: Dict[str, Any]) -> str:
    """Markdown for the model card: NAN's settings, each model's norm and coefficients, hints."""
    settings = ", ".join(
        f"`{k}: {v}`"
        for k, v in document["parameters"].items()
        if k in ("weighting", "temperature", "granularity", "norm_of", "lambda")
    )
    lines = [
        "",
        "### NAN coefficients",
        "",
        f"Per-tensor model weights were set by [NAN]({PAPER_URL}) ({settings}) on top of "
        f"`{document['wrapped_method']}`. Per model over {len(document['tensors'])} tensors: its delta norm "
        "relative to the others' (median over tensors; 1 = the geometric mean), its coefficient, and the "
        "factor applied to its configured `weight` (mean over the tensors it changes); "
        f"`{RECORD_FILENAME}` has every tensor's norms, coefficients and weights.",
        "",
        "| model | relative delta norm | mean coefficient | min | max | weight factor |",
        "|---|---|---|---|---|---|",
    ]
    for row in model_summary(document):
        lines.append(
            f"| {row['model']} | {row['relative_norm']:.2f} | {row['mean_coefficient']:.3f} "
            f"| {row['min_coefficient']:.3f} | {row['max_coefficient']:.3f} | {row['weight_factor']:.3f} |"
        )
    lines += [""] + [f"> {hint}" for hint in hints(document)]
    lines += ["", "`mergekit-nan inspect CONFIG --out DIR` draws a heatmap of them per layer and tensor type."]
    return "\n".join(lines) + "\n"

"""The coefficient record: what NAN chose for every tensor of a merge.

Merge methods run inside mergekit's executor, which knows nothing of this plugin,
so records are collected here while a merge is being written and saved next to
the model when mergekit finalizes its output (see `methods.py`, which hooks
TensorWriter). One small record per tensor, never a tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from mergekit_nan.coefficients import PAPER_URL

RECORD_FILENAME = "nan_coefficients.json"
RECORD_FORMAT = "mergekit-nan/coefficients/1"


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


_lock = threading.Lock()
_active: Optional[List[TensorRecord]] = None


def add(record: TensorRecord) -> None:
    """Keep `record` if a merge is being recorded; otherwise drop it."""
    with _lock:
        if _active is not None:
            _active.append(record)


@contextlib.contextmanager
def recording() -> Iterator[List[TensorRecord]]:
    """Collect the records of NAN merges run inside the block (e.g. merge_tensors)."""
    records = start()
    try:
        yield records
    finally:
        stop(records)


def start() -> List[TensorRecord]:
    global _active
    with _lock:
        _active = []
        return _active


def stop(records: Optional[List[TensorRecord]] = None) -> List[TensorRecord]:
    """End recording (only the given session, if named) and return what it holds."""
    global _active
    with _lock:
        current = _active
        if records is None or current is records:
            _active = None
        return current if records is None else records


def to_json(records: List[TensorRecord]) -> Dict[str, Any]:
    """The record as one JSON document: columns per tensor, aligned to `models`."""
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
    return {
        "format": RECORD_FORMAT,
        "paper": PAPER_URL,
        "merge_method": ", ".join(m for m, _ in methods),
        "wrapped_method": ", ".join(w for _, w in methods),
        "base_model": records[0].base_model if records else None,
        "models": models,
        "parameters": common,
        "tensors": tensors,
    }


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


def model_summary(document: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per model: mean delta norm and mean/min/max coefficient over the tensors it is in."""
    rows = []
    for index, model in enumerate(document["models"]):
        norms = [t["norms"][index] for t in document["tensors"] if t["norms"][index] is not None]
        coefs = [t["coefficients"][index] for t in document["tensors"] if t["coefficients"][index] is not None]
        rows.append({
            "model": model,
            "tensors": len(coefs),
            "mean_norm": sum(norms) / len(norms) if norms else float("nan"),
            "mean_coefficient": sum(coefs) / len(coefs) if coefs else float("nan"),
            "min_coefficient": min(coefs, default=float("nan")),
            "max_coefficient": max(coefs, default=float("nan")),
        })
    return rows


def card_section(document: Dict[str, Any]) -> str:
    """Markdown for the model card: NAN's settings and each model's mean coefficient."""
    settings = ", ".join(f"`{k}: {v}`" for k, v in document["parameters"].items()
                         if k in ("temperature", "granularity", "norm_of", "lambda"))
    lines = [
        "",
        "### NAN coefficients",
        "",
        f"Per-tensor model weights were set by [NAN]({PAPER_URL}) ({settings}) on top of "
        f"`{document['wrapped_method']}`. Mean coefficient per model over {len(document['tensors'])} tensors; "
        f"`{RECORD_FILENAME}` has every tensor's norms, coefficients and weights.",
        "",
        "| model | mean coefficient | min | max |",
        "|---|---|---|---|",
    ]
    for row in model_summary(document):
        lines.append(f"| {row['model']} | {row['mean_coefficient']:.3f} | {row['min_coefficient']:.3f} | {row['max_coefficient']:.3f} |")
    lines += ["", "`mergekit-nan inspect CONFIG --out DIR` draws a heatmap of them per layer and tensor type."]
    return "\n".join(lines) + "\n"

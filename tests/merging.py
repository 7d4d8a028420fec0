"""Running real merges from the tests, and the independent reference they are checked against."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Dict, List, Sequence

import jsonschema
import torch

from mergekit_nan.core.record import RECORD_FILENAME, record_schema
from mergekit_nan.yaml_run import run_mergekit_yaml

BIN = os.path.dirname(sys.executable)

# The sweep of every task-vector method (test_merges, test_weighting):
# method -> (shared parameters, per-model parameters)
METHODS = {
    "task_arithmetic": ({"temperature": 0.5, "lambda": 0.7}, {}),
    "ties": ({}, {"density": 0.6}),
    "dare_ties": ({"temperature": 2.0}, {"density": 0.7}),
    "dare_linear": ({}, {"density": 0.7}),
    "breadcrumbs": ({}, {"density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties": ({}, {"density": 0.8, "gamma": 0.05}),
    "della": ({}, {"density": 0.6, "epsilon": 0.1}),
    "della_linear": ({"lambda": 1.3}, {"density": 0.6, "epsilon": 0.1}),
}
# The default temperature of nan_<method> where the README's parameter table gives one other than 1.0.
DEFAULT_TEMPERATURE = {"task_arithmetic": 4.0, "dare_ties": 4.0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRIORS = [1.0, 2.0, 0.5]
SEED = 7
TOLERANCE = {"float32": dict(rtol=1e-5, atol=1e-6), "bfloat16": dict(rtol=8e-3, atol=1e-3)}


def default_temperature(method: str) -> float:
    """The documented default `temperature` of `method` (nan_<m> or <m>)."""
    return DEFAULT_TEMPERATURE.get(method.removeprefix("nan_"), 1.0)


def mergekit_nan_inspect(*args, env=None) -> subprocess.CompletedProcess:
    """The real `mergekit-nan inspect` command line, in a subprocess."""
    return subprocess.run(
        [os.path.join(BIN, "mergekit-nan"), "inspect", *map(str, args)], capture_output=True, text=True, env=env
    )


# "<file in site-packages>:<line>: <Category>Warning: <message>" and the indented source line Python prints after it
INSTALLED_PACKAGE_WARNING = re.compile(r"^\S*[/\\]site-packages[/\\]\S+:\d+: \w*Warning: ")


def own_stderr_lines(stderr: str) -> List[str]:
    """The lines the command itself wrote to stderr: those of warnings that installed packages raise on import
    (peft's deprecation of transformers<5.6, say) are left out, since they depend on the environment."""
    lines, kept = stderr.strip().splitlines(), []
    skipping = False
    for line in lines:
        if INSTALLED_PACKAGE_WARNING.match(line):
            skipping = True
        elif not (skipping and line[:1].isspace()):
            skipping = False
            kept.append(line)
    return kept


def weighing_of(record: dict) -> dict:
    """What a record says of the weights, for comparing two runs of one merge: its tensors in
    no particular order (mergekit's schedule can differ between runs and task graphs) and
    without the norm-cache counts (they depend on which run filled the cache)."""
    kept = {key: value for key, value in record.items() if key != "norm_cache"}
    if "tensors" in kept:
        kept["tensors"] = sorted(kept["tensors"], key=lambda entry: json.dumps(entry, sort_keys=True))
    return kept


def mergekit_yaml(config: dict, out: str, *extra: str, command: str = "mergekit-yaml") -> subprocess.CompletedProcess:
    """The real command line, in a subprocess, as a user would run it (config written to <out>.yml)."""
    return run_mergekit_yaml(config, out, ["--no-copy-tokenizer", *extra], command=command, check=False)


def run_in_process(config: dict, out: str, seed: int = None) -> None:
    """mergekit's own Python entry point (run_merge), for stock comparisons."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, random_seed=seed, quiet=True, write_model_card=False)
    run_merge(MergeConfiguration.model_validate(config), out, options=options)


def nan_config(
    method: str,
    paths: Sequence[str],
    priors: Sequence[float],
    dtype: str,
    parameters: dict = None,
    model_parameters: dict = None,
) -> dict:
    config = {
        "merge_method": method,
        "base_model": paths[0],
        "models": [
            {"model": p, "parameters": {"weight": w, **(model_parameters or {})}} for p, w in zip(paths[1:], priors)
        ],
        "dtype": dtype,
    }
    if parameters:
        config["parameters"] = parameters
    return config


def reference_weights(
    base: Dict[str, torch.Tensor], tuned: List[Dict[str, torch.Tensor]], priors: Sequence[float], temperature: float
) -> Dict[str, List[float]]:
    """Per-tensor NAN weights from float64 norms and the paper's n^(-1/T) form.

    Written independently of mergekit_nan: a model whose delta is negligible
    (<= 1e-6 of the base norm) gets weight 0, and the budget is the priors' sum
    over the others.
    """
    weights = {}
    for name, b in base.items():
        b64 = b.double()
        norms = [(t[name].double() - b64).norm().item() for t in tuned]
        live = [n > 1e-6 * b64.norm().item() for n in norms]
        powers = [n ** (-1 / temperature) if ok else 0.0 for n, ok in zip(norms, live)]
        alpha = [p / sum(powers) for p in powers] if any(live) else [0.0] * len(norms)
        budget = sum(p for p, ok in zip(priors, live) if ok)
        mass = sum(p * a for p, a in zip(priors, alpha))
        weights[name] = [budget * p * a / mass if mass else 0.0 for p, a in zip(priors, alpha)]
    return weights


def per_tensor_weight_config(config: dict, weights: Dict[str, List[float]], method: str) -> dict:
    """The same merge for stock mergekit, with each tensor's weights spelled out as filters."""
    stock = json.loads(json.dumps(config))
    stock["merge_method"] = method
    stock.get("parameters", {}).pop("temperature", None)
    for index, model in enumerate(stock["models"]):
        model["parameters"]["weight"] = [{"filter": name, "value": w[index]} for name, w in weights.items()] + [
            {"value": 1.0}
        ]
    return stock


# What `mergekit-nan inspect --out DIR` calls the record it writes into DIR.
INSPECT_RECORD_FILENAME = "coefficients.json"
RECORD_VALIDATOR = jsonschema.Draft202012Validator(record_schema())
COLUMNS = ("norms", "coefficients", "priors", "weights")


def validate_record(document: dict) -> None:
    """Raise jsonschema.ValidationError unless `document` follows the record's schema and,
    what a schema cannot say, every column of every tensor has one entry per model, null
    for the same models."""
    RECORD_VALIDATOR.validate(document)
    width = len(document["models"])
    for tensor in document["tensors"]:
        absent = [[value is None for value in tensor[column]] for column in COLUMNS]
        if any(len(row) != width for row in absent) or any(row != absent[0] for row in absent):
            raise jsonschema.ValidationError(
                f"tensor {tensor['name']}: its columns need {width} entries each (one per model), null in the same places"
            )


def load_record(path) -> dict:
    """Read a coefficient record file and fail, naming the file, unless it validates."""
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    try:
        validate_record(document)
    except jsonschema.ValidationError as error:
        raise AssertionError(f"{path} breaks the record schema at {error.json_path}: {error.message}") from None
    return document


def read_record(out: str) -> dict:
    """The record a merge into `out` wrote, validated."""
    return load_record(os.path.join(out, RECORD_FILENAME))


def reference_group_weights(base, tuned, priors, temperature, group_of, norm_of="delta"):
    """Like reference_weights, with each model's norm taken over the tensor's group.

    `group_of(name)` names the group; a model still takes part in a tensor only if
    its delta for that very tensor is not negligible.
    """
    own, sq = {}, {}
    for name, b in base.items():
        b64 = b.double()
        deltas = [(t[name].double() - b64).norm().item() for t in tuned]
        measured = deltas if norm_of == "delta" else [t[name].double().norm().item() for t in tuned]
        own[name] = [d > 1e-6 * b64.norm().item() for d in deltas]
        totals = sq.setdefault(group_of(name), [0.0] * len(tuned))
        for i, n in enumerate(measured):
            totals[i] += n * n
    weights = {}
    for name in base:
        norms = [s**0.5 if ok else 0.0 for s, ok in zip(sq[group_of(name)], own[name])]
        powers = [n ** (-1 / temperature) if n > 0 else 0.0 for n in norms]
        alpha = [p / sum(powers) for p in powers] if any(powers) else [0.0] * len(norms)
        budget = sum(p for p, ok in zip(priors, own[name]) if ok)
        mass = sum(p * a for p, a in zip(priors, alpha))
        weights[name] = [budget * p * a / mass if mass else 0.0 for p, a in zip(priors, alpha)]
    return weights


LAYER = re.compile(r"\.(\d+)\.")


def top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: keep the max(1, int(density * n)) entries of largest magnitude."""
    flat = delta.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().argsort(descending=True)[: max(1, int(density * flat.numel()))]] = True
    return (flat * keep).reshape(delta.shape)


def share_reference(base, tuned, weights_of, election: bool, density=None):
    """Float64 figures per scope ("all" and each layer): per model the kept squared weighted
    delta, the disputed-sign wins; plus the task vectors' dot products. `base`, `tuned`:
    state dicts."""
    sums = {}
    for name, b in base.items():
        scopes = ["all", LAYER.search(name).group(1) if LAYER.search(name) else "other"]
        deltas = [(t[name] - b).double() for t in tuned]  # taken in the checkpoints' dtype, as mergekit does
        trimmed = [top_magnitude(d, density) if density else d for d in deltas]
        weighted = [w * d for w, d in zip(weights_of(name), trimmed)]
        total = sum(weighted)
        elected = torch.where(total >= 0, 1.0, -1.0).double()
        positive = torch.stack([x > 0 for x in weighted]).any(0)
        negative = torch.stack([x < 0 for x in weighted]).any(0)
        disputed = positive & negative
        for scope in scopes:
            entry = sums.setdefault(
                scope, {"energy": [0.0] * len(tuned), "wins": [0.0] * len(tuned), "disputed": 0.0, "dots": {}}
            )
            entry["disputed"] += float(disputed.sum())
            for i, x in enumerate(weighted):
                agrees = x.sign() == elected
                kept = x * agrees if election else x
                entry["energy"][i] += float((kept * kept).sum())
                entry["wins"][i] += float((agrees & disputed).sum())
                for j, y in enumerate(deltas):
                    entry["dots"][(i, j)] = entry["dots"].get((i, j), 0.0) + float((deltas[i] * y).sum())
    return sums

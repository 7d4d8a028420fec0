"""What a merge's weights do to it, measured before the merge: whose delta the merged task
vector is made of, who wins the sign election, and how alike the task vectors are.

Per tensor, for each weight setting (the config's weights, "stock"; NAN's, "nan"), with
the deltas trimmed as the wrapped method trims them (`trim`) and weighted:
- `delta_share` of model i: ||w_i d_i restricted to what the method keeps||^2 over the sum
  of those for all models (with a sign election the entries that agree with the elected
  sign; otherwise every entry);
- `sign_election_share` (methods with a sign election): among the coordinates where the
  weighted, trimmed deltas of the models disagree in sign, the fraction where model i's
  sign is elected (mergekit's rule: the sign of the sum of the weighted deltas, 0 counted
  as +);
- the Gram matrix of the untrimmed deltas, for the pairwise cosine.
A tensor above `exact_limit` coordinates is measured on a seeded uniform sample (with
replacement) of `sample_size` coordinates, trimmed as a whole tensor would be (mergekit's
magnitude threshold is then the sample's); the shares it enters get a standard error. Aggregates over tensors (whole model, per layer)
are ratios of sums. Pure torch: imports no mergekit.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from mergekit_nan.core.lora import LowRankDelta

SETTINGS = ("stock", "nan")
# A larger tensor is sampled; 2^16 coordinates keep the report's cost near 20 ms per tensor
# (3 models) and a share's error per tensor near 0.2 points (`benchmarks/perf/inspect_cost.py`).
EXACT_LIMIT = 1 << 16
SAMPLE_SIZE = 1 << 16


@dataclass
class Sums:
    """Per model, the sums a share is a ratio of: numerator a, denominator b (over the
    counted coordinates), and for a sampled tensor the second moments for its error."""

    a: List[float]
    b: float
    aa: List[float] = field(default_factory=list)
    ab: List[float] = field(default_factory=list)
    bb: float = 0.0


@dataclass
class TensorShares:
    name: str
    models: tuple
    coordinates: int  # the tensor's size
    counted: int  # coordinates measured: all, or the sample
    sampled: bool
    estimated: bool  # the trim is random (DARE, DELLA): a mask of our own, not the merge's
    gram: List[List[float]]
    delta: Dict[str, Sums]
    election: Dict[str, Optional[Sums]]

    @property
    def scale(self) -> float:
        return self.coordinates / self.counted


def _sums(per_model: torch.Tensor, total: torch.Tensor, moments: bool) -> Sums:
    """per_model: K x n values a, total: n values b."""
    if per_model.dtype == torch.bool:  # indicators, a <= b: a^2 = a b = a, b^2 = b
        a, b = per_model.sum(1, dtype=torch.float64).tolist(), float(total.sum())
        return Sums(a=a, b=b, aa=a, ab=a, bb=b) if moments else Sums(a=a, b=b)
    sums = Sums(a=per_model.sum(1).tolist(), b=float(total.sum()))
    if moments:
        sums.aa = (per_model * per_model).sum(1).tolist()
        sums.ab = (per_model * total).sum(1).tolist()
        sums.bb = float((total * total).sum())
    return sums


def _delta_values(tuned, flat_base: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """A model's delta over the whole tensor or at `index`, in float64 on the CPU: tuned -
    base taken in the base's dtype, or a LoRA's s B A entries."""
    if isinstance(tuned, LowRankDelta):
        if tuned.b.shape[0] * tuned.a.shape[1] != flat_base.numel():
            raise ValueError(
                f"a LoRA delta of {tuned.b.shape[0]} x {tuned.a.shape[1]} on a tensor of {flat_base.numel()}"
            )
        return tuned.values(index)
    flat = tuned.reshape(-1)
    if index is not None:
        index = index.to(flat.device)
        flat, flat_base = flat[index], flat_base[index]
    return (flat.to(flat_base.dtype) - flat_base).double().cpu()


def tensor_shares(
    name: str,
    models: Sequence,
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    weights: Dict[str, Sequence[float]],
    trim: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
    *,
    election: bool,
    randomized: bool = False,
    exact_limit: int = EXACT_LIMIT,
    sample_size: int = SAMPLE_SIZE,
    seed: int = 0,
) -> TensorShares:
    """The shares of one tensor, from the base tensor and the models' (delta = tuned - base,
    taken in the base's dtype; a `LowRankDelta` is a LoRA's delta itself). `weights`:
    setting -> per-model weight; `trim(i, values)` returns model i's trimmed delta values
    (the wrapped method's sparsification)."""
    size = base.numel()
    sampled = size > exact_limit
    flat_base = base.reshape(-1)
    index = None
    if sampled:
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ seed)
        index = torch.randint(size, (sample_size,), generator=generator)
    values = [_delta_values(t, flat_base, index) for t in tuned]
    untrimmed = torch.stack(values)
    trimmed = torch.stack([trim(i, v) for i, v in enumerate(values)]) if trim else untrimmed
    delta, elections = {}, {}
    for setting, setting_weights in weights.items():
        w = torch.tensor([float(x) for x in setting_weights], dtype=torch.float64).unsqueeze(1)
        weighted = trimmed * w
        if election:
            positive, negative = weighted > 0, weighted < 0
            # mergekit's rule: the sign of the sum, 0 counted as +; a zero entry agrees with neither sign
            agrees = torch.where(weighted.sum(0) >= 0, positive, negative)
            kept = weighted * agrees
            disputed = positive.any(0) & negative.any(0)
            elections[setting] = _sums(agrees & disputed, disputed, sampled)
        else:
            kept = weighted
            elections[setting] = None
        energy = kept.square_()
        delta[setting] = _sums(energy, energy.sum(0), sampled)
    return TensorShares(
        name=name,
        models=tuple(models),
        coordinates=size,
        counted=trimmed.shape[1],
        sampled=sampled,
        estimated=randomized,
        gram=(untrimmed @ untrimmed.T).tolist(),
        delta=delta,
        election=elections,
    )


def _ratio(parts: List[tuple]) -> Dict[str, Optional[float]]:
    """sum_t scale_t a_t / sum_t scale_t b_t over (TensorShares, Sums, column of the model),
    and its standard error from the sampled tensors (ratio estimator, delta method)."""
    numerator = sum(t.scale * s.a[c] for t, s, c in parts if c is not None)
    denominator = sum(t.scale * s.b for t, s, _ in parts)
    if denominator <= 0:
        return {"value": None, "stderr": None}
    ratio = numerator / denominator
    variance = 0.0
    for t, s, c in parts:
        if not t.sampled or t.counted < 2:
            continue
        a, aa, ab = (s.a[c], s.aa[c], s.ab[c]) if c is not None else (0.0, 0.0, 0.0)
        n = t.counted
        residual_sum = a - ratio * s.b
        residual_squares = aa - 2 * ratio * ab + ratio * ratio * s.bb
        sample_variance = max(0.0, (residual_squares - residual_sum * residual_sum / n) / (n - 1))
        variance += t.coordinates * t.coordinates * sample_variance / n
    return {"value": ratio, "stderr": math.sqrt(variance) / denominator}


def summarize(tensors: Iterable[TensorShares], models: Sequence) -> Dict[str, object]:
    """Per model and setting, over the given tensors: delta_share and sign_election_share
    (value and standard error; the error is 0 when nothing was sampled), the pairwise
    cosine of the task vectors, and whether any figure is sampled or estimated."""
    tensors = list(tensors)
    models = list(models)
    out: Dict[str, object] = {
        "tensors": len(tensors),
        "sampled_tensors": sum(t.sampled for t in tensors),
        "estimated": any(t.estimated for t in tensors),
    }
    for setting in SETTINGS:
        per_model = {}
        for m in models:
            delta = [(t, t.delta[setting], _column(t, m)) for t in tensors if setting in t.delta]
            elections = [
                (t, t.election[setting], _column(t, m)) for t in tensors if t.election.get(setting) is not None
            ]
            per_model[str(m)] = {
                "delta_share": _ratio(delta),
                "sign_election_share": _ratio(elections) if elections else None,
            }
        out[setting] = per_model
    out["cosine"] = _cosines(tensors, models)
    return out


def _column(tensor: TensorShares, model) -> Optional[int]:
    names = [str(m) for m in tensor.models]
    return names.index(str(model)) if str(model) in names else None


def _cosines(tensors: List[TensorShares], models: list) -> Dict[str, Dict[str, Optional[float]]]:
    dots: Dict[tuple, float] = {}
    for t in tensors:
        for i, a in enumerate(t.models):
            for j, b in enumerate(t.models):
                key = (str(a), str(b))
                dots[key] = dots.get(key, 0.0) + t.scale * t.gram[i][j]
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for a in map(str, models):
        row = {}
        for b in map(str, models):
            norms = dots.get((a, a), 0.0) * dots.get((b, b), 0.0)
            row[b] = dots.get((a, b), 0.0) / math.sqrt(norms) if norms > 0 else None
        out[a] = row
    return out


def report(
    tensors: Iterable[TensorShares], models: Sequence[str], layer_of: Callable[[str], str], per_tensor: bool = False
) -> Dict[str, object]:
    """The figures of `summarize` over the whole model, per layer and (if asked) per tensor."""
    tensors = list(tensors)
    layers: Dict[str, List[TensorShares]] = {}
    for t in tensors:
        layers.setdefault(layer_of(t.name), []).append(t)
    out: Dict[str, object] = {
        "models": list(models),
        "whole_model": summarize(tensors, models),
        "layers": {layer: summarize(group, models) for layer, group in layers.items()},
    }
    if per_tensor:
        out["tensors"] = {t.name: summarize([t], models) for t in tensors}
    return out


def _percent(figure: Optional[dict]) -> Optional[str]:
    if not figure or figure["value"] is None:
        return None
    error = f" ± {100 * 1.96 * figure['stderr']:.0f}" if figure["stderr"] else ""
    return f"{100 * figure['value']:.0f}%{error}"


def reading(summary: dict, model: str, stock_method: str, nan_method: str) -> str:
    """One model's figures in words: 'decides 78% of disputed signs under ties, 36% under
    nan_ties; makes 61% of the merged task vector under ties, 30% under nan_ties'."""
    stock, nan = summary["stock"][model], summary["nan"][model]
    parts = []
    for key, what in (
        ("sign_election_share", "decides {} of disputed signs"),
        ("delta_share", "makes {} of the merged task vector"),
    ):
        before, after = _percent(stock[key]), _percent(nan[key])
        if before and after:
            parts.append(f"{what.format(before)} under {stock_method}, {after} under {nan_method}")
    return "; ".join(parts)

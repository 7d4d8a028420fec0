"""NAN merging coefficients from per-model task-delta norms.

Pure Python on purpose: it knows neither mergekit nor torch, so the formulas can be
read, tested and reused (benchmarks, `inspect`) on its own. One call handles one
output tensor, where there are only a handful of models; exact float64 arithmetic
in Python costs nothing next to reading the tensors.

Two weightings, chosen by the `weighting` parameter (`weights_for`):

`paper` (the paper's NAN): the budget S of the priors, redistributed by inverse norm;
a short delta is stretched, a long one shrunk.

    alpha_i = softmax_i(-ln(n_i) / T) = n_i^(-1/T) / sum_j n_j^(-1/T)
    w_i     = S * (prior_i * alpha_i) / sum_j (prior_j * alpha_j),  S = sum_j prior_j

`shrink_median` / `shrink_geomean`: shrink, never stretch. A delta longer than the
reference norm r (the median, or the geometric mean, of the participants' norms) is
weighed down towards r's length; every other model keeps its prior as it is.

    f_i = min(1, (r / n_i)^(1/T)),   w_i = prior_i * f_i,   alpha_i = f_i / sum_j f_j

All sums run over the models that take part in the tensor: those whose delta is
not zero (or negligible) and, for the reference norm, whose prior is > 0.
Everyone else gets alpha = w = 0.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

PAPER_URL = "https://arxiv.org/abs/2505.16148"

# A delta whose norm is at most this fraction of the base tensor's norm is treated
# as "not touched" (e.g. a LoRA that never adapted that module): float32 round-off
# of an unchanged tensor sits around 1e-7 relative, real fine-tunes far above.
NEGLIGIBLE_DELTA_RATIO = 1e-6

# `weighting` values; "paper" is the default.
WEIGHTINGS = ("paper", "shrink_median", "shrink_geomean")


def check_temperature(temperature: float) -> float:
    """Return `temperature` as a float, or raise naming the parameter."""
    try:
        if isinstance(temperature, bool):
            raise TypeError
        value = float(temperature)  # numeric strings: YAML 1.1 reads 1e-1 as a string
    except (TypeError, ValueError):
        raise ValueError(f"NAN parameter `temperature` must be a number > 0, got {temperature!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"NAN parameter `temperature` must be a finite number > 0, got {temperature!r}")
    return value


def inverse_norm_softmax(norms: Sequence[float], temperature: float = 1.0) -> Tuple[float, ...]:
    """alpha_i = softmax_i(-ln(n_i)/T) over the strictly positive norms.

    Zero norms get alpha = 0 and stay out of the normalization; if every norm is
    zero, every alpha is zero. Works in log space, so norms from 1e-300 to 1e300
    give finite coefficients that sum to 1.
    """
    temperature = check_temperature(temperature)
    for index, norm in enumerate(norms):
        if not (math.isfinite(norm) and norm >= 0):
            raise ValueError(f"norm #{index} must be finite and >= 0, got {norm!r}")
    logits = [(-math.log(n) / temperature) if n > 0 else None for n in norms]
    live = [z for z in logits if z is not None]
    if not live:
        return tuple(0.0 for _ in norms)
    top = max(live)
    exps = [math.exp(z - top) if z is not None else 0.0 for z in logits]
    total = math.fsum(exps)
    return tuple(e / total for e in exps)


def takes_part(
    norms: Sequence[float], base_norm: Optional[float] = None, negligible_ratio: float = NEGLIGIBLE_DELTA_RATIO
) -> Tuple[bool, ...]:
    """Which deltas count: norm above negligible_ratio * base_norm (above 0 without a base norm)."""
    threshold = 0.0 if base_norm is None else negligible_ratio * float(base_norm)
    return tuple(float(n) > threshold for n in norms)


@dataclass(frozen=True)
class NanWeights:
    """Everything NAN decided for one tensor, in model order."""

    norms: Tuple[float, ...]
    coefficients: Tuple[float, ...]  # alpha_i, sums to 1 over participants
    weights: Tuple[float, ...]  # w_i handed to the wrapped method
    participating: Tuple[bool, ...]


def nan_weights(
    norms: Sequence[float],
    priors: Optional[Sequence[float]] = None,
    temperature: float = 1.0,
    base_norm: Optional[float] = None,
    negligible_ratio: float = NEGLIGIBLE_DELTA_RATIO,
) -> NanWeights:
    """Per-model weights for one tensor: NAN's alpha, times the prior, at the prior's total.

    `priors` are the config's per-model `weight` values (default 1 each); they must
    be >= 0. `base_norm`, when given, marks deltas with norm <= negligible_ratio *
    base_norm as not taking part.
    """
    norms, priors = _checked(norms, priors)
    participating = takes_part(norms, base_norm, negligible_ratio)
    alphas = inverse_norm_softmax([n if part else 0.0 for n, part in zip(norms, participating)], temperature)
    # Priors enter as ratios (scaled by the largest), so huge finite priors cannot overflow
    # the sums; only a budget that is itself past the float range fails.
    scale = max((p for p, part in zip(priors, participating) if part), default=0.0)
    if scale == 0:
        return NanWeights(norms, alphas, tuple(0.0 for _ in norms), participating)
    relative = [p / scale for p in priors]
    share = math.fsum(r for r, part in zip(relative, participating) if part)
    mass = math.fsum(r * a for r, a in zip(relative, alphas))
    if mass == 0:
        return NanWeights(norms, alphas, tuple(0.0 for _ in norms), participating)
    budget = scale * share
    if not math.isfinite(budget):
        raise ValueError(
            f"the `weight` values sum to more than the largest float ({share:g} x {scale:g}); NAN hands out "
            "their sum as the weight budget, so use smaller values"
        )
    weights = tuple(budget * (r * a / mass) for r, a in zip(relative, alphas))
    return NanWeights(norms, alphas, weights, participating)


def shrink_weights(
    norms: Sequence[float],
    priors: Optional[Sequence[float]] = None,
    temperature: float = 1.0,
    base_norm: Optional[float] = None,
    negligible_ratio: float = NEGLIGIBLE_DELTA_RATIO,
    reference: str = "median",
) -> NanWeights:
    """Shrink, never stretch: w_i = prior_i * min(1, (r / n_i)^(1/T)).

    r is the `reference` ("median" or "geomean") of the norms of the models that take
    part and have a prior > 0. A model is only ever weighed down, and only when its
    delta is longer than r; with equal norms the weights are the priors. `coefficients`
    are the factors f_i normalized to sum to 1 (each model's share, as in `nan_weights`).
    """
    temperature = check_temperature(temperature)
    norms, priors = _checked(norms, priors)
    participating = takes_part(norms, base_norm, negligible_ratio)
    counted = [n for n, p, part in zip(norms, priors, participating) if part and p > 0]
    if not counted:
        return NanWeights(norms, tuple(0.0 for _ in norms), tuple(0.0 for _ in norms), participating)
    if reference == "median":
        ref = statistics.median(counted)
    elif reference == "geomean":
        ref = math.exp(math.fsum(math.log(n) for n in counted) / len(counted))
    else:
        raise ValueError(f"reference must be median or geomean, got {reference!r}")
    # In log space: ratios of norms 1e-300 apart stay finite.
    factors = [
        math.exp(min(0.0, (math.log(ref) - math.log(n)) / temperature)) if part else 0.0
        for n, part in zip(norms, participating)
    ]
    total = math.fsum(factors)
    coefficients = tuple(f / total for f in factors)
    weights = tuple(p * f for p, f in zip(priors, factors))
    return NanWeights(norms, coefficients, weights, participating)


def weights_for(
    weighting: str,
    norms: Sequence[float],
    priors: Optional[Sequence[float]] = None,
    temperature: float = 1.0,
    base_norm: Optional[float] = None,
) -> NanWeights:
    """The weights of the chosen `weighting` (see WEIGHTINGS) for one tensor."""
    if weighting == "paper":
        return nan_weights(norms, priors, temperature, base_norm)
    if weighting in ("shrink_median", "shrink_geomean"):
        return shrink_weights(norms, priors, temperature, base_norm, reference=weighting.removeprefix("shrink_"))
    raise ValueError(f"NAN parameter `weighting` must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")


def _checked(norms: Sequence[float], priors: Optional[Sequence[float]]) -> Tuple[tuple, tuple]:
    norms = tuple(float(n) for n in norms)
    priors = tuple(1.0 for _ in norms) if priors is None else tuple(float(p) for p in priors)
    if len(priors) != len(norms):
        raise ValueError(f"got {len(norms)} norms but {len(priors)} weights")
    for index, prior in enumerate(priors):
        if not (math.isfinite(prior) and prior >= 0):
            raise ValueError(f"weight #{index} is {prior!r}; NAN takes `weight` as a prior that must be >= 0")
    return norms, priors

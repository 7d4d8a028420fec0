"""NAN merging coefficients from per-model task-delta norms.

Pure Python on purpose: it knows neither mergekit nor torch, so the formula can be
read, tested and reused (benchmarks, `inspect`) on its own. One call handles one
output tensor, where there are only a handful of models; exact float64 arithmetic
in Python costs nothing next to reading the tensors.

    alpha_i = softmax_i(-ln(n_i) / T) = n_i^(-1/T) / sum_j n_j^(-1/T)
    w_i     = S * (prior_i * alpha_i) / sum_j (prior_j * alpha_j),  S = sum_j prior_j

Both sums run over the models that take part in the tensor: those whose delta is
not zero (or negligible). Everyone else gets alpha = w = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

PAPER_URL = "https://arxiv.org/abs/2505.16148"

# A delta whose norm is at most this fraction of the base tensor's norm is treated
# as "not touched" (e.g. a LoRA that never adapted that module): float32 round-off
# of an unchanged tensor sits around 1e-7 relative, real fine-tunes far above.
NEGLIGIBLE_DELTA_RATIO = 1e-6


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
    norms = tuple(float(n) for n in norms)
    priors = tuple(1.0 for _ in norms) if priors is None else tuple(float(p) for p in priors)
    if len(priors) != len(norms):
        raise ValueError(f"got {len(norms)} norms but {len(priors)} weights")
    for index, prior in enumerate(priors):
        if not (math.isfinite(prior) and prior >= 0):
            raise ValueError(f"weight #{index} is {prior!r}; NAN takes `weight` as a prior that must be >= 0")
    participating = takes_part(norms, base_norm, negligible_ratio)
    alphas = inverse_norm_softmax([n if part else 0.0 for n, part in zip(norms, participating)], temperature)
    budget = math.fsum(p for p, part in zip(priors, participating) if part)
    mass = math.fsum(p * a for p, a in zip(priors, alphas))
    if budget == 0 or mass == 0:
        weights = tuple(0.0 for _ in norms)
    else:
        weights = tuple(budget * p * a / mass for p, a in zip(priors, alphas))
    return NanWeights(norms, alphas, weights, participating)

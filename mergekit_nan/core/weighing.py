"""What NAN decides for one output tensor: norms, who takes part, coefficients, weights.

Both mergekit adapters call these functions with the tensors mergekit loaded and then
hand the chosen weights to the wrapped stock method. torch is the only dependency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_nan.core.coefficients import takes_part, weights_for
from mergekit_nan.core.norms import DeltaNorms, delta_norms, weight_norms
from mergekit_nan.core.parameters import NanConfigError, NanSettings, check_prior
from mergekit_nan.core.record import TensorRecord
from mergekit_nan.core.session import current

# tensor name -> each model's norm over that tensor's group (granularity layer/model)
GroupNorms = Mapping[str, Tuple[float, ...]]


class NonFiniteInput(ValueError):
    """NaN or Inf in an input tensor; the message names the tensor and the model."""


@dataclass(frozen=True)
class Weighing:
    """NAN's choice for one tensor. `taking_part` are the models the wrapped method is
    given (non-zero delta and weight > 0), `weights` their weights; `every_weight` has
    every model, 0 for those not taking part (for methods that must see every model)."""

    taking_part: Tuple[Hashable, ...]
    weights: Dict[Hashable, float]
    every_weight: Dict[Hashable, float]
    record: TensorRecord
    dry_run: bool

    @property
    def skip_merge(self) -> bool:
        """True when the output is the base tensor as it is (nobody takes part, or inspect)."""
        return self.dry_run or not self.taking_part


def weigh_task_vectors(
    *,
    method: str,
    wrapped_method: str,
    name: str,
    base_id: Hashable,
    base: torch.Tensor,
    models: Sequence[Tuple[Hashable, torch.Tensor]],
    priors: Sequence[float],
    settings: NanSettings,
    shared_parameters: Tuple[Tuple[str, object], ...],
    group_norms: Optional[Callable[[], GroupNorms]] = None,
    own_norms: Optional[Callable[[], Optional[DeltaNorms]]] = None,
) -> Weighing:
    """NAN weights for a task-vector method (task arithmetic, TIES, DARE, ...).

    `group_norms` gives the layer/model norms table (granularity layer/model);
    `own_norms` this tensor's ||base|| and delta norms where the caller has them already
    (the layer/model pass took them); where it is None or gives None, they are computed
    from the tensors.
    """
    ids = [model for model, _ in models]
    priors = tuple(check_prior(p, method, m, name) for m, p in zip(ids, priors))
    session = current()
    measured = None if own_norms is None else own_norms()
    if measured is None:
        with torch.no_grad():
            measured = delta_norms(base, [tensor for _, tensor in models], scratch=_scratch(session))
    deltas = measured.delta_norms
    if session is not None and session.adapter_norms:
        deltas = session.substitute_adapter_norms(ids, name, deltas)
    _refuse_non_finite(name, list(zip(ids, deltas)), base=(base_id, measured.base_norm))
    # Whether a model takes part is always decided on this tensor's own delta.
    touched = takes_part(deltas, measured.base_norm)
    if settings.granularity != "tensor":
        table = group_norms()
        if name not in table:
            raise NanConfigError(
                f"granularity: {settings.granularity} found no architecture entry for tensor {name}; "
                "use granularity: tensor for this merge"
            )
        norms = table[name]
    elif settings.norm_of == "weights":
        with torch.no_grad():
            norms = weight_norms([tensor for _, tensor in models], scratch=_scratch(session))
    else:
        norms = deltas
    chosen = _chosen(settings, [n if t else 0.0 for n, t in zip(norms, touched)], priors, name)
    record = TensorRecord(
        tensor=name,
        method=method,
        wrapped_method=wrapped_method,
        base_model=str(base_id),
        models=tuple(str(m) for m in ids),
        base_norm=measured.base_norm,
        norms=tuple(norms),
        coefficients=chosen.coefficients,
        priors=priors,
        weights=chosen.weights,
        parameters=shared_parameters,
    )
    return _decided(record, ids, chosen.participating, chosen.weights, session)


def weigh_linear(
    *,
    method: str,
    wrapped_method: str,
    name: str,
    models: Sequence[Tuple[Hashable, torch.Tensor]],
    priors: Sequence[float],
    settings: NanSettings,
    shared_parameters: Tuple[Tuple[str, object], ...],
) -> Weighing:
    """NAN weights for `linear` (no base): inverse norms of the models' own weights."""
    ids = [model for model, _ in models]
    priors = tuple(check_prior(p, method, m, name) for m, p in zip(ids, priors))
    if not any(priors):
        raise NanConfigError(
            f"{method}: every model's `weight` is 0 for tensor {name}; a weighted average needs at least one weight > 0"
        )
    session = current()
    with torch.no_grad():
        norms = weight_norms([tensor for _, tensor in models], scratch=_scratch(session))
    _refuse_non_finite(name, list(zip(ids, norms)))
    chosen = _chosen(settings, norms, priors, name)
    record = TensorRecord(
        tensor=name,
        method=method,
        wrapped_method=wrapped_method,
        base_model=None,
        models=tuple(str(m) for m in ids),
        base_norm=None,
        norms=chosen.norms,
        coefficients=chosen.coefficients,
        priors=priors,
        weights=chosen.weights,
        parameters=shared_parameters,
    )
    return _decided(record, ids, chosen.participating, chosen.weights, session)


def _chosen(settings: NanSettings, norms, priors, name: str):
    try:
        return weights_for(settings.weighting, norms, priors, settings.temperature)
    except ValueError as error:  # a budget past the float range, found only per tensor
        raise NanConfigError(f"tensor {name}: {error}") from None


def _scratch(session):
    return None if session is None else session.scratch


def _decided(record, ids, participating, weights, session) -> Weighing:
    if session is not None:
        session.add(record)
    # Models that did not change this tensor, or whose weight is 0, are not shown to
    # the wrapped method at all (so they do not vote in TIES' sign election either).
    taking = tuple(m for m, part, w in zip(ids, participating, weights) if part and w > 0)
    return Weighing(
        taking_part=taking,
        weights={m: w for m, w in zip(ids, weights) if m in taking},
        every_weight={m: (w if m in taking else 0.0) for m, w in zip(ids, weights)},
        record=record,
        dry_run=session is not None and session.dry_run,
    )


def _refuse_non_finite(name: str, norms: Sequence[Tuple[Hashable, float]], base=None) -> None:
    """Stop the merge, naming tensor and model, before NaN/Inf reaches a shard.

    A non-finite base makes every delta non-finite too, so the base alone is named."""
    if base is not None and not math.isfinite(base[1]):
        bad = [str(base[0])]
    else:
        bad = [str(model) for model, norm in norms if not math.isfinite(norm)]
    if bad:
        raise NonFiniteInput(f"NaN or Inf in tensor {name} of model {', '.join(bad)}; refusing to merge it")

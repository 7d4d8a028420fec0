"""The NAN methods for mergekit's newer method API (0.1.5: GroupMergeMethod).

Each `nan_<m>` wraps mergekit's registered `<m>` by composition: it keeps that
method's spec (parameters, defaults, input contract), makes `weight` an optional prior,
adds NAN's parameters, and for every output tensor hands the wrapped method the group
with NAN's weights (see `core.weighing`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Hashable, Literal, Optional, Sequence

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    GroupMergeMethod,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorGroup,
)
from mergekit.sparsify import RescaleNorm
from pydantic import BeforeValidator
from typing_extensions import Annotated

from mergekit_nan.adapters.mergekit_io import group_norms, measure_shares, tensor_norms
from mergekit_nan.core import parameters as nan_parameters
from mergekit_nan.core.coefficients import PAPER_URL
from mergekit_nan.core.parameters import NanSettings, base_model_needed
from mergekit_nan.core.weighing import weigh_linear, weigh_task_vectors

_TYPES = {
    "temperature": Annotated[float, BeforeValidator(lambda v: nan_parameters.check_shared("temperature", v))],
    "granularity": Annotated[
        Literal[nan_parameters.GRANULARITIES], BeforeValidator(lambda v: nan_parameters.check_shared("granularity", v))
    ],
    "norm_of": Annotated[
        Literal[nan_parameters.NORM_SOURCES], BeforeValidator(lambda v: nan_parameters.check_shared("norm_of", v))
    ],
    "weighting": Annotated[
        Literal[nan_parameters.WEIGHTINGS], BeforeValidator(lambda v: nan_parameters.check_shared("weighting", v))
    ],
}


def _nan_spec(inner: MergeMethodSpec, shared: Sequence[str]) -> MergeMethodSpec:
    """The wrapped method's spec, renamed, with `weight` optional and NAN's parameters."""
    parameters = [replace(p, default=1.0) if p.name == nan_parameters.PRIOR else p for p in inner.parameters]
    for name in shared:
        default = nan_parameters.shared_default(name, inner.name)
        description = nan_parameters.SHARED[name][1]
        parameters.append(
            ParameterSpec(name, _TYPES[name], ParameterScope.SHARED, default=default, description=description)
        )
    return MergeMethodSpec(
        name=f"nan_{inner.name}",
        parameters=tuple(parameters),
        contract=inner.contract,
        pretty_name=f"NAN + {inner.pretty_name or inner.name}",
        reference_url=PAPER_URL,
        optional_tensor_policy=inner.optional_tensor_policy,
        uses_accelerator=inner.uses_accelerator,
    )


def _shared_values(parameters: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in parameters.items() if not isinstance(v, PerInputValues)))


class NanTaskVectorMethod(GroupMergeMethod):
    """`nan_<wrapped>` for a task-vector method: NAN chooses each model's weight.
    With `sees_every_model` the wrapped method gets every model, weight 0 for those NAN
    leaves out; otherwise only the models that take part."""

    def __init__(self, wrapped: GroupMergeMethod, sees_every_model: bool = False):
        self.wrapped = wrapped
        self.sees_every_model = sees_every_model
        self.spec = _nan_spec(wrapped.spec, tuple(nan_parameters.SHARED))

    def validate_inputs(
        self,
        input_ids: Sequence[Hashable],
        base_id: Optional[Hashable] = None,
        *,
        group_name: Optional[str] = None,
    ) -> None:
        if base_id is None:
            raise ValueError(base_model_needed(self.spec.name))
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name or "<unnamed tensor>"
        base, tuned = group.base, group.non_base
        if base is None:  # direct API callers can get here without a base
            raise ValueError(f"{base_model_needed(self.spec.name)} (tensor {name} has no base input)")
        shared = _shared_values(parameters)
        settings = NanSettings.pop_from(parameters)
        ids = [entry.id for entry in tuned]
        weighing = weigh_task_vectors(
            method=self.spec.name,
            wrapped_method=self.wrapped.spec.name,
            name=name,
            base_id=base.id,
            base=base.tensor,
            models=[(entry.id, entry.tensor) for entry in tuned],
            priors=[parameters["weight"][i] for i in ids],
            settings=settings,
            shared_parameters=shared,
            group_norms=lambda: group_norms(
                name,
                base.id,
                ids,
                settings,
                base.tensor.dtype,
                base.tensor.device,
                in_hand=(base.tensor, [entry.tensor for entry in tuned]),
            ),
            own_norms=lambda: tensor_norms(
                name, base.id, ids, settings, (base.tensor, [entry.tensor for entry in tuned])
            ),
        )
        if weighing.dry_run and hasattr(self.wrapped, "consensus_method"):  # the task-arithmetic family
            measure_shares(
                name,
                base.tensor,
                [(entry.id, entry.tensor) for entry in tuned],
                [parameters["weight"][i] for i in ids],
                weighing.every_weight,
                self.wrapped.sparsification_method,
                self.wrapped.consensus_method is not None,
                {i: {k: parameters[k][i] for k in ("density", "gamma", "epsilon") if k in parameters} for i in ids},
                RescaleNorm.l1 if parameters.get("rescale") else None,
            )
        if weighing.skip_merge:
            return base.tensor
        weights = weighing.every_weight if self.sees_every_model else weighing.weights
        taking = tuple(entry for entry in tuned if entry.id in weights)
        parameters["weight"] = PerInputValues([(entry.id, weights[entry.id]) for entry in taking])
        return self.wrapped.merge_group(replace(group, entries=(base, *taking)), **parameters)


class NanLinearMethod(GroupMergeMethod):
    """`nan_linear`: mergekit's weighted average of whole models, with NAN weights from
    the inverse norms of the models' own weights (no base model)."""

    def __init__(self, wrapped: GroupMergeMethod):
        self.wrapped = wrapped
        self.spec = _nan_spec(wrapped.spec, nan_parameters.LINEAR_SHARED)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name or "<unnamed tensor>"
        shared = _shared_values(parameters)
        settings = NanSettings.pop_from(parameters)
        entries = group.entries
        weighing = weigh_linear(
            method=self.spec.name,
            wrapped_method=self.wrapped.spec.name,
            name=name,
            models=[(entry.id, entry.tensor) for entry in entries],
            priors=[parameters["weight"][entry.id] for entry in entries],
            settings=settings,
            shared_parameters=shared,
        )
        if weighing.skip_merge:  # inspect, or every tensor all zeros: their average is zero
            return entries[0].tensor
        taking = tuple(entry for entry in entries if entry.id in weighing.weights)
        (merged,) = self.wrapped(
            (replace(group, entries=taking),),
            parameters={"weight": {e.id: weighing.weights[e.id] for e in taking}, "normalize": parameters["normalize"]},
        )
        return merged


def register(wrapped_names: Sequence[str], slerp_names: Sequence[str] = ()) -> None:
    """Register nan_<name> for each task-vector method, each slerp-family method this
    mergekit has, and nan_linear; idempotent."""
    known = set(registered_names())
    for name in wrapped_names:
        if f"nan_{name}" not in known:
            registry.register(NanTaskVectorMethod(registry.get(name)))
    for name in slerp_names:
        if name in known and f"nan_{name}" not in known:
            registry.register(NanTaskVectorMethod(registry.get(name), sees_every_model=True))
    if "nan_linear" not in known:
        registry.register(NanLinearMethod(registry.get("linear")))


def registered_names() -> list:
    return [method.spec.name for method in registry.registered_methods()]


def parameter_names(method: str) -> list:
    return [p.name for p in registry.get(method).spec.parameters]

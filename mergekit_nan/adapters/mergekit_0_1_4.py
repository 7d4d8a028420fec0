"""The NAN methods for mergekit's older method API (0.1.4 and mergekit's git main).

There a method is a `MergeMethod` with `parameters()`, `tensor_parameters()` and
`make_task(...)`, which returns a graph `Task` (e.g. `GTATask`) that merges one tensor,
and methods live in `registry.REGISTERED_MERGE_METHODS`. Each `nan_<m>` wraps the
registered `<m>` by composition: planning asks the wrapped method for its task, and our
task, when it runs, computes NAN's weights and runs a copy of that task with those
weights, on the models that take part.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.graph import Task
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import ConfigParameterDef, MergeMethod

from mergekit_nan.adapters.mergekit_io import group_norms, measure_shares, tensor_norms
from mergekit_nan.core import parameters as nan_parameters
from mergekit_nan.core.coefficients import PAPER_URL
from mergekit_nan.core.parameters import NanSettings, base_model_needed
from mergekit_nan.core.session import current
from mergekit_nan.core.weighing import weigh_linear, weigh_task_vectors


def _coerced(value: Any, default: Any) -> Any:
    """A shared parameter as mergekit 0.1.5 types it (`lambda: 1` is 1.0 there), so that
    both generations record the same values."""
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class NanTask(Task[torch.Tensor]):
    """One output tensor: NAN's weights, then the wrapped method's task with them."""

    method: str
    wrapped_method: str
    linear: bool
    sees_every_model: bool  # hand the inner task every model, weight 0 for those NAN leaves out
    inner: Task
    weight_info: WeightInfo
    base_model: Optional[ModelReference]
    settings: Tuple[Tuple[str, Any], ...]  # NanSettings fields, validated at planning
    shared: Tuple[Tuple[str, Any], ...]  # every shared parameter, sorted, for the record

    def arguments(self) -> Dict[str, Task]:
        return self.inner.arguments()

    def uses_accelerator(self) -> bool:
        return self.inner.uses_accelerator()

    def group_label(self) -> Optional[str]:
        return self.inner.group_label()

    def priority(self) -> int:
        return self.inner.priority()

    def execute(self, tensors: Dict[ModelReference, torch.Tensor], **_kwargs) -> torch.Tensor:
        name = self.weight_info.name
        settings = NanSettings(**dict(self.settings))
        parameters = self.inner.tensor_parameters
        session = current()
        order = {model: index for index, model in enumerate(session.model_order if session else ())}
        # the config's model order, as mergekit 0.1.5 gives it (the loaded dict's is a hash order)
        tuned = sorted(
            ((m, t) for m, t in tensors.items() if m != self.base_model),
            key=lambda item: order.get(item[0], len(order)),
        )
        priors = [parameters[m]["weight"] for m, _ in tuned]
        if self.linear:
            weighing = weigh_linear(
                method=self.method,
                wrapped_method=self.wrapped_method,
                name=name,
                models=tuned,
                priors=priors,
                settings=settings,
                shared_parameters=self.shared,
            )
            if weighing.skip_merge:  # inspect, or every tensor all zeros: their average is zero
                return tuned[0][1]
        else:
            if self.base_model not in tensors:
                raise ValueError(f"{self.method}: the base model {self.base_model} has no tensor {name}")
            base = tensors[self.base_model]
            weighing = weigh_task_vectors(
                method=self.method,
                wrapped_method=self.wrapped_method,
                name=name,
                base_id=self.base_model,
                base=base,
                models=tuned,
                priors=priors,
                settings=settings,
                shared_parameters=self.shared,
                group_norms=lambda: group_norms(
                    name,
                    self.base_model,
                    [m for m, _ in tuned],
                    settings,
                    base.dtype,
                    base.device,
                    in_hand=(base, [t for _, t in tuned]),
                ),
                own_norms=lambda: tensor_norms(
                    name, self.base_model, [m for m, _ in tuned], settings, (base, [t for _, t in tuned])
                ),
            )
            method = getattr(self.inner, "method", None)
            if weighing.dry_run and hasattr(method, "consensus_method"):  # the task-arithmetic family
                measure_shares(
                    name,
                    base,
                    tuned,
                    priors,
                    weighing.every_weight,
                    method.sparsification_method,
                    method.consensus_method is not None,
                    {m: dict(parameters[m].items()) for m, _ in tuned},
                    getattr(self.inner, "rescale_norm", None),
                )
            if weighing.skip_merge:
                return base
        # The wrapped task sees the models that take part (or every model), in mergekit's own order.
        weights = weighing.every_weight if self.sees_every_model else weighing.weights
        keep = {m: t for m, t in tensors.items() if m == self.base_model or m in weights}
        weighted = {
            m: ImmutableMap(data={**dict(parameters[m].items()), "weight": weights[m]})
            if m in weights
            else parameters[m]
            for m in keep
            if m in parameters.data
        }
        task = self.inner.model_copy(update={"tensor_parameters": ImmutableMap(data=weighted)})
        return task.execute(tensors=keep)


class NanMethod(MergeMethod):
    """`nan_<wrapped>`: the wrapped method, with NAN choosing each model's weight."""

    def __init__(self, wrapped: MergeMethod, linear: bool = False, sees_every_model: bool = False):
        self.wrapped = wrapped
        self.linear = linear
        self.sees_every_model = sees_every_model
        self.nan_shared = nan_parameters.LINEAR_SHARED if linear else tuple(nan_parameters.SHARED)

    def name(self) -> str:
        return f"nan_{self.wrapped.name()}"

    def pretty_name(self) -> Optional[str]:
        return f"NAN + {self.wrapped.pretty_name() or self.wrapped.name()}"

    def reference_url(self) -> Optional[str]:
        return PAPER_URL

    def parameters(self):
        own = [
            ConfigParameterDef(
                name=name,
                required=False,
                default_value=nan_parameters.shared_default(name, self.wrapped.name()),
            )
            for name in self.nan_shared
        ]
        return list(self.wrapped.parameters()) + own

    def tensor_parameters(self):
        return [
            ConfigParameterDef(name=p.name, required=False, default_value=1.0) if p.name == nan_parameters.PRIOR else p
            for p in self.wrapped.tensor_parameters()
        ]

    def make_task(self, *, output_weight, tensors, parameters, tensor_parameters, base_model=None, **_kwargs) -> Task:
        if not self.linear and base_model is None:
            raise ValueError(base_model_needed(self.name()))
        settings = {name: nan_parameters.check_shared(name, parameters[name]) for name in self.nan_shared}
        defaults = {p.name: p.default_value for p in self.wrapped.parameters()}
        wrapped_parameters = {k: _coerced(v, defaults.get(k)) for k, v in parameters.items() if k not in settings}
        inner = self.wrapped.make_task(
            output_weight=output_weight,
            tensors=tensors,
            parameters=ImmutableMap(data=wrapped_parameters),
            tensor_parameters=tensor_parameters,
            base_model=base_model,
        )
        return NanTask(
            method=self.name(),
            wrapped_method=self.wrapped.name(),
            linear=self.linear,
            sees_every_model=self.sees_every_model,
            inner=inner,
            weight_info=output_weight,
            base_model=base_model,
            settings=tuple(settings.items()),
            shared=tuple(sorted({**wrapped_parameters, **settings}.items())),
        )


def accept_string_parameters() -> None:
    """mergekit 0.1.4 types config parameters as numbers only, so `granularity: layer`
    or `norm_of: weights` would not even validate (0.1.5 accepts strings). Widen its
    config models to numbers or strings, numbers first: numbers parse as before, and
    mergekit's evaluate_setting already handles strings. Idempotent."""
    from mergekit import config

    if getattr(config.MergeConfiguration, "_mergekit_nan_strings", False):
        return
    scalar = Union[float, str]
    config.ConditionalParameter.model_fields["value"].annotation = Union[scalar, List[scalar]]
    config.ConditionalParameter.model_rebuild(force=True)
    setting = Optional[
        Dict[str, Union[config.ConditionalParameter, List[config.ConditionalParameter], scalar, List[scalar]]]
    ]
    # inner models first: each rebuild takes in the schemas of the models it contains
    for model in (
        config.InputSliceDefinition,
        config.InputModelDefinition,
        config.OutputSliceDefinition,
        config.OutputModuleDefinition,
        config.MergeConfiguration,
    ):
        model.model_fields["parameters"].annotation = setting
        model.model_rebuild(force=True)
    config.MergeConfiguration._mergekit_nan_strings = True


def register(wrapped_names: Sequence[str], slerp_names: Sequence[str] = ()) -> None:
    """Register nan_<name> for each task-vector method, each slerp-family method this
    mergekit has, and nan_linear; idempotent."""
    accept_string_parameters()
    methods = registry.REGISTERED_MERGE_METHODS
    for name in wrapped_names:
        methods.setdefault(f"nan_{name}", NanMethod(methods[name]))
    for name in slerp_names:
        if name in methods:
            methods.setdefault(f"nan_{name}", NanMethod(methods[name], sees_every_model=True))
    methods.setdefault("nan_linear", NanMethod(methods["linear"], linear=True))


def registered_names() -> list:
    return list(registry.REGISTERED_MERGE_METHODS)


def parameter_names(method: str) -> list:
    found = registry.REGISTERED_MERGE_METHODS[method]
    return [p.name for p in list(found.parameters()) + list(found.tensor_parameters())]

"""NAN merge methods: mergekit's task-vector methods with per-tensor NAN weights.

Each `nan_<name>` wraps mergekit's registered `<name>` by composition. It keeps
that method's spec (sparsification, consensus, normalize, rescale, lambda, their
defaults), adds `temperature`, makes `weight` an optional prior (default 1), and
for every output tensor replaces the weights with NAN's before handing the group
to the wrapped method. Everything else - lazy loading, dtype handling, device
offload, writing - stays mergekit's.

The last line of this module registers the methods. The import hook imports this
module and nothing else, so registration happens once it is fully defined, in
whatever order mergekit and this plugin are imported.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import replace
from typing import Any, Hashable, Literal, Optional, Sequence

import torch
from pydantic import BeforeValidator
from typing_extensions import Annotated

from mergekit.io import tensor_writer
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    GroupMergeMethod,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorGroup,
)
from mergekit_nan import prepass, record
from mergekit_nan.coefficients import PAPER_URL, check_temperature, nan_weights, takes_part
from mergekit_nan.norms import delta_norms, weight_norms

WRAPPED_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)

Temperature = Annotated[float, BeforeValidator(check_temperature)]

# Set by `inspect`: compute and record the coefficients, skip the merge itself.
_dry_run = False
# Also by `inspect`: LoRA references on the merge's base -> {tensor: ||s B A||}, so
# that their deltas are never materialized (their loader serves the base's tensors).
_adapter_norms: dict = {}


@contextlib.contextmanager
def dry_run(adapter_norms=None):
    global _dry_run, _adapter_norms
    _dry_run, _adapter_norms = True, dict(adapter_norms or {})
    try:
        yield
    finally:
        _dry_run, _adapter_norms = False, {}


def with_adapter_norms(models, name, measured):
    """`measured` delta norms of tensor `name`, each replaced by a dry run's adapter
    norm where that model is an adapter read from its files (0.0 if it lacks `name`)."""
    return tuple(
        n if (norms := _adapter_norms.get(model)) is None else norms.get(name, 0.0)
        for model, n in zip(models, measured)
    )


def _nan_spec(inner: MergeMethodSpec, *extra: ParameterSpec) -> MergeMethodSpec:
    """The wrapped method's spec, renamed, with `weight` optional and NAN's parameters."""
    parameters = [replace(p, default=1.0) if p.name == "weight" else p for p in inner.parameters]
    parameters.append(
        ParameterSpec(
            "temperature",
            Temperature,
            ParameterScope.SHARED,
            default=1.0,
            description="NAN softmax temperature: alpha_i ∝ norm_i^(-1/T)",
        )
    )
    return MergeMethodSpec(
        name=f"nan_{inner.name}",
        parameters=tuple(parameters) + extra,
        contract=inner.contract,
        pretty_name=f"NAN + {inner.pretty_name or inner.name}",
        reference_url=PAPER_URL,
        optional_tensor_policy=inner.optional_tensor_policy,
        uses_accelerator=inner.uses_accelerator,
    )


class NanMergeMethod(GroupMergeMethod):
    """`nan_<wrapped>`: the wrapped method, with NAN choosing each model's weight."""

    def __init__(self, wrapped: GroupMergeMethod):
        self.wrapped = wrapped
        self.spec = _nan_spec(
            wrapped.spec,
            ParameterSpec(
                "granularity",
                Literal["tensor", "layer", "model"],
                ParameterScope.SHARED,
                default="tensor",
                description="take each model's norm per tensor, per transformer block or over the model",
            ),
            ParameterSpec(
                "norm_of",
                Literal["delta", "weights"],
                ParameterScope.SHARED,
                default="delta",
                description="norm of the task delta (default) or of the fine-tuned weights themselves",
            ),
        )

    def validate_inputs(
        self,
        input_ids: Sequence[Hashable],
        base_id: Optional[Hashable] = None,
        *,
        group_name: Optional[str] = None,
    ) -> None:
        if base_id is None:
            raise ValueError(
                f"{self.spec.name} needs `base_model:` in the config: NAN weighs each "
                "model by the norm of its task delta (model minus base)"
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name or "<unnamed tensor>"
        base = group.base
        tuned = group.non_base
        if base is None:  # direct API callers can get here without a base
            raise ValueError(f"{self.spec.name} needs a base input for tensor {name}")
        shared = tuple(sorted((k, v) for k, v in parameters.items() if not isinstance(v, PerInputValues)))
        temperature = parameters.pop("temperature")
        granularity = parameters.pop("granularity")
        norm_of = parameters.pop("norm_of")
        priors = [parameters["weight"][entry.id] for entry in tuned]
        _check_priors(self.spec.name, name, tuned, priors)

        with torch.no_grad():
            measured = delta_norms(base.tensor, [entry.tensor for entry in tuned])
        if _adapter_norms:
            measured = replace(measured, delta_norms=with_adapter_norms(
                [e.id for e in tuned], name, measured.delta_norms))
        _refuse_non_finite(name, base, tuned, measured.base_norm, measured.delta_norms)
        # Whether a model takes part is always decided on this tensor's own delta.
        taking = takes_part(measured.delta_norms, measured.base_norm)
        norms = self._coefficient_norms(group, measured.delta_norms, granularity, norm_of)
        chosen = nan_weights([n if t else 0.0 for n, t in zip(norms, taking)], priors, temperature)
        record.add(
            record.TensorRecord(
                tensor=name,
                method=self.spec.name,
                wrapped_method=self.wrapped.spec.name,
                base_model=str(base.id),
                models=tuple(str(entry.id) for entry in tuned),
                base_norm=measured.base_norm,
                norms=tuple(norms),
                coefficients=chosen.coefficients,
                priors=tuple(priors),
                weights=chosen.weights,
                parameters=shared,
            )
        )

        # Models that did not change this tensor take no part: the wrapped method
        # sees only the base and the rest (so TIES' sign vote ignores them too).
        taking_part = [e for e, part in zip(tuned, chosen.participating) if part]
        if not taking_part or _dry_run:
            return base.tensor
        weights = dict(zip((e.id for e in tuned), chosen.weights))
        parameters["weight"] = PerInputValues([(e.id, weights[e.id]) for e in taking_part])
        return self.wrapped.merge_group(
            replace(group, entries=(base, *taking_part)), **parameters
        )

    @staticmethod
    def _coefficient_norms(group, delta_norms_, granularity, norm_of):
        """The norms NAN weighs by: of deltas or weights, per tensor, block or model."""
        tuned = group.non_base
        if granularity == "tensor":
            if norm_of == "delta":
                return delta_norms_
            with torch.no_grad():
                return weight_norms([entry.tensor for entry in tuned])
        base = group.base.tensor
        table = prepass.group_norms(
            group.base.id, [e.id for e in tuned], granularity, norm_of, base.dtype, base.device
        )
        name = group.metadata.name
        if name not in table:
            raise ValueError(
                f"granularity: {granularity} found no architecture entry for tensor {name}; "
                "use granularity: tensor for this merge"
            )
        return table[name]


class NanLinearMerge(GroupMergeMethod):
    """`nan_linear`: mergekit's weighted average of whole models, with NAN weights.

    No base model: each model is weighed by the inverse norm of its own weights for
    the tensor ("applied directly on raw model weights" in the paper).
    """

    def __init__(self, wrapped):
        self.wrapped = wrapped
        self.spec = _nan_spec(wrapped.spec)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name or "<unnamed tensor>"
        temperature = parameters.pop("temperature")
        entries = group.entries
        priors = [parameters["weight"][entry.id] for entry in entries]
        _check_priors(self.spec.name, name, entries, priors)
        with torch.no_grad():
            norms = weight_norms([entry.tensor for entry in entries])
        bad = [str(e.id) for e, n in zip(entries, norms) if not math.isfinite(n)]
        if bad:
            raise ValueError(f"NaN or Inf in tensor {name} of model {', '.join(bad)}; refusing to merge it")
        chosen = nan_weights(norms, priors, temperature)
        record.add(
            record.TensorRecord(
                tensor=name,
                method=self.spec.name,
                wrapped_method=self.wrapped.spec.name,
                base_model=None,
                models=tuple(str(entry.id) for entry in entries),
                base_norm=None,
                norms=chosen.norms,
                coefficients=chosen.coefficients,
                priors=tuple(priors),
                weights=chosen.weights,
                parameters=(("normalize", parameters["normalize"]), ("temperature", temperature)),
            )
        )
        taking_part = [e for e, part in zip(entries, chosen.participating) if part]
        if not taking_part or _dry_run:  # all-zero tensors average to zero
            return entries[0].tensor
        weights = {e.id: w for e, w in zip(entries, chosen.weights) if w}
        (merged,) = self.wrapped(
            (replace(group, entries=tuple(taking_part)),),
            parameters={"weight": weights, "normalize": parameters["normalize"]},
        )
        return merged


def _check_priors(method, name, entries, priors) -> None:
    for entry, prior in zip(entries, priors):
        if not (math.isfinite(prior) and prior >= 0):
            raise ValueError(
                f"{method}: `weight` of model {entry.id} for tensor {name} "
                f"is {prior}; NAN takes it as a prior share, which must be >= 0"
            )


def _refuse_non_finite(name, base, tuned, base_norm, norms) -> None:
    """Stop the merge, naming tensor and model, before NaN/Inf reaches a shard."""
    if not math.isfinite(base_norm):
        culprit = base.id
    else:
        bad = [entry.id for entry, norm in zip(tuned, norms) if not math.isfinite(norm)]
        if not bad:
            return
        culprit = ", ".join(str(b) for b in bad)
    raise ValueError(
        f"NaN or Inf in tensor {name} of model {culprit}; refusing to merge it "
        "(the output directory holds no finished model)"
    )


def _record_merges_to_disk() -> None:
    """Save the coefficient record beside every model mergekit writes.

    TensorWriter is created when a merge starts writing and finalized once every
    tensor is saved, so it brackets exactly one merge. Merges that use no NAN
    method leave no record and no file.
    """
    writer = tensor_writer.TensorWriter
    if getattr(writer, "_nan_recording", False):
        return
    original_init, original_finalize = writer.__init__, writer.finalize

    def __init__(self, out_path, *args, **kwargs):
        original_init(self, out_path, *args, **kwargs)
        prepass.clear()  # layer/model norms are per merge
        self._nan_records = record.start()

    def finalize(self):
        original_finalize(self)
        records = record.stop(getattr(self, "_nan_records", None))
        if records:
            document = record.to_json(records)
            record.write(document, os.path.join(self.out_path, record.RECORD_FILENAME))
            _extend_next_model_card(document)

    writer.__init__, writer.finalize = __init__, finalize
    writer._nan_recording = True


_pending_card_section = None


def _extend_next_model_card(document) -> None:
    """Append a NAN section to the card run_merge writes right after the tensors.

    run_merge binds generate_card when mergekit.merge is imported, so wrap it there,
    once; by the time a writer finalizes, that module is fully loaded.
    """
    global _pending_card_section
    import sys

    merge_module = sys.modules.get("mergekit.merge")
    if merge_module is None:
        return
    # No heatmap here: importing matplotlib and drawing costs ~2 s per merge;
    # `mergekit-nan inspect --out` draws it on request.
    _pending_card_section = record.card_section(document)
    original = merge_module.generate_card
    if getattr(original, "_nan_card", False):
        return

    def generate_card(*args, **kwargs):
        global _pending_card_section
        card = original(*args, **kwargs)
        section, _pending_card_section = _pending_card_section, None
        return card + section if section else card

    generate_card._nan_card = True
    merge_module.generate_card = generate_card


def register_methods() -> None:
    """Register every nan_* method; calling it again changes nothing."""
    known = {method.spec.name for method in registry.registered_methods()}
    for name in WRAPPED_METHODS:
        if f"nan_{name}" not in known:
            registry.register(NanMergeMethod(registry.get(name)))
    if "nan_linear" not in known:
        registry.register(NanLinearMerge(registry.get("linear")))
    _record_merges_to_disk()


register_methods()

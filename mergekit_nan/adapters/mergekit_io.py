"""Reading through mergekit, the same in both API generations: the layer/model norms,
the architecture's tensor groups, and `inspect`'s planning.

The layer/model norms are taken through mergekit's own loading (`LoadTensor`: lazy
loading, aliases, tied names, the LoRA merge cache, and in mergekit 0.1.5 the
conversion of a checkpoint's per-expert tensors into the fused ones it plans), a few
tensors in memory at a time, a group at a time, the first time a tensor task asks for a
norm of that group; the results are kept in the merge's session, and other executor
threads wait for a group being measured.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import tqdm

from mergekit_nan.core.groups import GroupNorms, GroupNormSum
from mergekit_nan.core.norm_cache import DELTA, WEIGHT
from mergekit_nan.core.norms import DeltaNorms, delta_norms, weight_norms
from mergekit_nan.core.parameters import NanConfigError, NanSettings
from mergekit_nan.core.session import current
from mergekit_nan.core.shares import tensor_shares


def group_norms(
    name: str,
    base,
    models: Sequence,
    settings: NanSettings,
    dtype: torch.dtype,
    device: torch.device,
    in_hand: Optional[InHand] = None,
) -> GroupNorms:
    """{`name`: each model's norm over the group of tensor `name`}, or {} where mergekit's
    architecture info has no entry for `name`. `in_hand`: tensor `name` of the base and
    of each model as mergekit loaded it for this merge, used instead of a second copy."""
    norms = _norm_pass(base, models, settings, dtype, device).norms_of(name, in_hand)
    return {} if norms is None else {name: norms}


def tensor_norms(name: str, base, models: Sequence, settings: NanSettings, in_hand: InHand) -> Optional[DeltaNorms]:
    """Tensor `name`'s ||base|| and delta norms as the layer/model pass took them (from
    the same stored tensors, or the norm cache); None where the pass has none to vouch
    for, and the merge computes them from `in_hand`, the tensors mergekit loaded for it."""
    base_tensor, tensors = in_hand
    if settings.granularity == "tensor" or any(t.shape != base_tensor.shape for t in tensors):
        return None
    return _norm_pass(base, models, settings, base_tensor.dtype, base_tensor.device).tensor_norms(name, in_hand)


def _norm_pass(base, models: Sequence, settings: NanSettings, dtype: torch.dtype, device: torch.device) -> NormPass:
    """The merge's pass over these inputs (one per session; a new one without a session)."""
    key = (base, tuple(models), settings.granularity, settings.norm_of, dtype, str(device))
    session = current()

    def start() -> NormPass:
        return NormPass(base, tuple(models), settings, dtype, device)

    return start() if session is None else session.group_norms(key, start)


InHand = Tuple[torch.Tensor, Sequence[torch.Tensor]]  # one tensor of the base and of each model


@dataclass(frozen=True)
class PlannedTensor:
    """A weight of mergekit's architecture info: its group, and what mergekit's loader
    needs to find it in a checkpoint."""

    group: str
    aliases: Tuple[str, ...] = ()
    tied_names: Tuple[str, ...] = ()
    optional: bool = False  # mergekit merges the others without it where a model lacks it


def tensor_groups(base, granularity: str) -> Dict[str, PlannedTensor]:
    """{tensor name: PlannedTensor} for the base's architecture: a block's weights share
    `layer N`; weights outside blocks (embeddings, final norm, head) are groups of their
    own; with `model`, one group. The names are the ones mergekit plans and merges (in
    mergekit 0.1.5 the fused expert tensors of transformers 5, whatever the checkpoint
    stores)."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.io.tasks import LoaderCache

    config = base.config(trust_remote_code=LoaderCache().trust_remote_code)
    arch = arch_info_for_config(config)
    if arch is None:
        raise NanConfigError(
            f"granularity: {granularity} needs mergekit's architecture info for {base}, "
            f"which has none for {config.architectures}; use granularity: tensor"
        )
    groups = {}
    for module_name, module in arch.modules.items():
        prefix = module.weight_prefix or ""
        architecture = module.architecture

        def planned(weight, group: str) -> PlannedTensor:
            return PlannedTensor(
                group="model" if granularity == "model" else group,
                aliases=tuple(weight.aliases or ()),
                tied_names=tuple(getattr(weight, "tied_names", None) or ()),
                optional=bool(weight.optional),
            )

        for weight in architecture.pre_weights(config) + architecture.post_weights(config):
            groups[prefix + weight.name] = planned(weight, prefix + weight.name)
        for index in range(architecture.num_layers(config)):
            label = f"{module_name} layer {index}" if len(arch.modules) > 1 else f"layer {index}"
            for weight in architecture.layer_weights(index, config):
                groups[prefix + weight.name] = planned(weight, label)
    return groups


class NormPass:
    """The layer or model norms of one merge's inputs (`base`, `models`), a group at a time.

    With `layer`, a block is measured when the first of its tensors merges: mergekit
    sorts its schedule by stored tensor name, so a dense block's tensors merge together,
    the block's tensors read here are still in the page cache when mergekit loads them,
    and inputs larger than memory are not read from disk twice. `model` has one group,
    which needs every tensor before the first one merges. The tensor whose merge asks is
    in memory already and is not loaded again; the others are loaded one tensor at a time
    (the base's and every model's, as mergekit holds them to merge that tensor).

    Where the merge's inputs are the stored tensors (`MergeSession.inputs_as_stored`),
    each tensor's norms are also the ones its merge needs (`tensor_norms`), and they are
    read from and kept in the session's norm cache: a tensor whose norms are all cached
    is not loaded at all.
    """

    def __init__(self, base, models: Tuple, settings: NanSettings, dtype: torch.dtype, device: torch.device):
        self.base, self.models, self.settings = base, models, settings
        self.dtype, self.device = dtype, device
        self.plan = tensor_groups(base, settings.granularity)
        self.members: Dict[str, List[str]] = {}
        for name, planned in self.plan.items():
            self.members.setdefault(planned.group, []).append(name)
        # stored keys (base, *models) -> MeasuredTensor: a tied tensor is read once,
        # whichever groups it belongs to
        self._measured: Dict[Tuple[Hashable, ...], MeasuredTensor] = {}
        self._groups: Dict[str, Tuple[float, ...]] = {}
        self._lock = threading.Lock()
        session = current()
        self._stored_inputs = session is not None and session.inputs_as_stored
        self._cache = session.norm_cache if self._stored_inputs else None

    def norms_of(self, name: str, in_hand: Optional[InHand] = None) -> Optional[Tuple[float, ...]]:
        """Each model's norm over the group of `name` (None: not in the architecture)."""
        planned = self.plan.get(name)
        if planned is None:
            return None
        with self._lock:
            if planned.group not in self._groups:
                self._groups[planned.group] = self._measure(planned.group, {name: in_hand} if in_hand else {})
            return self._groups[planned.group]

    def tensor_norms(self, name: str, in_hand: InHand) -> Optional[DeltaNorms]:
        """Tensor `name`'s own ||base|| and delta norms, as its merge would compute them
        from `in_hand`; None where the pass cannot vouch for them (inputs that are not
        the stored tensors, weight norms, a tensor outside the architecture)."""
        if not self._stored_inputs or self.settings.norm_of != "delta" or self.norms_of(name, in_hand) is None:
            return None
        with self._lock:
            measured = self._measured[self._keys(name)]
        if measured.base_norm is None or None in measured.norms:
            return None
        return DeltaNorms(base_norm=measured.base_norm, delta_norms=tuple(measured.norms))

    def _keys(self, name: str) -> Tuple[Hashable, ...]:
        return tuple(_stored_key(model, name, self.plan[name]) for model in (self.base, *self.models))

    def _measure(self, group: str, in_hand: Dict[str, InHand]) -> Tuple[float, ...]:
        members = self.members[group]
        keys = {name: self._keys(name) for name in members}
        # `model`: read in the reverse of mergekit's schedule (tensors sorted by stored
        # name), so that what the merge loads first was read last and is the likeliest to
        # be still in the page cache when the inputs are larger than memory. A block fits
        # in memory: read it in the schedule's order, so that the kernel's read-ahead runs
        # on into the next block while mergekit merges this one.
        reverse = self.settings.granularity == "model"
        reading = sorted(members, key=lambda name: str(keys[name][0]), reverse=reverse)
        for name in tqdm.tqdm(reading, desc=f"NAN norms, {group}", leave=False, disable=len(members) < 100):
            if keys[name] not in self._measured:
                self._measured[keys[name]] = self._norms(name, keys[name], in_hand.get(name))
        total = GroupNormSum(len(self.models))
        for name in members:  # summed in the architecture's order, whatever the reading order
            total.add(keys[name][1:], self._measured[keys[name]].norms)
        return total.norms()

    def _norms(self, name: str, stored: Tuple[Hashable, ...], in_hand: Optional[InHand]) -> MeasuredTensor:
        """Tensor `name`'s norms as mergekit loads it: the cached ones, the others computed
        (None where a model lacks an optional tensor, or its tensor is misshapen or not
        floating point)."""
        deltas = self.settings.norm_of == "delta"
        kind = DELTA if deltas else WEIGHT
        files = [
            _source_file(model, key) if self._cache else None for model, key in zip((self.base, *self.models), stored)
        ]

        def entry(kind: str, index: int, *more) -> tuple:
            """(the cache's key of model `index`'s norm, the norm cached there or None)."""
            key = (kind, str(stored[index]), (files[index], *more), str(self.dtype), self.device.type)
            found = self._cache.get(*key) if self._cache and None not in key[2] else None
            return key, found

        base_entry = entry(WEIGHT, 0) if deltas else (None, None)
        entries = [entry(kind, index, *((files[0],) if deltas else ())) for index in range(1, len(stored))]
        base_norm, norms = base_entry[1], [found for _, found in entries]
        missing = [index for index, value in enumerate(norms) if value is None]
        if not missing and (base_norm is not None or not deltas):
            return self._finished(name, base_norm, norms)

        base_tensor = in_hand[0] if in_hand else self._load(self.base, name)
        if base_tensor is None or not base_tensor.is_floating_point():
            return MeasuredTensor(None, [None] * len(self.models))
        tensors = {}
        for index in missing:
            tensor = in_hand[1][index] if in_hand else self._load(self.models[index], name)
            if tensor is not None and tensor.shape == base_tensor.shape and tensor.is_floating_point():
                tensors[index] = tensor
        session = current()
        scratch = session and session.scratch
        with torch.no_grad():
            if deltas:
                measured = delta_norms(base_tensor, list(tensors.values()), scratch=scratch)
                computed = dict(zip(tensors, measured.delta_norms))
                if base_norm is None:
                    base_norm = measured.base_norm
                    self._kept(base_entry[0], base_norm)
            else:
                computed = dict(zip(tensors, weight_norms(list(tensors.values()), scratch=scratch)))
        for index in missing:
            norms[index] = computed.get(index)
            if norms[index] is not None:
                self._kept(entries[index][0], norms[index])
        return self._finished(name, base_norm, norms)

    def _finished(self, name: str, base_norm: Optional[float], norms: List[Optional[float]]) -> MeasuredTensor:
        """The norms of `name`, with a LoRA's adapter norm where inspect reads one from its files."""
        session = current()
        if self.settings.norm_of == "delta" and session is not None and session.adapter_norms:
            norms = [
                n if n is None else session.substitute_adapter_norms([model], name, (n,))[0]
                for model, n in zip(self.models, norms)
            ]
        return MeasuredTensor(base_norm, norms)

    def _kept(self, key: Optional[tuple], value: float) -> None:
        if self._cache is not None and key is not None and None not in key[2]:
            self._cache.put(*key, value)

    def _load(self, model, name: str) -> Optional[torch.Tensor]:
        """Tensor `name` of `model` as mergekit's merge loads it, in the pass's dtype; None
        for an optional tensor the model lacks or a tensor that is not floating point."""
        from mergekit.io.tasks import LoadTensor

        planned = self.plan[name]
        tensor = LoadTensor(
            model=model,
            tensor=name,
            device=str(self.device),
            optional=True,
            aliases=planned.aliases or None,
            tied_names=planned.tied_names or None,
        ).execute()
        if tensor is None:
            if planned.optional:
                return None
            also = ", ".join((*planned.aliases, *planned.tied_names))
            raise NanConfigError(
                f"granularity: {self.settings.granularity}: model {model} has no tensor {name}"
                f"{f' (nor {also})' if also else ''}, which mergekit's architecture info plans for it"
            )
        return tensor.to(self.dtype) if tensor.is_floating_point() else None


@dataclass
class MeasuredTensor:
    """One stored tensor's norms: ||base|| (None unless delta norms are taken) and each
    model's norm (None where it does not count)."""

    base_norm: Optional[float]
    norms: List[Optional[float]]


def _source_file(model, key: Hashable) -> Optional[str]:
    """The checkpoint file `model` reads stored tensor `key` from (None: not stored as such)."""
    from mergekit.io.tasks import LoaderCache

    index = LoaderCache().get(model).index
    shard = index.tensor_paths.get(key)
    return None if shard is None else os.path.join(index.base_path, shard)


def _stored_key(model, name: str, planned: PlannedTensor) -> Hashable:
    """What `model` stores tensor `name` under, as mergekit's loader resolves it: the
    first of the name, its aliases and its tied names in the checkpoint; otherwise `name`
    itself (a tensor mergekit 0.1.5 converts from other stored ones, such as fused
    experts, or one the model lacks)."""
    from mergekit.io.tasks import LoaderCache

    index = LoaderCache().get(model).index.tensor_paths
    return next((key for key in (name, *planned.aliases, *planned.tied_names) if key in index), name)


def adapters_on_base(merge_config) -> Dict[Any, Dict[str, Any]]:
    """LoRA references on the merge's own base: their deltas (`core.lora.LowRankDelta`
    per tensor), read from the adapter files.

    Their loaders are pointed at the base model, so mergekit never merges them into a
    full model (no --lora-merge-cache entry); the NAN methods substitute the adapter's
    ||s B A|| for the (zero) measured delta, and the shares its entries. Call before
    planning touches any loader.
    """
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache

    from mergekit_nan.core.lora import adapter_deltas

    base = merge_config.base_model
    if base is None or base.lora is not None:
        return {}
    found = {}
    for model in merge_config.referenced_models():
        if model.lora is not None and model.model == base.model:
            found[model] = adapter_deltas(model.lora.path)
            cache = LoaderCache()
            cache.loaders[model] = cache.get(ModelReference(model=model.model))
    return found


def run_tensor_tasks(merge_config, options) -> None:
    """Plan `merge_config` as mergekit-yaml would and run only its tensor merge tasks
    (nothing is written); the current session collects what the NAN methods record."""
    from mergekit.architecture import get_architecture_info
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    if not merge_config.models and not merge_config.slices and not merge_config.modules:
        raise RuntimeError("No output requested")
    arch_info = get_architecture_info(merge_config, options)
    LoaderCache().setup(options=options)
    out_config = _model_out_config(merge_config, arch_info, trust_remote_code=options.trust_remote_code)
    planner = MergePlanner(merge_config, arch_info, options=options, out_model_config=out_config)
    # plan_in_memory() would add tasks that return whole tensors (and in mergekit 0.1.5
    # it cannot be built), so take the per-tensor merge tasks straight from the plan.
    planner._plan()
    executor = Executor(
        targets=[task for _, task in planner._tensors],
        math_device=options.device,
        storage_device=options.device if options.low_cpu_memory else "cpu",
    )
    for _ in executor.run(quiet=options.quiet):
        pass


# mergekit names outside its public API that run_tensor_tasks relies on (a test checks them).
PRIVATE_NAMES = {
    "mergekit.merge": ("_model_out_config",),
    "mergekit.plan": ("MergePlanner._plan", "MergePlanner._tensors (set by __init__)"),
}


RANDOM_TRIMS = ("random", "della_magprune")  # mergekit sparsifications that draw a random mask


def measure_shares(
    name: str,
    base: torch.Tensor,
    tuned: Sequence[Tuple[Any, torch.Tensor]],
    priors: Sequence[float],
    nan_weights: Dict[Any, float],
    sparsification,
    consensus: bool,
    trim_parameters: Dict[Any, Dict[str, Any]],
    rescale_norm,
) -> None:
    """For inspect: what the config's weights and NAN's do to this tensor of the merge
    (`core.shares`), trimmed by mergekit's own sparsification, kept in the session."""
    session = current()
    if session is None or not session.measure_shares or not tuned:  # a config of the base alone: nothing to share
        return
    models = [model for model, _ in tuned]
    # a LoRA on the base is loaded as the base itself (adapters_on_base): take its delta from the adapter
    deltas = [session.adapters.get(model, {}).get(name, tensor) for model, tensor in tuned]
    trim = None
    if sparsification is not None:
        from mergekit.sparsify import sparsify

        def trim(index: int, values: torch.Tensor) -> torch.Tensor:
            own = trim_parameters[models[index]]
            extra = {key: own[key] for key in ("gamma", "epsilon") if key in own}
            return sparsify(values, density=own["density"], method=sparsification, rescale_norm=rescale_norm, **extra)

    method_name = getattr(sparsification, "value", sparsification)
    session.add_shares(
        tensor_shares(
            name,
            models,
            base,
            deltas,
            {"stock": list(priors), "nan": [nan_weights.get(m, 0.0) for m in models]},
            trim,
            election=consensus,
            randomized=method_name in RANDOM_TRIMS,
        )
    )

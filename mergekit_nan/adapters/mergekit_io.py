"""Reading through mergekit, the same in both API generations: the layer/model pre-pass,
the architecture's tensor groups, and `inspect`'s planning.

The pre-pass runs the first time a tensor task asks for layer or model norms: one
streaming pass over the inputs through mergekit's own loaders (lazy loading, LoRA merge
cache, a few tensors in memory at a time), cached in the merge's session for the rest of
the merge; other executor threads wait for it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import tqdm

from mergekit_nan.core.groups import GroupNorms, GroupNormSums
from mergekit_nan.core.norms import delta_norms, weight_norms
from mergekit_nan.core.parameters import NanConfigError, NanSettings
from mergekit_nan.core.session import current


def group_norms(base, models: Sequence, settings: NanSettings, dtype: torch.dtype, device: torch.device) -> GroupNorms:
    """Per tensor name, each model's norm over the tensor's group (once per merge)."""
    key = (base, tuple(models), settings.granularity, settings.norm_of, dtype, str(device))
    session = current()

    def compute() -> GroupNorms:
        return _compute(base, tuple(models), settings, dtype, device)

    return compute() if session is None else session.group_norms(key, compute)


def tensor_groups(base, granularity: str) -> Dict[str, Tuple[str, Tuple[str, ...]]]:
    """{tensor name: (group label, other names it may be stored under)} for the base's
    architecture: a block's weights share `layer N`; weights outside blocks (embeddings,
    final norm, head) are groups of their own; with `model`, one group."""
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

        def other_names(weight):
            return tuple(weight.aliases or ()) + tuple(getattr(weight, "tied_names", None) or ())

        for weight in architecture.pre_weights(config) + architecture.post_weights(config):
            groups[prefix + weight.name] = (prefix + weight.name, other_names(weight))
        for index in range(architecture.num_layers(config)):
            label = f"{module_name} layer {index}" if len(arch.modules) > 1 else f"layer {index}"
            for weight in architecture.layer_weights(index, config):
                groups[prefix + weight.name] = (label, other_names(weight))
    if granularity == "model":
        groups = {name: ("model", aliases) for name, (_, aliases) in groups.items()}
    return groups


def _stored_key(model, names: Sequence[str]) -> Optional[str]:
    """The checkpoint key `model` stores the first of `names` under, or None."""
    from mergekit.io.tasks import LoaderCache

    index = LoaderCache().get(model).index.tensor_paths
    return next((name for name in names if name in index), None)


def _load(model, key: Optional[str], dtype, device) -> Optional[torch.Tensor]:
    """The stored tensor `key` of `model` in `dtype`, or None (missing, or not floating point)."""
    from mergekit.io.tasks import LoaderCache

    if key is None:
        return None
    tensor = LoaderCache().get(model).get_tensor(key, device=str(device))
    return tensor.to(dtype) if tensor.is_floating_point() else None


def _compute(base, models, settings: NanSettings, dtype, device) -> GroupNorms:
    session = current()
    sums = GroupNormSums(len(models))
    measured: Dict[tuple, list] = {}  # stored keys (base, *models) -> per-model norms
    groups = tensor_groups(base, settings.granularity)
    for name, (label, aliases) in tqdm.tqdm(groups.items(), desc=f"NAN norms per {settings.granularity}", leave=False):
        names = (name, *aliases)
        keys = (_stored_key(base, names), *(_stored_key(model, names) for model in models))
        if keys not in measured:  # a tied weight is stored once and read once
            measured[keys] = _norms(base, models, keys, name, settings, dtype, device, session)
        sums.add(label, name, keys[1:], measured[keys])
    return sums.table()


def _norms(base, models, keys, name, settings, dtype, device, session) -> list:
    """Each model's norm of the stored tensors `keys` (None where absent or misshapen)."""
    per_model = [None] * len(models)
    base_tensor = _load(base, keys[0], dtype, device)
    if base_tensor is None:
        return per_model
    loaded = [_load(model, key, dtype, device) for model, key in zip(models, keys[1:])]
    present = [i for i, t in enumerate(loaded) if t is not None and t.shape == base_tensor.shape]
    tensors = [loaded[i] for i in present]
    with torch.no_grad():
        if settings.norm_of == "weights":
            norms = weight_norms(tensors, scratch=session and session.scratch)
        else:
            norms = delta_norms(base_tensor, tensors, scratch=session and session.scratch).delta_norms
            if session is not None and session.adapter_norms:
                norms = session.substitute_adapter_norms([models[i] for i in present], name, norms)
    for index, norm in zip(present, norms):
        per_model[index] = norm
    return per_model


def adapters_on_base(merge_config) -> Dict[Any, Dict[str, float]]:
    """LoRA references on the merge's own base: their norms, read from the adapter files.

    Their loaders are pointed at the base model, so mergekit never merges them into a
    full model (no --lora-merge-cache entry); the NAN methods substitute the adapter's
    ||s B A|| for the (zero) measured delta. Call before planning touches any loader.
    """
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache

    from mergekit_nan.core.lora import adapter_delta_norms

    base = merge_config.base_model
    if base is None or base.lora is not None:
        return {}
    found = {}
    for model in merge_config.referenced_models():
        if model.lora is not None and model.model == base.model:
            found[model] = adapter_delta_norms(model.lora.path)
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

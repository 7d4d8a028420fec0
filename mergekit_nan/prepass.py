"""Norms per transformer block (`granularity: layer`) or per model (`granularity: model`).

Both need every tensor's norm before the first tensor is merged. The first merge
task that asks runs one streaming pass over the inputs through mergekit's own
loaders (lazy loading, LoRA merge cache), a few tensors in memory at a time, and
caches the result for the rest of the merge; other executor threads wait for it.
Tensors map to blocks through mergekit's architecture info: each block's weights
form one group, and weights outside blocks (embeddings, final norm, head) are
groups of their own.
"""

from __future__ import annotations

import math
import threading
from typing import Dict, Optional, Sequence, Tuple

import torch

from mergekit_nan.norms import delta_norms, weight_norms

Norms = Dict[str, Tuple[float, ...]]  # tensor name -> that tensor's group norm, per model

_lock = threading.Lock()
_cache: Dict[tuple, Norms] = {}


def group_norms(
    base, models: Sequence, granularity: str, norm_of: str, dtype: torch.dtype, device: torch.device
) -> Norms:
    """Per tensor name, each model's norm over the tensor's group (cached per merge)."""
    key = (base, tuple(models), granularity, norm_of, dtype, str(device))
    with _lock:
        if key not in _cache:
            _cache[key] = _compute(base, tuple(models), granularity, norm_of, dtype, device)
        return _cache[key]


def clear() -> None:
    with _lock:
        _cache.clear()


def tensor_groups(base, granularity: str) -> Dict[str, Tuple[str, Tuple[str, ...]]]:
    """{tensor name: (group label, aliases)} for every weight of the base's architecture."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.io.tasks import LoaderCache

    config = base.config(trust_remote_code=LoaderCache().trust_remote_code)
    arch = arch_info_for_config(config)
    if arch is None:
        raise ValueError(
            f"granularity: {granularity} needs mergekit's architecture info for {base}, "
            f"which has none for {config.architectures}; use granularity: tensor"
        )
    groups = {}
    for module_name, module in arch.modules.items():
        prefix = module.weight_prefix or ""
        layered = module.architecture.num_layers(config)
        outside = module.architecture.pre_weights(config) + module.architecture.post_weights(config)
        for weight in outside:
            groups[prefix + weight.name] = (prefix + weight.name, tuple(weight.aliases or ()) + tuple(weight.tied_names or ()))
        for index in range(layered):
            for weight in module.architecture.layer_weights(index, config):
                label = f"{module_name} layer {index}" if len(arch.modules) > 1 else f"layer {index}"
                groups[prefix + weight.name] = (label, tuple(weight.aliases or ()) + tuple(weight.tied_names or ()))
    if granularity == "model":
        groups = {name: ("model", aliases) for name, (_, aliases) in groups.items()}
    return groups


def _load(model, name: str, aliases: Tuple[str, ...], dtype, device) -> Optional[torch.Tensor]:
    from mergekit.io.tasks import LoaderCache

    loader = LoaderCache().get(model)
    for candidate in (name, *aliases):
        if candidate in loader.index.tensor_paths:
            tensor = loader.get_tensor(candidate, device=str(device))
            return tensor.to(dtype) if tensor.is_floating_point() else None
    return None


def _compute(base, models, granularity, norm_of, dtype, device) -> Norms:
    import tqdm

    from mergekit_nan.methods import with_adapter_norms  # methods imports this module

    groups = tensor_groups(base, granularity)
    sums: Dict[str, list] = {}
    members: Dict[str, list] = {}
    for name, (label, aliases) in tqdm.tqdm(groups.items(), desc=f"NAN norms per {granularity}", leave=False):
        base_tensor = _load(base, name, aliases, dtype, device)
        if base_tensor is None:
            continue
        tuned = [_load(model, name, aliases, dtype, device) for model in models]
        # models whose tensor exists and matches the base's shape
        present = [i for i, t in enumerate(tuned) if t is not None and t.shape == base_tensor.shape]
        tensors = [tuned[i] for i in present]
        if norm_of == "weights":
            norms = weight_norms(tensors)
        else:
            measured = delta_norms(base_tensor, tensors).delta_norms
            norms = with_adapter_norms([models[i] for i in present], name, measured)
        totals = sums.setdefault(label, [0.0] * len(models))
        for index, norm in zip(present, norms):
            totals[index] += norm ** 2
        members.setdefault(label, []).append(name)
        del base_tensor, tuned, tensors
    return {
        name: tuple(math.sqrt(s) for s in sums[label])
        for label, names in members.items()
        for name in names
    }

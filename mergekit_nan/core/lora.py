"""The task deltas of a PEFT LoRA adapter, straight from its files.

A LoRA changes a weight by s * B @ A (B: out x r, A: r x in, s = alpha / r, or
alpha / sqrt(r) with rsLoRA; transposed with `fan_in_fan_out`). Its Frobenius norm needs
no out x in matrix: ||s B A||_F^2 = s^2 trace(B^T B A A^T) = s^2 sum((B^T B) * (A A^T)),
two r x r Grams; and any entry of it is one r-term dot product. Modules the adapter does
not touch have a zero delta.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from safetensors import safe_open

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LowRankDelta:
    """One module's delta s * B @ A (float64 factors), without its out x in matrix."""

    scale: float
    a: torch.Tensor  # r x in
    b: torch.Tensor  # out x r
    transposed: bool = False  # fan_in_fan_out: the weight stores (B @ A)^T

    def norm(self) -> float:
        squared = ((self.b.T @ self.b) * (self.a @ self.a.T)).sum().item()
        return abs(self.scale) * math.sqrt(max(squared, 0.0))

    def values(self, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The delta as the weight stores it, flattened row-major: whole, or at the flat
        coordinates `index`."""
        b, a = (self.a.T, self.b.T) if self.transposed else (self.b, self.a)  # weight = b @ a
        if index is None:
            return (self.scale * (b @ a)).reshape(-1)
        rows, cols = index // a.shape[1], index % a.shape[1]
        return self.scale * (b[rows] * a[:, cols].T).sum(1)


def adapter_deltas(adapter_dir: str) -> Dict[str, LowRankDelta]:
    """{'model.layers.0.self_attn.q_proj.weight': its LowRankDelta, ...} for every adapted module."""
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters have a B @ A delta (no DoRA or other PEFT types)")
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            match = _LORA_KEY.match(key)
            if match:
                factors.setdefault(match["module"], {})[match["which"]] = handle.get_tensor(key).double()
    deltas = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: module {module} has lora_{next(iter(pair))} but not its pair")
        rank = pair["A"].shape[0]
        alpha = _pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        deltas[module + ".weight"] = LowRankDelta(scale, pair["A"], pair["B"], bool(config.get("fan_in_fan_out")))
    return deltas


def _pattern(pattern: Dict[str, float], module: str, default: float) -> float:
    """PEFT's per-module override: the first key that names the end of the module path."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default

"""Norms per transformer block (`granularity: layer`) or per model (`granularity: model`).

A group's norm is the square root of the sum of its tensors' squared norms. Tensors map
to groups through the model architecture (the adapters read mergekit's architecture
info and load the tensors); this module only adds up. Each tensor *stored* in a
checkpoint counts once per group: a tied `lm_head.weight` that a loader serves from
`model.embed_tokens.weight` is the same stored tensor and adds nothing a second time.
"""

from __future__ import annotations

import math
from typing import Dict, Hashable, List, Optional, Sequence, Set, Tuple

GroupNorms = Dict[str, Tuple[float, ...]]  # tensor name -> its group's norm, per model


class GroupNormSum:
    """One group's squared norms summed per model, for `models` models."""

    def __init__(self, models: int):
        self._squares: List[float] = [0.0] * models
        self._counted: Set[Tuple[int, Hashable]] = set()

    def add(self, stored: Sequence[Optional[Hashable]], norms: Sequence[Optional[float]]) -> None:
        """One tensor of the group: per model, what it is stored under (None if the model
        lacks it) and its norm (None where it does not count)."""
        for index, (key, norm) in enumerate(zip(stored, norms)):
            if key is None or norm is None or (index, key) in self._counted:
                continue
            self._counted.add((index, key))
            self._squares[index] += norm * norm

    def norms(self) -> Tuple[float, ...]:
        return tuple(math.sqrt(s) for s in self._squares)

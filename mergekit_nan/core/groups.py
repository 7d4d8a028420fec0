"""Norms per transformer block (`granularity: layer`) or per model (`granularity: model`).

A group's norm is the square root of the sum of its tensors' squared norms. Tensors map
to groups through the model architecture (the adapters read mergekit's architecture
info); this module only adds up. Each tensor *stored* in a checkpoint counts once per
group: a tied `lm_head.weight` that a loader serves from `model.embed_tokens.weight`
is the same stored tensor and adds nothing a second time.
"""

from __future__ import annotations

import math
from typing import Dict, Hashable, List, Optional, Sequence, Set, Tuple

GroupNorms = Dict[str, Tuple[float, ...]]  # tensor name -> its group's norm, per model


class GroupNormSums:
    """Squared norms summed per (group, model), for `models` models."""

    def __init__(self, models: int):
        self.models = models
        self._squares: Dict[Hashable, List[float]] = {}
        self._members: Dict[Hashable, List[str]] = {}
        self._counted: Set[Tuple[Hashable, int, str]] = set()

    def add(
        self, label: Hashable, name: str, stored: Sequence[Optional[str]], norms: Sequence[Optional[float]]
    ) -> None:
        """Tensor `name` of group `label`: per model, the checkpoint key it is stored under
        (None if the model lacks it) and its norm (None where it does not count)."""
        squares = self._squares.setdefault(label, [0.0] * self.models)
        self._members.setdefault(label, []).append(name)
        for index, (key, norm) in enumerate(zip(stored, norms)):
            if key is None or norm is None or (label, index, key) in self._counted:
                continue
            self._counted.add((label, index, key))
            squares[index] += norm * norm

    def table(self) -> GroupNorms:
        return {
            name: tuple(math.sqrt(s) for s in self._squares[label])
            for label, names in self._members.items()
            for name in names
        }

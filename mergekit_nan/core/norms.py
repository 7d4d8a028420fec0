"""Frobenius norms of task deltas, chunked so that no full-size copy is ever made.

The naive `(tuned.float() - base.float()).norm()` allocates two float32 copies of
every tensor (2.5 GB each for a 152k x 4096 embedding) and runs at memory-allocator
speed. Here each tensor is walked in slices: a slice of the base is converted to
float32 once into a reused scratch buffer, each model's slice is converted into a
second one (float32 input needs no conversion), the squared difference from the base
is written over it in one pass, and summed (torch's cascade sum keeps the relative
error near 1e-8). Per-slice sums are accumulated in float64, so scratch memory is two
slices whatever the tensor size. On CPU the scratch is kept between calls (per
thread) when the caller passes a `Scratch` (a merge's session does): a fresh 4 MiB per
tensor costs page faults whenever the allocator has handed it back to the OS (measured
standalone: 90k faults, +0.1-0.2 s per pass over SmolLM2-135M and 3 fine-tunes).

float32 sums of squares can overflow (bf16 holds values up to 3e38) or underflow
(deltas below ~1e-19). Those rare tensors are recomputed in float64, which covers
every finite bf16/fp16/fp32 input.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

# Elements per slice: 2 MiB of float32 per scratch buffer fits in L2 on CPUs; on
# accelerators larger slices amortize kernel launches.
CPU_CHUNK = 1 << 19
ACCELERATOR_CHUNK = 1 << 24

# The version of this module's arithmetic: norms kept in the norm cache are served only
# to the same version, so bump it whenever a change could move a result by one bit.
NORM_KERNEL = 1

# float32 sums outside this range may have lost precision or overflowed.
_SAFE_SUMSQ = (1e-30, 1e30)

# (x - y)^2 elementwise into `out`, in one pass where a sub and a square take two:
# aten's mse_loss with reduction 0 ("none") is exactly that, rounding included
# (bit-identical sums; the norm step 3-10% faster end to end, measured).
_squared_difference = torch.ops.aten.mse_loss.out


class Scratch(threading.local):
    """Scratch slices kept between calls, a set per thread: whoever norms many tensors
    (a merge's session) owns one and passes it in. Without one, each call allocates."""

    def __init__(self):
        self.buffers = {}  # dtype -> a (2, CPU_CHUNK) tensor

    def slices(self, chunk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Two slices of `chunk` elements; on CPU the same ones at each call
        (accelerator allocators cache blocks themselves)."""
        if device.type != "cpu" or chunk > CPU_CHUNK:
            return torch.empty((2, chunk), dtype=dtype, device=device)
        if dtype not in self.buffers:
            self.buffers[dtype] = torch.empty((2, CPU_CHUNK), dtype=dtype)
        return self.buffers[dtype][:, :chunk]


@dataclass(frozen=True)
class DeltaNorms:
    base_norm: float  # ||base||_F
    delta_norms: Tuple[float, ...]  # ||tuned_i - base||_F, in input order


def delta_norms(
    base: torch.Tensor, tuned: Sequence[torch.Tensor], chunk: int = 0, scratch: Optional[Scratch] = None
) -> DeltaNorms:
    """||base|| and ||t - base|| for each t, on the tensors' own device.

    Non-finite inputs give non-finite norms; callers decide what to do about it.
    """
    for tensor in tuned:
        if tensor.shape != base.shape:
            raise ValueError(f"shape mismatch: {tuple(tensor.shape)} vs base {tuple(base.shape)}")
    flat_base = base.reshape(-1)
    flat_tuned = [t.reshape(-1) for t in tuned]
    scratch = scratch or Scratch()
    sums = _sums_of_squares(flat_base, flat_tuned, chunk, torch.float32, scratch)

    # Rescue the float32 fast path where it cannot be trusted (see module docstring).
    for index, total in enumerate(sums):
        if _SAFE_SUMSQ[0] <= total <= _SAFE_SUMSQ[1]:
            continue
        if index == 0:
            sums[0] = _rescued(flat_base, total, chunk, scratch)
        elif not torch.equal(flat_tuned[index - 1], flat_base):
            sums[index] = _sums_of_squares(flat_base, [flat_tuned[index - 1]], chunk, torch.float64, scratch)[1]
        else:
            sums[index] = 0.0
    norms = [math.sqrt(s) if s >= 0 else s for s in sums]
    return DeltaNorms(base_norm=norms[0], delta_norms=tuple(norms[1:]))


def weight_norms(
    tensors: Sequence[torch.Tensor], chunk: int = 0, scratch: Optional[Scratch] = None
) -> Tuple[float, ...]:
    """||t||_F for each tensor, sliced and rescued like delta_norms."""
    norms = []
    scratch = scratch or Scratch()
    for tensor in tensors:
        flat = tensor.reshape(-1)
        total = _sums_of_squares(flat, [], chunk, torch.float32, scratch)[0]
        total = _rescued(flat, total, chunk, scratch)
        norms.append(math.sqrt(total) if total >= 0 else total)
    return tuple(norms)


def _rescued(flat: torch.Tensor, total: float, chunk: int, scratch: Scratch) -> float:
    """A float32 sum of squares of `flat`, recomputed in float64 where it is unsafe."""
    if _SAFE_SUMSQ[0] <= total <= _SAFE_SUMSQ[1] or (total == 0 and not flat.any()):
        return total
    return _sums_of_squares(flat, [], chunk, torch.float64, scratch)[0]


def _sums_of_squares(
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    chunk: int,
    dtype: torch.dtype,
    scratch: Optional[Scratch] = None,
    on_cpu: Optional[bool] = None,
) -> list:
    """[sum(base^2), sum((t_1 - base)^2), ...] over flat tensors, slice by slice.

    `on_cpu` picks the host-side (CPU) or device-side (accelerator) accumulation;
    it follows the tensors' device unless a test forces the other path.
    """
    count = base.numel()
    device = base.device
    on_cpu = device.type == "cpu" if on_cpu is None else on_cpu
    chunk = min(count, chunk or (CPU_CHUNK if on_cpu else ACCELERATOR_CHUNK)) or 1
    base_slice, work = (scratch or Scratch()).slices(chunk, dtype, device)
    if on_cpu:
        totals = [0.0] * (len(tuned) + 1)
    else:  # stay on the device: one host sync at the end, not one per slice
        totals = torch.zeros(len(tuned) + 1, dtype=torch.float64, device=device)

    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        b = base_slice[: stop - start]
        b.copy_(base[start:stop])
        d = work[: stop - start]
        partial = [torch.mul(b, b, out=d).sum()]
        for tensor in tuned:
            x = tensor[start:stop]
            if x.dtype != dtype:  # a plain convert-copy beats mixed-dtype arithmetic (measured, bf16)
                x = d.copy_(x)
            _squared_difference(x, b, 0, out=d)
            partial.append(d.sum())
        if on_cpu:
            for index, value in enumerate(partial):
                totals[index] += value.item()
        else:
            totals += torch.stack(partial).to(torch.float64)
    return totals if on_cpu else totals.tolist()

"""Tiny real checkpoints (LLaMA architecture, safetensors, HF layout) for the tests."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch
from safetensors.torch import load_file, save_file

TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def save_llama(path: str, state: Dict[str, torch.Tensor], dtype: torch.dtype, **overrides) -> str:
    from transformers import LlamaConfig

    os.makedirs(path, exist_ok=True)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    config.architectures = ["LlamaForCausalLM"]
    config.torch_dtype = dtype
    config.save_pretrained(path)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
    return path


def base_state(seed: int = 0, **overrides) -> Dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturbed(
    state: Dict[str, torch.Tensor], scale: float, seed: int, skip: Sequence[str] = ()
) -> Dict[str, torch.Tensor]:
    """A stand-in fine-tune: base + scale * N(0, 1), leaving tensors named in `skip` untouched."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: v if any(s in k for s in skip) else v + scale * torch.randn(v.shape, generator=generator)
        for k, v in state.items()
    }


def make_family(
    root: str,
    scales: Sequence[float],
    dtype: torch.dtype = torch.float32,
    skip: Dict[int, Sequence[str]] = None,
    tied: bool = False,
) -> List[str]:
    """Write base + one fine-tune per scale under `root`; returns [base, ft1, ...] paths.

    `tied`: tie_word_embeddings, with only model.embed_tokens.weight stored (as SmolLM2 or Qwen2 do)."""
    overrides = {"tie_word_embeddings": True} if tied else {}
    base = base_state(**overrides)
    if tied:
        base.pop("lm_head.weight")
    paths = [save_llama(os.path.join(root, "base"), base, dtype, **overrides)]
    for index, scale in enumerate(scales):
        state = perturbed(base, scale, seed=100 + index, skip=(skip or {}).get(index, ()))
        paths.append(save_llama(os.path.join(root, f"ft{index}"), state, dtype, **overrides))
    return paths


def load(path: str) -> Dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))

"""Tiny mixture-of-experts checkpoints in the layout the hub stores them in (one tensor
per expert, transformers 4 names), written from shapes alone so that they are the same
under transformers 4 and 5 (transformers 5 fuses the experts when it loads them, and
mergekit 0.1.5 plans the fused names)."""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from checkpoints import perturbed
from safetensors.torch import save_file

HIDDEN, HEADS, KV_HEADS, VOCAB, LAYERS, EXPERTS = 32, 4, 2, 96, 2, 4
HEAD_DIM = HIDDEN // HEADS


def _attention(prefix: str) -> Dict[str, Tuple[int, ...]]:
    return {
        f"{prefix}input_layernorm.weight": (HIDDEN,),
        f"{prefix}post_attention_layernorm.weight": (HIDDEN,),
        f"{prefix}self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        f"{prefix}self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        f"{prefix}self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        f"{prefix}self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
    }


def _experts(prefix: str, gate: str, up: str, down: str, intermediate: int) -> Dict[str, Tuple[int, ...]]:
    """Each expert's gate and up projections (intermediate x hidden) and down projection."""
    shapes = {}
    for e in range(EXPERTS):
        shapes[f"{prefix}{e}.{gate}.weight"] = shapes[f"{prefix}{e}.{up}.weight"] = (intermediate, HIDDEN)
        shapes[f"{prefix}{e}.{down}.weight"] = (HIDDEN, intermediate)
    return shapes


def _mixtral_layer(prefix: str, intermediate: int = 48) -> Dict[str, Tuple[int, ...]]:
    return {
        **_attention(prefix),
        f"{prefix}block_sparse_moe.gate.weight": (EXPERTS, HIDDEN),
        **_experts(f"{prefix}block_sparse_moe.experts.", "w1", "w3", "w2", intermediate),
    }


def _qwen3_moe_layer(prefix: str, intermediate: int = 24) -> Dict[str, Tuple[int, ...]]:
    return {
        **_attention(prefix),
        f"{prefix}self_attn.q_norm.weight": (HEAD_DIM,),
        f"{prefix}self_attn.k_norm.weight": (HEAD_DIM,),
        f"{prefix}mlp.gate.weight": (EXPERTS, HIDDEN),
        **_experts(f"{prefix}mlp.experts.", "gate_proj", "up_proj", "down_proj", intermediate),
    }


SHARED_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=48,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    num_experts_per_tok=2,
    max_position_embeddings=64,
)


def _mixtral_config(tied: bool):
    from transformers import MixtralConfig

    config = MixtralConfig(**SHARED_CONFIG, num_local_experts=EXPERTS, tie_word_embeddings=tied)
    return config, ["MixtralForCausalLM"]


def _qwen3_moe_config(tied: bool):
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        **SHARED_CONFIG,
        moe_intermediate_size=24,
        head_dim=HEAD_DIM,
        num_experts=EXPERTS,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=tied,
    )
    return config, ["Qwen3MoeForCausalLM"]


ARCHITECTURES: Dict[str, Tuple[Callable, Callable]] = {
    "mixtral": (_mixtral_config, _mixtral_layer),
    "qwen3_moe": (_qwen3_moe_config, _qwen3_moe_layer),
}


def moe_state(architecture: str, tied: bool = False, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random float32 weights: N(0, 0.02) matrices, unit norm weights."""
    _, layer = ARCHITECTURES[architecture]
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for index in range(LAYERS):
        shapes |= layer(f"model.layers.{index}.")
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.ones(shape) if len(shape) == 1 else 0.02 * torch.randn(shape, generator=generator)
        for name, shape in sorted(shapes.items())
    }


def save_moe(path: str, architecture: str, state: Dict[str, torch.Tensor], tied: bool = False) -> str:
    make_config, _ = ARCHITECTURES[architecture]
    config, config.architectures = make_config(tied)
    config.torch_dtype = torch.float32
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
    return path


def moe_family(root: str, architecture: str, scales: Sequence[float], tied: bool = False) -> List[str]:
    """base + one fine-tune per scale (base + scale * N(0, 1)) under `root`; [base, ft0, ...]."""
    base = moe_state(architecture, tied)
    paths = [save_moe(os.path.join(root, "base"), architecture, base, tied)]
    for index, scale in enumerate(scales):
        paths.append(
            save_moe(os.path.join(root, f"ft{index}"), architecture, perturbed(base, scale, 100 + index), tied)
        )
    return paths

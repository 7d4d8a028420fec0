"""Families with one bad tensor, for the bad-input and output-folder tests."""

import os

import torch
from checkpoints import base_state, perturbed, save_llama

POISONED = "model.layers.1.mlp.up_proj.weight"


def poisoned_family(root, where, poison):
    state = base_state()
    tuned = perturbed(state, 0.01, seed=1)
    target = state if where == "base" else tuned
    target[POISONED] = target[POISONED].clone()
    target[POISONED][0, 0] = poison
    return [
        save_llama(os.path.join(root, "base"), state, torch.float32),
        save_llama(os.path.join(root, "ft"), tuned, torch.float32),
        save_llama(os.path.join(root, "other"), perturbed(base_state(), 0.02, seed=2), torch.float32),
    ]

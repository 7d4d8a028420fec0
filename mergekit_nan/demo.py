"""A real NAN merge from nothing: `mergekit-nan demo`.

Builds a tiny LLaMA-architecture model (character vocabulary), pre-trains it briefly
on a mix of three string tasks, fine-tunes one copy per task on training sets of
very different sizes (the same number of steps each, so the small set is seen many
times), merges the fine-tunes with `nan_ties` and with stock `ties` through the real
`mergekit-yaml`, and prints NAN's coefficients and each task's accuracy. No download;
about a minute on two CPU cores.
"""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

TASKS: Dict[str, Tuple[Callable[[random.Random], str], Callable[[str], str], int]] = {
    # name: (make an input, the answer, training examples)
    "reverse": (lambda r: "".join(r.choices(string.ascii_lowercase, k=r.randint(3, 6))), lambda s: s[::-1], 4000),
    "upper": (lambda r: "".join(r.choices(string.ascii_lowercase, k=r.randint(3, 6))), str.upper, 600),
    "sort": (lambda r: "".join(r.choices(string.digits, k=r.randint(3, 6))), lambda s: "".join(sorted(s)), 80),
}
STEPS, BATCH, LENGTH = 100, 32, 20
MODEL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=LENGTH,
             tie_word_embeddings=False)


def example(task: str, rnd: random.Random) -> Tuple[str, str]:
    make, answer, _ = TASKS[task]
    text = make(rnd)
    return f"{task[:3]}:{text}=", answer(text) + "\n"


def encode(prompt: str, answer: str) -> Tuple[List[int], List[int]]:
    ids = [ord(c) for c in prompt + answer][:LENGTH]
    labels = [-100] * len(prompt) + [ord(c) for c in answer]  # loss on the answer only
    pad = LENGTH - len(ids)
    return ids + [0] * pad, labels[:LENGTH] + [-100] * pad


def batches(examples, rnd: random.Random):
    while True:
        chosen = [examples[rnd.randrange(len(examples))] for _ in range(BATCH)]
        ids, labels = zip(*(encode(p, a) for p, a in chosen))
        yield torch.tensor(ids), torch.tensor(labels)


def train(model, examples, steps: int, lr: float, seed: int) -> None:
    rnd = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _, (ids, labels) in zip(range(steps), batches(examples, rnd)):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@torch.no_grad()
def accuracy(model, examples) -> float:
    """Share of test answers predicted exactly, character by character (teacher forcing)."""
    model.eval()
    ids, labels = (torch.tensor(x) for x in zip(*(encode(p, a) for p, a in examples)))
    predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    correct = ((predicted == target) | (target == -100)).all(dim=1)
    return correct.float().mean().item()


def run_demo(out: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = os.path.abspath(out)  # mergekit reads a relative 'a/b' as a hub repo
    rnd = random.Random(0)
    train_sets = {t: [example(t, rnd) for _ in range(spec[2])] for t, spec in TASKS.items()}
    test_sets = {t: [example(t, rnd) for _ in range(500)] for t in TASKS}

    started = time.time()
    print(f"[1/4] pre-training a tiny LLaMA (width {MODEL['hidden_size']}, 2 layers) on a mix of the tasks")
    config = LlamaConfig(**MODEL)
    config.architectures = ["LlamaForCausalLM"]
    base = LlamaForCausalLM(config)
    mix = [example(t, rnd) for t in TASKS for _ in range(300)]
    train(base, mix, steps=500, lr=3e-3, seed=1)
    paths = {"base": os.path.join(out, "base")}
    base.save_pretrained(paths["base"], safe_serialization=True)

    print(f"[2/4] fine-tuning one copy per task, {STEPS} steps each: "
          + ", ".join(f"{t} on {len(s)} examples" for t, s in train_sets.items()))
    models = {"base": base}
    for task, examples in train_sets.items():
        tuned = LlamaForCausalLM.from_pretrained(paths["base"])
        train(tuned, examples, steps=STEPS, lr=1e-3, seed=2)
        paths[task] = os.path.join(out, f"ft-{task}")
        tuned.save_pretrained(paths[task], safe_serialization=True)
        models[task] = tuned

    print("[3/4] merging with the real mergekit-yaml: stock ties, then nan_ties (same config)")
    for method in ("ties", "nan_ties"):
        config_path = os.path.join(out, f"{method}.yml")
        with open(config_path, "w", encoding="utf-8") as handle:
            handle.write(merge_config(method, paths))
        merged = os.path.join(out, f"merged-{method}")
        command = [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), config_path, merged, "--no-copy-tokenizer"]
        print("      $ mergekit-yaml " + " ".join(command[1:]))
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        models[method] = LlamaForCausalLM.from_pretrained(merged)

    print("[4/4] scoring\n")
    with open(os.path.join(out, "merged-nan_ties", "nan_coefficients.json"), encoding="utf-8") as handle:
        record = json.load(handle)
    from mergekit_nan.record import model_summary

    print(f"NAN coefficients over {len(record['tensors'])} tensors (temperature {record['parameters']['temperature']}):")
    print(f"  {'model':14} {'train examples':>14} {'mean |delta|':>12} {'mean coef':>9} {'min':>6} {'max':>6}")
    for row in model_summary(record):
        task = os.path.basename(row["model"]).removeprefix("ft-")
        print(f"  {task:14} {len(train_sets[task]):>14} {row['mean_norm']:>12.4f} {row['mean_coefficient']:>9.3f}"
              f" {row['min_coefficient']:>6.3f} {row['max_coefficient']:>6.3f}")
    print("\nExact-answer accuracy on 500 held-out examples per task:")
    names = ["base", "own fine-tune", "ties", "nan_ties"]
    print("  " + f"{'task':10}" + "".join(f"{n:>15}" for n in names))
    scores = {}
    for task in TASKS:
        row = [accuracy(models[m], test_sets[task]) for m in ("base", task, "ties", "nan_ties")]
        scores[task] = dict(zip(names, row))
        print("  " + f"{task:10}" + "".join(f"{v:>15.3f}" for v in row))
    mean = {n: sum(scores[t][n] for t in TASKS) / len(TASKS) for n in names}
    print("  " + f"{'mean':10}" + "".join(f"{mean[n]:>15.3f}" for n in names))
    print(f"\nDone in {time.time() - started:.0f} s. Models, configs and nan_coefficients.json are in {out}")
    return {"scores": scores, "mean": mean}


def merge_config(method: str, paths: Dict[str, str]) -> str:
    lines = [f"merge_method: {method}", f"base_model: {paths['base']}", "models:"]
    for task in TASKS:
        lines += [f"  - model: {paths[task]}", "    parameters: {weight: 1.0, density: 0.7}"]
    return "\n".join(lines + ["dtype: float32", ""])

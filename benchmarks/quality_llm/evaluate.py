"""Score a causal LM on every domain's held-out examples.

    python evaluate.py MODEL_DIR [--split test|val] [--smoke]

Per example: mean NLL (nats/token) over its target tokens (code/prose: the last 32
of 48 tokens; arith: the answer digits and the newline), and for arith exact match:
every answer token is the argmax given the true prefix (teacher forcing), which is
the same as greedy decoding producing exactly the answer and its newline.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import data
import torch
from finetune import collate, domains, target_logits

Z95 = 1.959963984540054


class Scorer:
    def __init__(self, doms: dict, split: str, pad_id: int, batch_tokens: int = 1536):
        self.split, self.names = split, list(doms)
        self.batches = {}
        for name, dom in doms.items():
            rows = list(enumerate(getattr(dom, split)))
            rows.sort(key=lambda r: len(r[1][0]))  # little padding
            batches, i = [], 0
            while i < len(rows):
                size = max(1, batch_tokens // len(rows[i][1][0]))
                chunk = rows[i : i + size]
                ids, att, pred = collate([r for _, r in chunk], pad_id)
                batches.append(([j for j, _ in chunk], ids, att, pred))
                i += size
            self.batches[name] = (len(rows), batches)

    @torch.no_grad()
    def score(self, model) -> dict[str, dict[str, torch.Tensor]]:
        """domain -> {"loss": float64 [n], "hit": bool [n] (exact-match domains)}."""
        if not isinstance(model, torch.nn.Module):
            model = load_model(model)
        model.eval()
        out = {}
        for name, (n, batches) in self.batches.items():
            loss = torch.zeros(n, dtype=torch.float64)
            hit = torch.zeros(n, dtype=torch.bool)
            for idx, ids, att, pred in batches:
                logits, targets = target_logits(model, ids, att, pred)
                nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
                right = logits.argmax(-1) == targets
                counts = pred.sum(1).tolist()
                for j, (k, c) in enumerate(zip(idx, counts)):
                    lo = sum(counts[:j])
                    loss[k] = nll[lo : lo + c].double().mean()
                    hit[k] = bool(right[lo : lo + c].all())
            out[name] = {"loss": loss}
            if name in data.EXACT:
                out[name]["hit"] = hit
        return out


def load_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def mean_ci(x: torch.Tensor) -> dict:
    """Mean and normal-approximation 95% CI over examples."""
    x = x.double()
    m = x.mean().item()
    half = Z95 * (x.std(unbiased=True).item() / math.sqrt(len(x)) if len(x) > 1 else float("nan"))
    return {"mean": m, "lo": m - half, "hi": m + half, "n": len(x)}


def macro_ci(parts: list[torch.Tensor]) -> dict:
    """Macro average over domains of per-example values (e.g. paired differences),
    with a 95% CI from the domains' independent sampling variances."""
    means = [p.double().mean().item() for p in parts]
    var = sum(p.double().var(unbiased=True).item() / len(p) for p in parts) / len(parts) ** 2
    m = sum(means) / len(means)
    half = Z95 * math.sqrt(var)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": sum(len(p) for p in parts)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--split", default="test", choices=["test", "val"])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from finetune import tokenizer

    tok = tokenizer(args.smoke)
    scorer = Scorer(domains(args.smoke, tok), args.split, tok.pad_token_id)
    t0 = time.time()
    res = scorer.score(args.model_dir)
    for name, r in res.items():
        line = f"{name:6s} loss {r['loss'].mean().item():.4f} (n={len(r['loss'])})"
        if "hit" in r:
            line += f"  exact match {100 * r['hit'].float().mean().item():.1f}%"
        print(line)
    print(f"scored in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()

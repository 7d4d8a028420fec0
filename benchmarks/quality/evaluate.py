"""Score a (merged) encoder on every task with that task's own cached head.

    python evaluate.py MODEL_DIR [--cache cache/epochs/seed0] [--split test]

MODEL_DIR is any BertForSequenceClassification directory whose encoder tensors
(`bert.*`) match the cached fine-tunes, e.g. the output of `mergekit-yaml`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from finetune import DEFAULT_CACHE, MAX_LEN, tokenizer
from safetensors.torch import load_file
from tasks import load_tasks
from transformers import BertConfig, BertForSequenceClassification

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def mean_ci(hits: dict[str, torch.Tensor], z: float = Z95) -> tuple[float, float]:
    """Macro-average accuracy over tasks and its normal-approximation half-width."""
    accs = [h.float().mean().item() for h in hits.values()]
    var = sum(a * (1 - a) / len(h) for a, h in zip(accs, hits.values())) / len(hits) ** 2
    return sum(accs) / len(accs), z * math.sqrt(var)


def paired_diff_ci(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], z: float = Z95):
    """Macro-average accuracy difference a - b on the same examples, with a paired CI."""
    diffs = [(a[t].float() - b[t].float()) for t in a]
    mean = sum(d.mean().item() for d in diffs) / len(diffs)
    var = sum(d.var(unbiased=True).item() / len(d) for d in diffs) / len(diffs) ** 2
    return mean, z * math.sqrt(var)


class Evaluator:
    """Holds pre-tokenised eval sets and heads, scores any encoder directory."""

    def __init__(
        self,
        cache_root: Path,
        split: str = "test",
        tasks=None,
        scale: float | None = None,
        batch_size: int = 64,
        limit: int | None = None,
    ):
        meta = json.loads((cache_root / "meta.json").read_text())
        self.cache_root = cache_root
        self.names = [t for t in (tasks or meta["tasks"]) if t in meta["tasks"]]
        scale = meta["recipe"]["scale"] if scale is None else scale
        task_data = load_tasks(self.names, scale)
        tok = tokenizer()
        self.batches = {}  # task -> list of (encoding, labels), sorted by token count
        for name in self.names:
            # the split is a seeded shuffle, so its first `limit` examples are a random subset
            examples = getattr(task_data[name], split)[:limit]
            encoded = tok([t for t, _ in examples], truncation=True, max_length=MAX_LEN)
            rows = sorted(zip(encoded["input_ids"], (y for _, y in examples)), key=lambda r: len(r[0]))
            # token-length order with small batches: ~3% padding instead of ~45% with
            # 256-example batches sorted by characters; scoring is compute-bound
            self.batches[name] = []
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                enc = tok.pad({"input_ids": [ids for ids, _ in chunk]}, return_tensors="pt")
                self.batches[name].append((dict(enc), torch.tensor([y for _, y in chunk])))
        self.heads = {n: load_file(str(cache_root / "heads" / f"{n}.safetensors")) for n in self.names}
        self.probe_heads = {}
        for n in self.names:
            path = cache_root / "heads" / f"{n}.probe.safetensors"
            if path.exists():
                self.probe_heads[n] = load_file(str(path))
        config = BertConfig.from_pretrained(str(cache_root / "models" / "base"))
        self.model = BertForSequenceClassification(config).eval()

    def load_encoder(self, model_dir: Path | dict) -> None:
        state = model_dir if isinstance(model_dir, dict) else _read_state(Path(model_dir))
        encoder = {k[len("bert.") :]: v for k, v in state.items() if k.startswith("bert.")}
        missing, unexpected = self.model.bert.load_state_dict(encoder, strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        if missing or unexpected:
            raise RuntimeError(f"encoder mismatch: missing={missing} unexpected={unexpected}")

    @torch.no_grad()
    def hits(self, name: str, head: dict | None = None) -> torch.Tensor:
        """Per-example correctness (bool) on one task with its head (default: fine-tuned)."""
        head = head or self.heads[name]
        weight, bias = head["classifier.weight"], head["classifier.bias"]
        out = []
        for enc, y in self.batches[name]:
            pooled = self.model.bert(**enc).pooler_output
            out.append((pooled @ weight.T + bias).argmax(-1) == y)
        return torch.cat(out)

    def score(self, model_dir, tasks=None, probe: bool = False) -> dict[str, torch.Tensor]:
        self.load_encoder(model_dir)
        heads = self.probe_heads if probe else self.heads
        return {n: self.hits(n, heads[n]) for n in (tasks or self.names)}


def _read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(model_dir / shard)))
        return state
    return load_file(str(model_dir / "model.safetensors"))


def summarize(hits: dict[str, torch.Tensor]) -> dict:
    row = {}
    for name, h in hits.items():  # h may be averaged over seeds: fractional counts
        c, n = h.float().sum().item(), len(h)
        lo, hi = wilson(c, n)
        row[name] = {"acc": c / n, "lo": lo, "hi": hi, "n": n}
    avg, half = mean_ci(hits)
    row["avg"] = {"acc": avg, "lo": avg - half, "hi": avg + half, "n": sum(len(h) for h in hits.values())}
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE / "epochs" / "seed0",
        help="a fine-tune cache (cache/<regime>/seed<k>): its heads score the model",
    )
    ap.add_argument("--split", default="test", choices=["test", "val"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ev = Evaluator(args.cache, args.split)
    for name, r in summarize(ev.score(args.model_dir)).items():
        print(f"{name:9s} {100 * r['acc']:6.2f}  [{100 * r['lo']:.2f}, {100 * r['hi']:.2f}]  n={r['n']}")


if __name__ == "__main__":
    main()

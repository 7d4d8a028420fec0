"""The three domains, from packaged data only (nothing is downloaded).

- `code`:  Python's own standard library (the running interpreter's top-level
           `*.py` modules), 48-token chunks. Split by file.
- `prose`: the Jargon File (Debian `jargon-text`, public domain,
           /usr/share/doc/jargon-text/jargon.txt.gz), 48-token chunks. Split by paragraph.
- `arith`: generated additions `a+b=` -> `c` with a, b in [10, 499]; the answer
           (digits and a newline) is checked exactly. Train/val/test problems are disjoint.

An example is `(ids, start)`: token ids beginning with `<|endoftext|>`, and the index
of the first target token. Training targets: every token after the first for code
and prose (plain language modelling), the answer tokens for arith (prompt masked,
SFT-style). Held-out targets: the last 32 of the 48 text tokens for code and prose
(a continuation of the first 16), the answer tokens for arith.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 48  # text tokens per code/prose example
EVAL_CONTEXT = 16  # held-out code/prose: loss on the last CHUNK - EVAL_CONTEXT tokens
SPLIT_SEED = 1234  # fixed: the same examples for every fine-tuning seed and regime
DOMAINS = ("code", "prose", "arith")
EXACT = {"arith"}  # domains scored by exact match too
JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
START_TOKEN = "<|endoftext|>"


@dataclass
class Domain:
    name: str
    train: list = field(default_factory=list)
    val: list = field(default_factory=list)
    test: list = field(default_factory=list)
    source: str = ""

    def tokens(self, split: str = "train") -> int:
        return sum(len(ids) - 1 for ids, _ in getattr(self, split))

    def target_tokens(self, split: str = "train") -> int:
        return sum(len(ids) - start for ids, start in getattr(self, split))


def _start_id(tok) -> int:
    i = tok.convert_tokens_to_ids(START_TOKEN)
    if i is None or i == tok.unk_token_id and tok.unk_token != START_TOKEN:
        raise RuntimeError(f"tokenizer has no {START_TOKEN}")
    return i


def _chunks(tok, texts, per_text: int, rng: random.Random, start_id: int) -> list:
    """Up to `per_text` random non-overlapping CHUNK-token windows from each text."""
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        windows = [ids[i : i + CHUNK] for i in range(0, len(ids) - CHUNK + 1, CHUNK)]
        # skip windows that are mostly blank lines or box drawing
        windows = [w for w in windows if len(set(w)) >= CHUNK // 4]
        rng.shuffle(windows)
        out += [[start_id] + w for w in windows[:per_text]]
    return out


def _take(pool: list, n: int, what: str) -> list:
    if len(pool) < n:
        raise RuntimeError(f"{what}: only {len(pool)} examples, {n} asked")
    return pool[:n]


def code_domain(tok, sizes: dict) -> Domain:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    rng = random.Random(SPLIT_SEED)
    rng.shuffle(files)
    n_test_files, n_val_files = 24, 12
    split_files = {
        "test": files[:n_test_files],
        "val": files[n_test_files : n_test_files + n_val_files],
        "train": files[n_test_files + n_val_files :],
    }
    start = _start_id(tok)
    d = Domain("code", source=f"{root}/*.py ({len(files)} modules, split by file)")
    for split, fs in split_files.items():
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in fs]
        pool = _chunks(tok, texts, 12, random.Random(f"{SPLIT_SEED}-code-{split}"), start)
        random.Random(f"{SPLIT_SEED}-code-{split}-order").shuffle(pool)
        setattr(
            d,
            split,
            [(ids, 1 if split == "train" else 1 + EVAL_CONTEXT) for ids in _take(pool, sizes[split], f"code {split}")],
        )
    return d


def prose_domain(tok, sizes: dict) -> Domain:
    text = gzip.open(JARGON, "rt", encoding="utf-8", errors="replace").read()
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    paras = [p for p in paras if len(p.split()) >= 60]  # entries, not the glossary index
    rng = random.Random(SPLIT_SEED)
    rng.shuffle(paras)
    n = len(paras)
    split_paras = {"test": paras[: n // 10], "val": paras[n // 10 : n // 5], "train": paras[n // 5 :]}
    start = _start_id(tok)
    d = Domain("prose", source=f"{JARGON} ({n} paragraphs of >= 60 words, split by paragraph)")
    for split, ps in split_paras.items():
        pool = _chunks(tok, ps, 1, random.Random(f"{SPLIT_SEED}-prose-{split}"), start)
        random.Random(f"{SPLIT_SEED}-prose-{split}-order").shuffle(pool)
        setattr(
            d,
            split,
            [(ids, 1 if split == "train" else 1 + EVAL_CONTEXT) for ids in _take(pool, sizes[split], f"prose {split}")],
        )
    return d


def arith_problem(a: int, b: int) -> tuple[str, str]:
    return f"{a}+{b}=", f"{a + b}\n"


def arith_domain(tok, sizes: dict) -> Domain:
    rng = random.Random(SPLIT_SEED)
    seen, problems = set(), []
    total = sizes["train"] + sizes["val"] + sizes["test"]
    while len(problems) < total:
        a, b = rng.randint(10, 499), rng.randint(10, 499)
        if (a, b) not in seen:
            seen.add((a, b))
            problems.append((a, b))
    start = _start_id(tok)
    d = Domain("arith", source="generated a+b= with a, b uniform in [10, 499], distinct problems")
    cut = {
        "test": (0, sizes["test"]),
        "val": (sizes["test"], sizes["test"] + sizes["val"]),
        "train": (sizes["test"] + sizes["val"], total),
    }
    for split, (lo, hi) in cut.items():
        rows = []
        for a, b in problems[lo:hi]:
            prompt, answer = arith_problem(a, b)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            ans = tok(answer, add_special_tokens=False)["input_ids"]
            rows.append(([start] + p + ans, 1 + len(p)))
        setattr(d, split, rows)
    return d


BUILDERS = {"code": code_domain, "prose": prose_domain, "arith": arith_domain}


def load_domains(tok, sizes: dict[str, dict]) -> dict[str, Domain]:
    """sizes: domain -> {"train": n, "val": n, "test": n}."""
    return {name: BUILDERS[name](tok, sizes[name]) for name in sizes}


def fingerprint(domain: Domain, split: str = "train") -> str:
    """Hash of a split's token ids: a fine-tune is cached under its data's hash."""
    h = hashlib.sha256(json.dumps(getattr(domain, split)).encode())
    return h.hexdigest()[:12]

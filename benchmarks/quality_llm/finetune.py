"""Full fine-tunes of SmolLM2-135M on each domain, for each regime and seed (cached).

    python finetune.py --seeds 0 [--regimes epochs steps intensity] [--worker 0/2]
    python finetune.py --smoke          # tiny random LLaMA (CI)

Every parameter is trained, the tied embedding/head matrix included, in float32 on
CPU with AdamW. A fine-tune is identified by (domain, steps, learning rate, seed,
training-data hash): regimes that ask for the same one share it (see README.md).
Each lands in cache/<tag>/ft/<key>/ with the SmolLM2 tokenizer and meta.json
(delta norm, data size, steps, epochs, timing, training-loss curve).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "perf"))
import data  # noqa: E402
import make_smollm2  # noqa: E402  (the GGUF -> HF conversion, shared with the perf benchmarks)

CACHE = HERE / "cache"
STAMP = ".complete"

# Everything that defines the fine-tunes. Fixed before any merge was run.
RECIPE = {
    "batch": 8,  # sequences per optimizer step, every domain
    "lr": 1e-4,  # AdamW, betas (0.9, 0.999), no weight decay
    "warmup": 0.1,  # linear warmup over 10% of the steps, then linear decay to 0
    "clip": 1.0,  # gradient-norm clipping
    "sizes": {  # examples per split; train sizes 768 / 256 / 96: 8x largest/smallest
        "code": {"train": 768, "val": 48, "test": 96},
        "prose": {"train": 256, "val": 48, "test": 96},
        "arith": {"train": 96, "val": 200, "test": 400},
    },
    "regimes": {
        # same epochs for every domain: steps = epochs * train / batch (192 / 64 / 24)
        "epochs": {"epochs": 2},
        # same steps for every domain: code sees 0.67 epochs, prose 2, arith 5.3
        "steps": {"steps": 64},
        # the steps recipe with learning-rate multipliers 16x apart, not in data-size order
        "intensity": {"steps": 64, "lr_mult": {"code": 1.0, "prose": 0.25, "arith": 4.0}},
    },
}

SMOKE_RECIPE = {
    "batch": 4,
    "lr": 1e-3,
    "warmup": 0.1,
    "clip": 1.0,
    "sizes": {
        "code": {"train": 32, "val": 8, "test": 8},
        "prose": {"train": 16, "val": 8, "test": 8},
        "arith": {"train": 4, "val": 16, "test": 16},
    },
    "regimes": {
        "epochs": {"epochs": 1},
        "steps": {"steps": 4},
        "intensity": {"steps": 4, "lr_mult": {"code": 1.0, "prose": 0.25, "arith": 4.0}},
    },
}


def recipe_for(smoke: bool) -> dict:
    return SMOKE_RECIPE if smoke else RECIPE


def cache_root(smoke: bool) -> Path:
    return CACHE / ("smoke" if smoke else "smollm2")


def _done(d: Path) -> bool:
    return (d / STAMP).exists()


def tokenizer(smoke: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model(smoke)))


def base_model(smoke: bool) -> Path:
    """The base checkpoint, built on first use: SmolLM2-135M from the packaged GGUF
    (make_smollm2.build_base: bf16 safetensors with the tokenizer, tied embeddings),
    or for --smoke a tiny random LLaMA with the same tokenizer and tied embeddings."""
    root = cache_root(smoke)
    if not smoke:
        return make_smollm2.build_base(root)
    base = root / "base"
    if _done(base):
        return base
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = make_smollm2.find_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    shutil.rmtree(base, ignore_errors=True)
    model.save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    (base / STAMP).write_text("tiny random llama\n")
    return base


def domains(smoke: bool, tok=None):
    return data.load_domains(tok or tokenizer(smoke), recipe_for(smoke)["sizes"])


def plan(recipe: dict, doms: dict, seed: int, regime: str) -> dict[str, dict]:
    """domain -> fine-tune job (steps, lr, ...) for one regime and seed."""
    spec = recipe["regimes"][regime]
    jobs = {}
    for name, dom in doms.items():
        n = len(dom.train)
        steps = spec.get("steps") or math.ceil(spec["epochs"] * n / recipe["batch"])
        lr = recipe["lr"] * spec.get("lr_mult", {}).get(name, 1.0)
        key = f"{name}-{steps}steps-lr{lr:g}-seed{seed}-{data.fingerprint(dom)}"
        jobs[name] = {
            "key": key,
            "domain": name,
            "steps": steps,
            "lr": lr,
            "seed": seed,
            "n_train": n,
            "epochs": steps * recipe["batch"] / n,
        }
    return jobs


def ft_dir(smoke: bool, key: str) -> Path:
    return cache_root(smoke) / "ft" / key


def _order(n: int, total: int, gen: torch.Generator) -> list[int]:
    """Example indices for `total` draws: a fresh permutation every epoch."""
    out = []
    while len(out) < total:
        out += torch.randperm(n, generator=gen).tolist()
    return out[:total]


def collate(rows, pad_id: int):
    """Right-padded ids, attention mask, and the mask of positions whose *next* token
    is a target (so logits are computed only there)."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), length), dtype=torch.long)
    pred = torch.zeros((len(rows), length - 1), dtype=torch.bool)
    for i, (seq, start) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        att[i, : len(seq)] = 1
        pred[i, start - 1 : len(seq) - 1] = True
    return ids, att, pred


def target_logits(model, ids, att, pred):
    """Logits only where a loss is needed: the 49k-vocab head is a large share of
    the cost. Returns (logits [n, vocab], targets [n])."""
    hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state
    return model.lm_head(hidden[:, :-1][pred]), ids[:, 1:][pred]


def train_one(job: dict, dom, base: Path, dest: Path, recipe: dict, pad_id: int) -> dict:
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job["lr"], betas=(0.9, 0.999), weight_decay=0.0, foreach=True)
    steps, batch = job["steps"], recipe["batch"]
    warm = max(1, round(recipe["warmup"] * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))
    )
    gen = torch.Generator().manual_seed(1_000_003 * job["seed"] + sum(map(ord, job["domain"])))
    order = _order(len(dom.train), steps * batch, gen)
    curve, t_train = [], time.time()
    for step in range(steps):
        rows = [dom.train[i] for i in order[step * batch : (step + 1) * batch]]
        ids, att, pred = collate(rows, pad_id)
        logits, targets = target_logits(model, ids, att, pred)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe["clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append(round(loss.item(), 4))
        if step % 16 == 0 or step == steps - 1:
            print(
                f"  [{job['key']}] step {step + 1}/{steps} loss {loss.item():.3f} "
                f"({(time.time() - t_train) / (step + 1):.2f} s/step)",
                flush=True,
            )
    train_s = time.time() - t_train
    # delta norm over every stored tensor (the tied head is the embedding)
    base_state = load_file(str(base / "model.safetensors"))
    sq = 0.0
    for name, p in model.state_dict().items():
        if name in base_state:
            sq += (p.detach().float() - base_state[name].float()).double().pow(2).sum().item()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in base.iterdir():  # tokenizer files, so plain mergekit-yaml copies a tokenizer
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, tmp / f.name)
    meta = dict(
        job,
        delta_norm=math.sqrt(sq),
        train_seconds=round(train_s, 1),
        seconds_per_step=round(train_s / steps, 3),
        total_seconds=round(time.time() - t0, 1),
        train_tokens=dom.tokens(),
        train_target_tokens=dom.target_tokens(),
        batch=batch,
        final_loss_mean8=round(sum(curve[-8:]) / len(curve[-8:]), 4),
        loss_curve=curve,
        threads=torch.get_num_threads(),
        base=str(base),
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    (tmp / STAMP).write_text(job["key"] + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return meta


def all_jobs(smoke: bool, seeds, regimes, doms) -> list[dict]:
    recipe, seen, jobs = recipe_for(smoke), set(), []
    for seed in seeds:
        for regime in regimes:
            for job in plan(recipe, doms, seed, regime).values():
                if job["key"] not in seen:
                    seen.add(job["key"])
                    jobs.append(job)
    return jobs


def ensure(smoke: bool, seeds, regimes, worker: tuple[int, int] = (0, 1), doms=None) -> list[dict]:
    """Train whatever is not cached yet (this worker's share); return every job's meta
    that exists."""
    base = base_model(smoke)
    tok = tokenizer(smoke)
    doms = doms or domains(smoke, tok)
    recipe = recipe_for(smoke)
    jobs = all_jobs(smoke, seeds, regimes, doms)
    # longest-first onto the least-loaded worker: a fixed split for `--worker i/n`
    load, mine = [0.0] * worker[1], []
    for job in sorted(jobs, key=lambda j: (-j["steps"] * _cost(j["domain"]), j["key"])):
        w = min(range(worker[1]), key=lambda i: (load[i], i))
        load[w] += job["steps"] * _cost(job["domain"])
        if w == worker[0]:
            mine.append(job)
    for job in mine:
        dest = ft_dir(smoke, job["key"])
        if _done(dest) or not _lock(dest):
            continue
        try:
            print(
                f"fine-tune {job['key']}: {job['steps']} steps, lr {job['lr']:g}, {job['epochs']:.2f} epochs",
                flush=True,
            )
            meta = train_one(job, doms[job["domain"]], base, dest, recipe, tok.pad_token_id)
            print(f"  done in {meta['train_seconds']:.0f}s, delta norm {meta['delta_norm']:.3f}", flush=True)
        finally:
            dest.with_name(dest.name + ".lock").unlink(missing_ok=True)
    return [
        json.loads((ft_dir(smoke, j["key"]) / "meta.json").read_text()) for j in jobs if _done(ft_dir(smoke, j["key"]))
    ]


def _lock(dest: Path) -> bool:
    """Claim a fine-tune for this process. If a live process holds it (another worker,
    or run.py started while workers train), wait until it is done and return False."""
    lock = dest.with_name(dest.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            print(f"waiting for {dest.name} (pid {pid} trains it)", flush=True)
            while lock.exists() and not _done(dest) and _alive(pid):
                time.sleep(30)
            if _done(dest):
                return False
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        if _done(dest):  # finished between the check and the claim
            lock.unlink(missing_ok=True)
            return False
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _cost(domain: str) -> float:
    return 0.4 if domain == "arith" else 1.0  # measured: a short-sequence step costs ~0.4x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--regimes", nargs="+", default=list(RECIPE["regimes"]))
    ap.add_argument("--worker", default="0/1", help="i/n: train the i-th of n shares")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    i, n = map(int, args.worker.split("/"))
    t0 = time.time()
    metas = ensure(args.smoke, args.seeds, args.regimes, (i, n))
    print(f"{len(metas)} fine-tunes cached; this call took {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

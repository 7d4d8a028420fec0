"""Wall time, CPU time and peak RSS of NAN merges vs the stock methods they wrap.

Each merge is a real ``mergekit-yaml`` run in a child process (base model +
3 fine-tunes, weight 1.0 each, bf16). For every pair ``A:B`` the runs are
interleaved A B A B ...; wall time is measured around the child, its CPU time
(user+sys) and peak RSS come from ``os.wait4`` (per-child rusage, ru_maxrss in
KiB on Linux). Reported: median per method, and A/B ratios (ratio of medians,
with min/max of the per-repetition ratios A_i/B_i). The input files are read
once beforehand (warm page cache) and mergekit_nan is snapshotted at start, so
edits to the plugin during a run do not leak into it.

  python benchmarks/perf/merge_cost.py                 # SmolLM2-135M, 3 reps
  python benchmarks/perf/merge_cost.py --smoke         # tiny random LLaMA, 1 rep
  python benchmarks/perf/merge_cost.py --methods ties:ties --reps 5
  python benchmarks/perf/merge_cost.py --model 1b --reps 2   # 1.03B, TinyLlama shapes

Methods are names from METHODS below; add an entry there to time a variant
(e.g. a ``granularity: model`` pre-pass) and pass it as ``--methods new:old``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_smollm2  # noqa: E402

from mergekit_nan.yaml_run import merge_config, run_mergekit_yaml, write_config  # noqa: E402

# name -> merge_method, shared `parameters:`, per-model `parameters:` (weight is
# always 1.0). Pairs compare entries of this table.
METHODS: dict[str, dict] = {
    "ties": {"merge_method": "ties", "model": {"density": 0.5}},
    "nan_ties": {"merge_method": "nan_ties", "model": {"density": 0.5}},
    "task_arithmetic": {"merge_method": "task_arithmetic"},
    "nan_task_arithmetic": {"merge_method": "nan_task_arithmetic"},
    # The layer/model pre-pass (one extra read of the inputs) against per-tensor NAN:
    "nan_task_arithmetic_model": {"merge_method": "nan_task_arithmetic", "shared": {"granularity": "model"}},
    "nan_task_arithmetic_layer": {"merge_method": "nan_task_arithmetic", "shared": {"granularity": "layer"}},
    "nan_ties_layer": {"merge_method": "nan_ties", "model": {"density": 0.5}, "shared": {"granularity": "layer"}},
}
DEFAULT_PAIRS = "nan_ties:ties,nan_task_arithmetic:task_arithmetic"
RESULTS = HERE / "results_merge_cost"


def merge_yaml(method: str, base: Path, finetunes: list[Path]) -> dict:
    """The mergekit config for one table entry."""
    spec = METHODS[method]
    return merge_config(
        spec["merge_method"],
        finetunes,
        base=base,
        dtype="bfloat16",
        model_parameters={"weight": 1.0, **spec.get("model", {})},
        parameters=spec.get("shared"),
    )


def run_merge(
    config: Path, out: Path, log: Path, extra: list[str], env: dict, launcher: list[str] | None = None
) -> tuple[float, float, int]:
    """Run mergekit-yaml once; return (wall s, CPU s = user+sys, peak RSS MiB).

    `launcher` replaces the mergekit-yaml executable (merge_breakdown.py runs its
    entry point under timers); the config, output and options follow it.
    """
    run = run_mergekit_yaml(
        config, out, ["--quiet", *extra], command=launcher or "mergekit-yaml", env=env, clear=True, log=log
    )
    usage = run.rusage
    return run.wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024


def check_output(out: Path, base: Path) -> None:
    """The merge wrote every base tensor, finite, and stayed tied."""
    from safetensors import safe_open

    names = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                names[k] = bool(st.get_tensor(k).float().isfinite().all())
    with safe_open(base / "model.safetensors", "pt") as st:
        expected = set(st.keys())
    assert set(names) == expected, f"{out}: tensors differ from base"
    assert all(names.values()), f"{out}: non-finite values"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("tie_word_embeddings"), f"{out}: tie_word_embeddings lost"


def build_tiny(root: Path) -> tuple[Path, list[Path]]:
    """A random LLaMA (hidden 64, 2 layers, vocab 1000, tied) + 3 perturbations."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = root / "base"
    if not (base / make_smollm2.STAMP).exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(base, safe_serialization=True)
        (base / make_smollm2.STAMP).write_text("tiny\n")
    return base, make_smollm2.build_finetunes(base, root)


# TinyLlama-1.1B's shapes with tied embeddings: 1.03B parameters, 2.1 GB in bf16.
ONE_B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def build_1b(root: Path) -> tuple[Path, list[Path]]:
    """A random bf16 LLaMA of TinyLlama's shapes (tied, N(0, 0.02) weights, unit norms) + 3 perturbations."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    base = root / "base"
    if not (base / make_smollm2.STAMP).exists():
        config = LlamaConfig(**ONE_B)
        config.architectures = ["LlamaForCausalLM"]
        config.torch_dtype = torch.bfloat16
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
        generator = torch.Generator().manual_seed(0)
        state = {
            name: (
                torch.ones(shape) if name.endswith("norm.weight") else 0.02 * torch.randn(shape, generator=generator)
            ).to(torch.bfloat16)
            for name, shape in shapes.items()
        }
        base.mkdir(parents=True, exist_ok=True)
        save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(base)
        (base / make_smollm2.STAMP).write_text("1b\n")
    return base, make_smollm2.build_finetunes(base, root)


def snapshot_plugin(dest: Path) -> tuple[dict, str | None]:
    """Copy the installed mergekit_nan to ``dest`` so every child runs the same code.

    The plugin is an editable install under active development; children get the
    copy first on PYTHONPATH. Returns (child environment, short source hash).
    """
    env = dict(os.environ)
    spec = importlib.util.find_spec("mergekit_nan")
    if spec is None or not spec.submodule_search_locations:
        return env, None
    src = Path(spec.submodule_search_locations[0])
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest / "mergekit_nan", ignore=shutil.ignore_patterns("__pycache__"))
    h = hashlib.sha256()
    for f in sorted((dest / "mergekit_nan").rglob("*.py")):
        h.update(str(f.relative_to(dest)).encode() + f.read_bytes())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(dest), env.get("PYTHONPATH")]))
    return env, h.hexdigest()[:12]


def warm_page_cache(paths: list[Path]) -> None:
    for p in paths:
        with open(p / "model.safetensors", "rb") as fh:
            while fh.read(1 << 24):
                pass


def machine_info() -> dict:
    mem = next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )

    def ver(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    def git(*a):
        try:
            r = subprocess.run(["git", "-C", str(HERE), *a], capture_output=True, text=True)
        except OSError:  # no git: a copied tree on a lent machine, say
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", str(HERE.parents[1] / "mergekit_nan"))
    return {
        "git": f"{git('rev-parse', '--short', 'HEAD')}{' + uncommitted mergekit_nan' if dirty else ''}",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "mem_total_gib": round(int(mem) / 2**20, 1),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "versions": {p: ver(p) for p in ("mergekit", "mergekit-nan", "torch", "transformers")},
    }


def _stats(rs: list[dict]) -> dict:
    walls, cpus = [r["wall_s"] for r in rs], [r["cpu_s"] for r in rs]
    return {
        "wall_s_median": statistics.median(walls),
        "wall_s_min": min(walls),
        "wall_s_max": max(walls),
        "cpu_s_median": statistics.median(cpus),
        "cpu_s_min": min(cpus),
        "cpu_s_max": max(cpus),
        "rss_mib_median": statistics.median(r["rss_mib"] for r in rs),
        "n": len(rs),
    }


def summarize(runs: list[dict]) -> dict:
    """Per-slot medians and A/B ratios for each pair record {a, b, runs_a, runs_b}."""
    per_method, ratios = {}, []
    for p in runs:
        sa, sb = _stats(p["runs_a"]), _stats(p["runs_b"])
        per_method[f"{p['a']} (A of {p['a']}:{p['b']})"] = sa
        per_method[f"{p['b']} (B of {p['a']}:{p['b']})"] = sb
        wall = [x["wall_s"] / y["wall_s"] for x, y in zip(p["runs_a"], p["runs_b"])]
        cpu = [x["cpu_s"] / y["cpu_s"] for x, y in zip(p["runs_a"], p["runs_b"])]
        rss = [x["rss_mib"] / y["rss_mib"] for x, y in zip(p["runs_a"], p["runs_b"])]
        ratios.append(
            {
                "pair": f"{p['a']} / {p['b']}",
                "wall_ratio": sa["wall_s_median"] / sb["wall_s_median"],
                "wall_ratio_min": min(wall),
                "wall_ratio_max": max(wall),
                "cpu_ratio": sa["cpu_s_median"] / sb["cpu_s_median"],
                "cpu_ratio_min": min(cpu),
                "cpu_ratio_max": max(cpu),
                "rss_ratio": sa["rss_mib_median"] / sb["rss_mib_median"],
                "rss_ratio_min": min(rss),
                "rss_ratio_max": max(rss),
            }
        )
    return {"per_method": per_method, "ratios": ratios}


def write_report(path: Path, info: dict, summary: dict) -> None:
    v = info["versions"]
    lines = [
        f"# Merge cost: {info['model']}",
        "",
        f"- date: {info['date']}; machine: {info['platform']}, {info['cpu']}, "
        f"{info['nproc']} CPUs, {info['mem_total_gib']} GiB RAM; load average at start "
        f"{', '.join(f'{x:.2f}' for x in info['loadavg_start'])}",
        f"- versions: git {info['git']}; python {info['python']}, " + ", ".join(f"{k} {v[k]}" for k in v),
        f"- setup: base + {info['n_finetunes']} fine-tunes, weight 1.0 each, dtype "
        f"bfloat16, ties density 0.5; `mergekit-yaml {' '.join(info['mergekit_args'])}`; "
        f"{info['reps']} repetition(s) per method, interleaved A B A B; page cache warmed",
        f"- total benchmark time: {info['total_s']:.0f} s; 1-min load average before "
        f"each run {info['load1_min_max'][0]:.1f}-{info['load1_min_max'][1]:.1f}; "
        f"mergekit_nan sources snapshotted at start, sha256 "
        f"{info['mergekit_nan_snapshot_sha256_12']}",
        "",
        "| method (in pair) | runs | wall median (s) | wall min-max (s) | CPU median (s) "
        "| CPU min-max (s) | peak RSS median (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, s in summary["per_method"].items():
        lines.append(
            f"| {m} | {s['n']} | {s['wall_s_median']:.2f} | "
            f"{s['wall_s_min']:.2f}-{s['wall_s_max']:.2f} | {s['cpu_s_median']:.2f} | "
            f"{s['cpu_s_min']:.2f}-{s['cpu_s_max']:.2f} | {s['rss_mib_median']:.0f} |"
        )
    lines += [
        "",
        "| ratio A/B | wall (median/median) | wall per-rep min-max | CPU "
        "(median/median) | CPU per-rep min-max | peak RSS | RSS per-rep min-max |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["ratios"]:
        lines.append(
            f"| {r['pair']} | {r['wall_ratio']:.3f} | {r['wall_ratio_min']:.3f}-"
            f"{r['wall_ratio_max']:.3f} | {r['cpu_ratio']:.3f} | {r['cpu_ratio_min']:.3f}-"
            f"{r['cpu_ratio_max']:.3f} | {r['rss_ratio']:.3f} | "
            f"{r['rss_ratio_min']:.3f}-{r['rss_ratio_max']:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--methods", default=DEFAULT_PAIRS, help=f"comma-separated A:B pairs from METHODS (default {DEFAULT_PAIRS})"
    )
    ap.add_argument("--reps", type=int, default=None, help="repetitions per method (3; smoke 1)")
    ap.add_argument(
        "--models", type=Path, default=make_smollm2.DEFAULT_OUT, help="dir with base/ and ft1..ft3/ (built if missing)"
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=HERE / "work" / "merge_cost",
        help="scratch dir for configs, logs and merge outputs",
    )
    ap.add_argument("--out", type=Path, default=None, help="results path prefix (.md/.json)")
    ap.add_argument(
        "--model",
        choices=["smollm2", "1b"],
        default="smollm2",
        help="SmolLM2-135M (default) or a random 1.03B TinyLlama-shaped family",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny random LLaMA, 1 rep")
    ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml options, e.g. '-j 2'")
    args = ap.parse_args()

    pairs = [tuple(p.split(":")) for p in args.methods.split(",") if p]
    for p in pairs:
        if len(p) != 2 or not all(m in METHODS for m in p):
            ap.error(f"bad pair {':'.join(p)}; known methods: {', '.join(METHODS)}")
    reps = args.reps or (1 if args.smoke else 3)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start, info = time.perf_counter(), machine_info()
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="smoke-", dir=work))
        base, fts = build_tiny(tmp / "models")
        model_name = "tiny random LLaMA (smoke)"
        out_prefix = args.out or work / "results_merge_cost_smoke"
    elif args.model == "1b":
        tmp = work
        base, fts = build_1b(HERE / "cache" / "llama1b")
        model_name = "random 1.03B LLaMA (TinyLlama shapes, tied, bf16) + 3 synthetic fine-tunes"
        out_prefix = args.out or HERE / "results_merge_cost_1b"
    else:
        tmp = work
        base, fts = make_smollm2.build(args.models)
        model_name = "SmolLM2-135M (dequantized GGUF) + 3 synthetic fine-tunes"
        out_prefix = args.out or RESULTS
    extra = args.mergekit_args.split()

    env, plugin = snapshot_plugin(tmp / "plugin-snapshot")
    warm_page_cache([base, *fts])
    runs: list[dict] = []
    for a, b in pairs:
        rec = {"a": a, "b": b, "runs_a": [], "runs_b": []}
        runs.append(rec)
        slots = (("a", a), ("b", b))
        for slot, m in slots:
            write_config(tmp / f"{slot}-{m}.yaml", merge_yaml(m, base, fts))
        for rep in range(reps):
            for slot, m in slots:
                stem = tmp / f"{slot}-{m}"
                out, load1 = tmp / "out", os.getloadavg()[0]
                log = stem.with_suffix(".log")
                wall, cpu, rss = run_merge(stem.with_suffix(".yaml"), out, log, extra, env)
                if rep == 0:
                    check_output(out, base)
                shutil.rmtree(out)
                rec[f"runs_{slot}"].append({"wall_s": wall, "cpu_s": cpu, "rss_mib": rss, "load1": load1})
                print(
                    f"{a}:{b} rep {rep + 1}/{reps} {slot.upper()} {m:>20}: "
                    f"{wall:7.2f} s wall, {cpu:7.2f} s CPU, {rss:6d} MiB",
                    flush=True,
                )

    summary = summarize(runs)
    loads = [r["load1"] for p in runs for r in p["runs_a"] + p["runs_b"]]
    info |= {
        "model": model_name,
        "n_finetunes": len(fts),
        "reps": reps,
        "mergekit_args": ["--quiet", *extra],
        "pairs": [f"{a}:{b}" for a, b in pairs],
        "total_s": time.perf_counter() - t_start,
        "mergekit_nan_snapshot_sha256_12": plugin,
        "load1_min_max": [min(loads), max(loads)],
        "methods": {m: METHODS[m] for p in pairs for m in p},
    }
    out_prefix = Path(out_prefix)
    out_prefix.with_suffix(".json").write_text(json.dumps({"info": info, "runs": runs, **summary}, indent=2) + "\n")
    write_report(out_prefix.with_suffix(".md"), info, summary)
    if args.smoke:
        shutil.rmtree(tmp)
    print(out_prefix.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

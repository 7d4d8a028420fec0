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
  python benchmarks/perf/merge_cost.py --model 3b --cold --reps 1   # 3.21B x 4 > RAM, cold cache (root)

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
# always 1.0), and how the NAN norm cache is filled before the timed run (none: each
# run gets an empty cache folder, as a first merge does; "inspect": `mergekit-nan
# inspect` of the same config runs first, untimed; "merge": the same merge runs first,
# untimed). Pairs compare entries of this table.
METHODS: dict[str, dict] = {
    "ties": {"merge_method": "ties", "model": {"density": 0.5}},
    "nan_ties": {"merge_method": "nan_ties", "model": {"density": 0.5}},
    "task_arithmetic": {"merge_method": "task_arithmetic"},
    "nan_task_arithmetic": {"merge_method": "nan_task_arithmetic"},
    # The layer/model pre-pass (one extra read of the inputs) against per-tensor NAN:
    "nan_task_arithmetic_model": {"merge_method": "nan_task_arithmetic", "shared": {"granularity": "model"}},
    "nan_task_arithmetic_layer": {"merge_method": "nan_task_arithmetic", "shared": {"granularity": "layer"}},
    # With the norm cache filled first, untimed (every other run starts from an empty one):
    "nan_task_arithmetic_model_after_inspect": {
        "merge_method": "nan_task_arithmetic",
        "shared": {"granularity": "model"},
        "norm_cache": "inspect",
    },
    "nan_task_arithmetic_model_repeat": {
        "merge_method": "nan_task_arithmetic",
        "shared": {"granularity": "model"},
        "norm_cache": "merge",
    },
    "nan_task_arithmetic_layer_repeat": {
        "merge_method": "nan_task_arithmetic",
        "shared": {"granularity": "layer"},
        "norm_cache": "merge",
    },
    "nan_ties_model": {"merge_method": "nan_ties", "model": {"density": 0.5}, "shared": {"granularity": "model"}},
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
) -> dict:
    """Run mergekit-yaml once; return wall s, CPU s (user+sys), peak RSS MiB and the
    bytes the child read from storage (/proc/<pid>/io read_bytes, and rusage's block
    reads, ru_inblock x 512; page-cache hits are in neither).

    `launcher` replaces the mergekit-yaml executable (merge_breakdown.py runs its
    entry point under timers); the config, output and options follow it.
    """
    run = run_mergekit_yaml(
        config, out, ["--quiet", *extra], command=launcher or "mergekit-yaml", env=env, clear=True, log=log
    )
    usage = run.rusage
    return {
        "wall_s": run.wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "rss_mib": usage.ru_maxrss // 1024,
        "read_bytes": (run.io or {}).get("read_bytes"),
        "inblock_bytes": usage.ru_inblock * 512,
    }


def fill_norm_cache(how: str | None, config: Path, scratch: Path, extra: list[str], env: dict) -> float | None:
    """Fill the cache of `env` as METHODS says (untimed here); returns the filling run's wall s."""
    if how is None:
        return None
    if how == "inspect":
        command = [str(Path(sys.executable).parent / "mergekit-nan"), "inspect", str(config), "--no-shares", *extra]
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - started
    started = time.perf_counter()
    run_mergekit_yaml(config, scratch, ["--quiet", *extra], env=env, clear=True)
    shutil.rmtree(scratch)
    return time.perf_counter() - started


def check_output(out: Path, base: Path) -> None:
    """The merge wrote every base tensor, finite, and stayed tied."""
    from safetensors import safe_open

    names = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                names[k] = bool(st.get_tensor(k).float().isfinite().all())
    expected = set()
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            expected |= set(st.keys())
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


def llama_shapes(shapes_config: dict) -> tuple:
    """(a bf16 LlamaConfig, {stored tensor: shape}) for a tied LLaMA of these shapes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shapes_config)
    config.architectures = ["LlamaForCausalLM"]
    config.torch_dtype = torch.bfloat16
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    return config, shapes


def build_1b(root: Path) -> tuple[Path, list[Path]]:
    """A random bf16 LLaMA of TinyLlama's shapes (tied, N(0, 0.02) weights, unit norms) + 3 perturbations."""
    import torch
    from safetensors.torch import save_file

    base = root / "base"
    if not (base / make_smollm2.STAMP).exists():
        config, shapes = llama_shapes(ONE_B)
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


# Llama-3.2-3B's shapes (tied): 3.21B parameters, 6.4 GB in bf16; base + 3 fine-tunes
# are 25.7 GB, more than this machine's 24 GiB of memory.
THREE_B = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
SHARD_BYTES = 2 << 30
NOISE_BLOCK = 1 << 24  # elements of N(0, 1) per fine-tune, reused along every tensor


def build_sharded(root: Path, shapes_config: dict, tag: str) -> tuple[Path, list[Path]]:
    """A random bf16 LLaMA family written shard by shard (HF sharded layout, <= 2 GiB a
    shard), one tensor in memory at a time: base N(0, 0.02) matrices (each tensor from
    its own seed) and unit norm weights; fine-tune k is base + sigma_k * rms * noise per
    tensor (make_smollm2.SIGMAS), read from the base's shard. The noise is a 16M-element
    N(0, 1) block per fine-tune, read along each tensor from a per-tensor offset: drawing
    fresh normals for 3.2B elements per model takes ~25 min on 2 busy cores, and a
    cost benchmark needs deltas of different sizes, not independent ones."""
    import zlib

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    config, shapes = llama_shapes(shapes_config)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    def base_tensor(name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shapes[name], dtype=torch.bfloat16)
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return (0.02 * torch.randn(shapes[name], generator=generator)).to(torch.bfloat16)

    def perturbed(base: torch.Tensor, name: str, sigma: float, noise: torch.Tensor) -> torch.Tensor:
        value = base.float().reshape(-1)
        scale = sigma * value.pow(2).mean().sqrt().item()
        offset = zlib.crc32(name.encode()) % NOISE_BLOCK
        for start in range(0, value.numel(), NOISE_BLOCK):
            part = value[start : start + NOISE_BLOCK]
            part.add_(noise[offset : offset + part.numel()], alpha=scale)
        return value.to(torch.bfloat16).reshape(base.shape)

    def write(path: Path, stamp: str, make) -> None:
        if (path / make_smollm2.STAMP).exists() and (path / make_smollm2.STAMP).read_text() == stamp:
            return
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        for file, names in zip(files, shards):
            save_file({n: make(file, n) for n in names}, str(path / file), metadata={"format": "pt"})
            print(f"{path}: {file} written", flush=True)
        weight_map = {n: file for file, names in zip(files, shards) for n in names}
        total = sum(2 * shapes[n].numel() for n in weight_map)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        config.save_pretrained(path)
        (path / make_smollm2.STAMP).write_text(stamp)

    base = root / "base"
    write(base, f"{tag} base\n", lambda file, name: base_tensor(name))
    finetunes = []
    for k, sigma in enumerate(make_smollm2.SIGMAS):
        path = root / f"ft{k + 1}"
        noise = torch.randn(2 * NOISE_BLOCK, generator=torch.Generator().manual_seed(1000 + k))

        def make(file: str, name: str, sigma=sigma, noise=noise) -> torch.Tensor:
            with safe_open(str(base / file), "pt") as stored:
                return perturbed(stored.get_tensor(name), name, sigma, noise)

        write(path, f"{tag} sigma={sigma} seed={1000 + k} block={NOISE_BLOCK}\n", make)
        finetunes.append(path)
    return base, finetunes


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
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def drop_page_cache() -> None:
    """Write back and drop the page cache (root only), so that the next run reads from disk."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("3\n")


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
        "read_gb_median": statistics.median((r.get("read_bytes") or 0) / 1e9 for r in rs),
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
                "read_ratio": sa["read_gb_median"] / sb["read_gb_median"] if sb["read_gb_median"] else None,
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
        f"{info['reps']} repetition(s) per method, interleaved A B A B; page cache "
        f"{info.get('page_cache', 'warmed')}; inputs {info.get('input_bytes', 0) / 1e9:.1f} GB",
        f"- total benchmark time: {info['total_s']:.0f} s; 1-min load average before "
        f"each run {info['load1_min_max'][0]:.1f}-{info['load1_min_max'][1]:.1f}; "
        f"mergekit_nan sources snapshotted at start, sha256 "
        f"{info['mergekit_nan_snapshot_sha256_12']}",
        "",
        "| method (in pair) | runs | wall median (s) | wall min-max (s) | CPU median (s) "
        "| CPU min-max (s) | peak RSS median (MiB) | read from disk median (GB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, s in summary["per_method"].items():
        lines.append(
            f"| {m} | {s['n']} | {s['wall_s_median']:.2f} | "
            f"{s['wall_s_min']:.2f}-{s['wall_s_max']:.2f} | {s['cpu_s_median']:.2f} | "
            f"{s['cpu_s_min']:.2f}-{s['cpu_s_max']:.2f} | {s['rss_mib_median']:.0f} | {s['read_gb_median']:.2f} |"
        )
    lines += [
        "",
        "| ratio A/B | wall (median/median) | wall per-rep min-max | CPU "
        "(median/median) | CPU per-rep min-max | peak RSS | RSS per-rep min-max | disk reads |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cold = info.get("page_cache") == "dropped before each run"  # warm runs read little: no ratio
    for r in summary["ratios"]:
        lines.append(
            f"| {r['pair']} | {r['wall_ratio']:.3f} | {r['wall_ratio_min']:.3f}-"
            f"{r['wall_ratio_max']:.3f} | {r['cpu_ratio']:.3f} | {r['cpu_ratio_min']:.3f}-"
            f"{r['cpu_ratio_max']:.3f} | {r['rss_ratio']:.3f} | "
            f"{r['rss_ratio_min']:.3f}-{r['rss_ratio_max']:.3f} | "
            f"{format(r['read_ratio'], '.3f') if cold and r.get('read_ratio') else '-'} |"
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
        choices=["smollm2", "1b", "3b"],
        default="smollm2",
        help="SmolLM2-135M (default), a random 1.03B TinyLlama-shaped family, or a random 3.21B "
        "Llama-3.2-3B-shaped one (25.7 GB of inputs, built shard by shard in cache/llama3b)",
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before every run (root), instead of warming it once: every run reads from disk",
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
    elif args.model == "3b":
        tmp = work
        base, fts = build_sharded(HERE / "cache" / "llama3b", THREE_B, "3b")
        model_name = "random 3.21B LLaMA (Llama-3.2-3B shapes, tied, bf16, 2 GiB shards) + 3 synthetic fine-tunes"
        out_prefix = args.out or HERE / "results_merge_cost_3b"
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
    if not args.cold:
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
                cache = tmp / "norm-cache"
                shutil.rmtree(cache, ignore_errors=True)
                run_env = {**env, "MERGEKIT_NAN_NORM_CACHE": str(cache)}
                filled = fill_norm_cache(METHODS[m].get("norm_cache"), stem.with_suffix(".yaml"), out, extra, run_env)
                if args.cold:
                    drop_page_cache()
                measured = run_merge(stem.with_suffix(".yaml"), out, log, extra, run_env)
                if filled is not None:
                    measured["cache_filled_by_untimed_run_s"] = filled
                record = out / "nan_coefficients.json"
                if record.exists():  # how many norms the timed run read from the cache and added to it
                    measured["norm_cache"] = json.loads(record.read_text()).get("norm_cache")
                if rep == 0:
                    check_output(out, base)
                shutil.rmtree(out)
                rec[f"runs_{slot}"].append({**measured, "load1": load1})
                print(
                    f"{a}:{b} rep {rep + 1}/{reps} {slot.upper()} {m:>20}: {measured['wall_s']:7.2f} s wall, "
                    f"{measured['cpu_s']:7.2f} s CPU, {measured['rss_mib']:6d} MiB, "
                    f"{(measured['read_bytes'] or 0) / 1e9:6.2f} GB read",
                    flush=True,
                )

    summary = summarize(runs)
    loads = [r["load1"] for p in runs for r in p["runs_a"] + p["runs_b"]]
    info |= {
        "model": model_name,
        "n_finetunes": len(fts),
        "reps": reps,
        "mergekit_args": ["--quiet", *extra],
        "page_cache": "dropped before each run" if args.cold else "warmed",
        "input_bytes": sum(f.stat().st_size for d in (base, *fts) for f in d.glob("*.safetensors")),
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

"""`--cuda` merges on a GPU: NAN / stock wall time, the norm step on the device, CUDA against CPU.

On a machine with CUDA (README.md here says how to run it on a lent H200):
1. builds merge_cost.py's random 1.03B family (TinyLlama shapes, tied, bf16, base + 3 fine-tunes);
2. times NAN's norm step on the device over the family's own tensors (each base tensor with its 3
   fine-tunes, as a merge norms them) against one device-to-device copy of the same bytes, adds
   norm_throughput.py's one-tensor rates, and counts the host syncs of one `delta_norms` call;
3. times real `mergekit-yaml --cuda` merges, stock then NAN at granularity tensor then layer, for task
   arithmetic and TIES, interleaved per repetition; NAN / stock ratios as merge_cost.py reports them;
4. in the first repetition runs each merge once more on the CPU and compares: per output tensor the
   max |cuda - cpu| (also in units of the last place of the output dtype), and the NAN records'
   norms, coefficients and weights, which must agree to float32 round-off (see the tolerances).
<out>.json and <out>.md are rewritten after each merge, so a run cut short keeps what it measured.

  python benchmarks/perf/cuda_check.py                  # needs CUDA; results/cuda_check.{json,md}
  python benchmarks/perf/cuda_check.py --reps 1 --families task_arithmetic   # a shorter run
  python benchmarks/perf/cuda_check.py --smoke          # CI, CPU only, tiny random LLaMA, 30-50 s

The smoke has no GPU: its "device" merges run on the CPU with the norm's accelerator-side
accumulation forced (float64 totals kept on the tensors' device, one host read per call), so
everything but `--cuda` itself runs, and it fails as the real check does if the records disagree.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import merge_cost  # noqa: E402
import norm_throughput  # noqa: E402

# family -> (stock, NAN granularity tensor, NAN granularity layer): names in merge_cost.METHODS
FAMILIES = {
    "task_arithmetic": ("task_arithmetic", "nan_task_arithmetic", "nan_task_arithmetic_layer"),
    "ties": ("ties", "nan_ties", "nan_ties_layer"),
}
# The smoke's merges (each child is seconds of interpreter start-up on a CI machine): the stock
# method and NAN with the layer pre-pass, whose record holds group norms.
SMOKE_METHODS = ("task_arithmetic", "nan_task_arithmetic_layer")

# CUDA vs CPU NAN records, relative difference. Each side sums squares in float32 slices (2^24
# elements on CUDA in torch's tree reduction, 2^19 on CPU in its cascade sum) and adds the slices
# in float64; each norm is within a few units of float32 round-off (u = 2^-24 = 6e-8) of the
# float64 one (norm_accuracy.py: at most 6e-8 on CPU), so two of them agree to 1e-6 (16 u, margin
# for the reduction's depth). A coefficient a_i = n_i^(-1/T) / sum_j n_j^(-1/T) moves by at most
# 2/T times the largest relative change of the norms: 2e-6 at the default temperature 1.
NORM_TOLERANCE = 1e-6
WEIGHT_TOLERANCE = 2e-6
TOLERANCES = {
    "base_norm": NORM_TOLERANCE,
    "norms": NORM_TOLERANCE,
    "coefficients": WEIGHT_TOLERANCE,
    "weights": WEIGHT_TOLERANCE,
}

# The smoke's stand-in for a --cuda merge (see the module docstring).
FORCED_DEVICE_PATH = r"""
import functools, sys
from mergekit_nan.core import norms
norms._sums_of_squares = functools.partial(norms._sums_of_squares, on_cpu=False)
from mergekit.scripts.run_yaml import main
sys.argv = ["mergekit-yaml", *sys.argv[1:]]
main()
"""


def run(config: Path, out: Path, log: Path, env: dict, on_device: bool, smoke: bool) -> dict:
    """One mergekit-yaml child: on the device (--cuda; the smoke's stand-in) or on the CPU."""
    options = ["--cuda"] if on_device and not smoke else []
    launcher = [sys.executable, "-c", FORCED_DEVICE_PATH] if on_device and smoke else None
    measured = merge_cost.run_merge(config, out, log, options, env, launcher=launcher)
    return {key: measured[key] for key in ("wall_s", "cpu_s", "rss_mib")}


def best_time(step, repeat: int, sync) -> float:
    """The fastest of `repeat` timed calls of `step`, after one untimed (allocator, kernels)."""
    step()
    seconds = math.inf
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        step()
        sync()
        seconds = min(seconds, time.perf_counter() - start)
    return seconds


def norm_step(base: Path, finetunes: list, device, repeat: int, log2: int) -> dict:
    """NAN's norm step on `device`: over the family's tensors, and norm_throughput.py's one tensor."""
    import torch

    result = family_norm_step(base, finetunes, device, repeat)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the family's tensors are gone; the merges' children need the memory
    result["one_tensor"] = {
        variant: norm_throughput.child(variant, "bfloat16", log2, len(finetunes), repeat, str(device))
        for variant in ("chunked", "memory")
    }
    error = result["one_tensor"]["chunked"]["max_rel_error_vs_float64"]
    if not error < 1e-6:
        raise SystemExit(f"norm on {device}: relative error {error:.2e} against float64")
    return result


def family_norm_step(base: Path, finetunes: list, device, repeat: int) -> dict:
    """delta_norms over every tensor of the family on `device`, against a copy of the same bytes."""
    import torch
    from safetensors.torch import load_file

    from mergekit_nan.core.norms import Scratch, delta_norms

    models = [load_file(str(p / "model.safetensors"), device=str(device)) for p in (base, *finetunes)]
    names = [name for name, tensor in models[0].items() if tensor.is_floating_point()]
    nbytes = sum(model[name].nbytes for model in models for name in names)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scratch = Scratch()

    def norm_all(chunk: int) -> None:
        for name in names:
            delta_norms(models[0][name], [model[name] for model in models[1:]], chunk, scratch)

    result = {"device": str(device), "tensors": len(names), "input_bytes": nbytes, "repeat": repeat, "slices": {}}
    for chunk in (0, 1 << 20):  # 0: the default (2^24 elements on an accelerator, 2^19 on CPU)
        seconds = best_time(functools.partial(norm_all, chunk), repeat, sync)
        result["slices"]["default" if chunk == 0 else str(chunk)] = {
            "seconds": seconds,
            "gb_per_s": nbytes / seconds / 1e9,
            "us_per_tensor": seconds / len(names) * 1e6,
        }
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = best_time(functools.partial(target.copy_, source), repeat, sync)
    result["copy"] = {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9}
    if device.type == "cuda":
        result["host_syncs_per_call"] = host_syncs(models, names)
    return result


def host_syncs(models: list, names: list) -> dict:
    """Warnings of CUDA's sync debug mode (one per synchronizing call) in one delta_norms call, per
    tensor shape, and their distinct texts (to check that they are sync warnings)."""
    import torch

    from mergekit_nan.core.norms import delta_norms

    counts, messages = {}, set()
    for name in names:
        shape = str(tuple(models[0][name].shape))
        if shape in counts:
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                delta_norms(models[0][name], [m[name] for m in models[1:]])
        except Exception as exc:  # an API this script could not try without a GPU: report, carry on
            return {"error": repr(exc)}
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts[shape] = len(caught)
        messages.update(str(w.message)[:120] for w in caught)
    return {"per_shape": counts, "messages": sorted(messages)}


def tensor_files(folder: Path) -> dict:
    from safetensors import safe_open

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            found.update((name, path) for name in handle.keys())
    return found


def compare_outputs(device_out: Path, cpu_out: Path) -> dict:
    """Per tensor: max |device - cpu| and the same in units of the last place of its dtype."""
    import torch
    from safetensors import safe_open

    files, cpu_files = tensor_files(device_out), tensor_files(cpu_out)
    if set(files) != set(cpu_files):
        raise SystemExit(f"{device_out} and {cpu_out} hold different tensors")
    per_tensor = {}
    for name in sorted(files):
        with safe_open(str(files[name]), "pt") as a, safe_open(str(cpu_files[name]), "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        if not x.is_floating_point():
            same = torch.equal(x, y)
            per_tensor[name] = {"max_abs": 0.0 if same else math.inf, "max_ulps": 0.0 if same else math.inf}
            continue
        info = torch.finfo(x.dtype)
        x, y = x.float(), y.float()
        difference = (x - y).abs()
        _, exponent = torch.frexp(torch.maximum(x.abs(), y.abs()))  # |v| = f 2^e, f in [0.5, 1)
        spacing = torch.exp2((exponent - 1).float()).clamp_min(info.tiny) * info.eps
        per_tensor[name] = {"max_abs": difference.max().item(), "max_ulps": (difference / spacing).max().item()}
    worst = max(per_tensor, key=lambda n: per_tensor[n]["max_abs"])
    return {
        "max_abs": per_tensor[worst]["max_abs"],
        "max_abs_tensor": worst if per_tensor[worst]["max_abs"] > 0 else None,
        "max_ulps": max(t["max_ulps"] for t in per_tensor.values()),
        "tensors": len(per_tensor),
        "tensors_identical": sum(t["max_abs"] == 0 for t in per_tensor.values()),
        "per_tensor_max_abs": {n: t["max_abs"] for n, t in per_tensor.items()},
    }


def relative(x, y) -> float:
    if x is None or y is None:
        return 0.0 if x is y else math.inf
    return 0.0 if x == y else abs(x - y) / max(abs(x), abs(y))


def compare_records(device_out: Path, cpu_out: Path) -> dict:
    """Largest relative difference of each numeric column of the two nan_coefficients.json."""
    records = [json.loads((p / "nan_coefficients.json").read_text()) for p in (device_out, cpu_out)]
    if records[0]["models"] != records[1]["models"]:
        raise SystemExit(f"the records of {device_out} and {cpu_out} name different models")
    tensors = [{t["name"]: t for t in r["tensors"]} for r in records]
    if set(tensors[0]) != set(tensors[1]):
        raise SystemExit(f"the records of {device_out} and {cpu_out} cover different tensors")
    worst = dict.fromkeys(TOLERANCES, 0.0)
    for name, entry in tensors[0].items():
        other = tensors[1][name]
        for field in worst:
            mine, theirs = entry[field], other[field]
            if field == "base_norm":
                mine, theirs = [mine], [theirs]
            if len(mine) != len(theirs):
                worst[field] = math.inf
            for x, y in zip(mine, theirs):
                worst[field] = max(worst[field], relative(x, y))
    return {
        "tensors": len(tensors[0]),
        "max_rel_diff": worst,
        "tolerance": TOLERANCES,
        "within_tolerance": all(worst[k] <= TOLERANCES[k] for k in worst),
    }


def ratios(timings: dict) -> dict:
    """merge_cost.summarize over NAN:stock pairs (each NAN variant against its family's stock runs)."""
    pairs = []
    for stock, *nans in FAMILIES.values():
        for nan in nans:
            done = min(len(timings.get(nan, ())), len(timings.get(stock, ())))  # whole pairs only
            if done:
                pairs.append({"a": nan, "b": stock, "runs_a": timings[nan][:done], "runs_b": timings[stock][:done]})
    return merge_cost.summarize(pairs) if pairs else {}


def report(result: dict) -> str:
    info, lines = result["info"], []
    norm, comparisons = result.get("norm_step"), result.get("comparisons", {})
    if norm:
        gb = norm["input_bytes"] / 1e9
        copy = norm["copy"]
        lines += [
            f"## Norm step on {norm['device']} ({info['device_name']})",
            "",
            f"The family's {norm['tensors']} tensors, {gb:.3g} GB of input (base + fine-tunes), each normed as a "
            f"merge norms it (`delta_norms`), best of {norm['repeat']}; a device-to-device copy of the same "
            f"{gb:.3g} GB: {copy['seconds'] * 1e3:.3g} ms, {copy['gb_per_s']:.3g} GB/s copied (it reads and "
            "writes each byte, so twice that in memory traffic).",
            "",
            "| slices | seconds | GB/s of input | µs per tensor | time / copy time |",
            "|---|---|---|---|---|",
            *(
                f"| {label} | {row['seconds']:.4f} | {row['gb_per_s']:.3g} | {row['us_per_tensor']:.0f} | "
                f"{row['seconds'] / copy['seconds']:.2f} |"
                for label, row in norm["slices"].items()
            ),
            "",
        ]
        one = norm["one_tensor"]
        lines += [
            f"One tensor of {one['chunked']['elements']} bf16 elements + {one['chunked']['models']} models "
            f"(norm_throughput.py): chunked {one['chunked']['gb_per_s']:.3g} GB/s, float32 `vector_norm` read "
            f"{one['memory']['gb_per_s']:.3g} GB/s; chunked error vs float64 "
            f"{one['chunked']['max_rel_error_vs_float64']:.1e}.",
            "",
        ]
        if "host_syncs_per_call" in norm:
            syncs = norm["host_syncs_per_call"]
            lines += [f"Host syncs in one `delta_norms` call (CUDA's sync debug mode), per tensor shape: {syncs}.", ""]
    if comparisons:
        lines += [
            f"## {info['device_label']} against CPU (first repetition)",
            "",
            "| method | device wall (s) | CPU wall (s) | max abs diff | in tensor | max ulps | identical tensors "
            "| record: norms / coefficients / weights, max rel. diff | within tolerance |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, c in comparisons.items():
            o, r = c["outputs"], c.get("records")
            diffs = (
                " / ".join(f"{r['max_rel_diff'][k]:.1e}" for k in ("norms", "coefficients", "weights")) if r else "-"
            )
            lines.append(
                f"| {method} | {c['device_wall_s']:.2f} | {c['cpu_wall_s']:.2f} | {o['max_abs']:.3g} | "
                f"{f'`{t}`' if (t := o['max_abs_tensor']) else '-'} | {o['max_ulps']:.0f} | {o['tensors_identical']}/{o['tensors']} | "
                f"{diffs} | {('yes' if r['within_tolerance'] else '**no**') if r else '-'} |"
            )
        lines += [
            "",
            f"Tolerances (relative): norms {NORM_TOLERANCE:g}, coefficients and weights {WEIGHT_TOLERANCE:g} "
            "(float32 round-off; see `cuda_check.py`).",
            "",
        ]
    return "\n".join(lines)


def save(prefix: Path, result: dict, started: float) -> None:
    """Write <prefix>.json and <prefix>.md with what `result` holds so far."""
    info = result["info"]
    info["total_s"] = time.perf_counter() - started
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = prefix.with_suffix(".md")
    if result.get("summary"):  # merge_cost.py's tables: per-method medians, NAN / stock ratios
        loads = [r["load1"] for runs in result["timings"].values() for r in runs]
        merge_cost.write_report(md, info | {"load1_min_max": [min(loads), max(loads)]}, result["summary"])
        head = md.read_text()
    else:
        head = f"# {info['model']}\n\n(no merge timed yet)\n"
    md.write_text(head + "\n" + report(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU only, tiny random LLaMA (CI)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of every merge (2; smoke 1)")
    ap.add_argument(
        "--families",
        default=None,
        help=f"comma-separated of {', '.join(FAMILIES)} (all; the smoke runs {' and '.join(SMOKE_METHODS)})",
    )
    ap.add_argument("--repeat", type=int, default=None, help="timed calls of the norm step and the copy (5; smoke 2)")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "cuda_check", help="scratch: configs, logs, outputs")
    ap.add_argument("--out", type=Path, default=None, help="results path prefix (.json/.md)")
    args = ap.parse_args()

    import torch

    families = (args.families or ",".join(FAMILIES)).split(",")
    if unknown := [f for f in families if f not in FAMILIES]:
        ap.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("cuda_check.py needs a CUDA device (--smoke runs its CPU form)")
    device = torch.device("cpu" if args.smoke else "cuda")
    reps = args.reps or (1 if args.smoke else 2)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started, info = time.perf_counter(), merge_cost.machine_info()
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="smoke-", dir=work))
        base, finetunes = merge_cost.build_tiny(tmp / "models")
        prefix = args.out or work / "cuda_check_smoke"
        info |= {"model": "tiny random LLaMA (smoke)", "device_name": "CPU", "device_label": "CPU, device path forced"}
    else:
        tmp = work
        base, finetunes = merge_cost.build_1b(HERE / "cache" / "llama1b")
        prefix = args.out or HERE / "results" / "cuda_check"
        name = torch.cuda.get_device_name()
        model = f"random 1.03B LLaMA (TinyLlama shapes, tied, bf16) + 3 fine-tunes, --cuda on {name}"
        info |= {"model": model, "device_name": name, "device_label": "--cuda", "cuda": torch.version.cuda}
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    info |= {
        "build_s": time.perf_counter() - started,
        "n_finetunes": len(finetunes),
        "reps": reps,
        "methods": list(SMOKE_METHODS) if args.smoke else [m for f in families for m in FAMILIES[f]],
        "mergekit_args": ["--quiet"] + ([] if args.smoke else ["--cuda"]),
        "command": " ".join(sys.argv),
    }
    env, info["mergekit_nan_snapshot_sha256_12"] = merge_cost.snapshot_plugin(tmp / "plugin-snapshot")
    result = {"info": info}
    repeat = args.repeat or (2 if args.smoke else 5)
    result["norm_step"] = norm_step(base, finetunes, device, repeat, 16 if args.smoke else 26)
    save(prefix, result, started)

    merge_cost.warm_page_cache([base, *finetunes])
    timings = result["timings"] = {m: [] for m in info["methods"]}
    comparisons = result["comparisons"] = {}
    for method in timings:
        merge_cost.write_config(tmp / f"{method}.yaml", merge_cost.merge_yaml(method, base, finetunes))
    for rep in range(reps):
        for method in timings:
            config, device_out, cpu_out = tmp / f"{method}.yaml", tmp / "out-device", tmp / "out-cpu"
            load1 = os.getloadavg()[0]
            timed = run(config, device_out, tmp / f"{method}.device.log", env, True, args.smoke) | {"load1": load1}
            timings[method].append(timed)
            print(f"rep {rep + 1}/{reps} {method:>26}: {timed['wall_s']:7.2f} s wall, {timed['cpu_s']:7.2f} s CPU")
            if rep == 0:
                merge_cost.check_output(device_out, base)
                on_cpu = run(config, cpu_out, tmp / f"{method}.cpu.log", env, False, args.smoke)
                comparisons[method] = {"device_wall_s": timed["wall_s"], "cpu_wall_s": on_cpu["wall_s"]}
                comparisons[method]["outputs"] = compare_outputs(device_out, cpu_out)
                if method.startswith("nan_"):
                    comparisons[method]["records"] = compare_records(device_out, cpu_out)
                shutil.rmtree(cpu_out)
                print(
                    f"{'':>37}CPU {on_cpu['wall_s']:7.2f} s; max |device - cpu| {comparisons[method]['outputs']['max_abs']:.3g}"
                )
            shutil.rmtree(device_out)
            result["summary"] = ratios(timings)
            save(prefix, result, started)  # after every merge: a run cut short loses one at most

    print(prefix.with_suffix(".md").read_text())
    if args.smoke:
        shutil.rmtree(tmp)
    outside = [m for m, c in comparisons.items() if "records" in c and not c["records"]["within_tolerance"]]
    if outside:
        raise SystemExit(f"NAN records on the device and on the CPU differ beyond float32 round-off: {outside}")


if __name__ == "__main__":
    main()

"""granularity layer/model on mixture-of-experts checkpoints, through the real mergekit-yaml.

The checkpoints store one tensor per expert (the hub's layout); mergekit 0.1.5 plans
and merges the fused expert tensors of transformers 5 (`mlp.experts.gate_up_proj`),
mergekit 0.1.4 the per-expert ones. Either way a block's norm must cover every stored
tensor of the block (fused or not, the Frobenius norm is the same).
"""

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from checkpoints import load
from merging import (
    load_record,
    mergekit_nan_inspect,
    mergekit_yaml,
    nan_config,
    per_tensor_weight_config,
    read_record,
    weighing_of,
)
from moe_families import moe_family
from safetensors.torch import load_file, save_file

from mergekit_nan.yaml_run import write_config

SCALES = [0.002, 0.01, 0.05]
PRIORS = [1.0, 1.0, 2.0]
# (architecture, tied embeddings): Qwen3-MoE tied, so its embedding counts once in `model`
FAMILIES = {"mixtral": False, "qwen3_moe": True}
GRANULARITIES = ("layer", "model")
BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


def group_of(name: str, granularity: str) -> str:
    if granularity == "model":
        return "model"
    match = BLOCK.match(name)
    return f"layer {match.group(1)}" if match else name


def reference_norms(base, tuned, granularity):
    """Each group's float64 delta norm per model, from the stored (per-expert) tensors."""
    squares = {}
    for name, b in base.items():
        totals = squares.setdefault(group_of(name, granularity), [0.0] * len(tuned))
        for index, t in enumerate(tuned):
            totals[index] += (t[name].double() - b.double()).norm().item() ** 2
    return {group: [s**0.5 for s in totals] for group, totals in squares.items()}


def reference_weights(norms, priors):
    """NAN at T = 1: weights proportional to prior / norm, summing to the priors' total."""
    mass = [p / n for p, n in zip(priors, norms)]
    return [sum(priors) * m / sum(mass) for m in mass]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per (architecture, granularity): the family, the nan_ties merge, inspect's record."""
    root = tmp_path_factory.mktemp("moe")
    families = {arch: moe_family(str(root / arch), arch, SCALES, tied=tied) for arch, tied in FAMILIES.items()}
    cases = [(arch, g) for arch in FAMILIES for g in GRANULARITIES]

    def run(case):
        arch, granularity = case
        config = nan_config(
            "nan_ties", families[arch], PRIORS, "float32", {"granularity": granularity}, {"density": 0.5}
        )
        out = str(root / f"{arch}-{granularity}")
        merge = mergekit_yaml(config, out)
        inspect = mergekit_nan_inspect(
            write_config(root / f"{arch}-{granularity}-inspect.yml", config), "--out", out + "-inspect"
        )
        return config, out, merge, inspect

    with ThreadPoolExecutor(2) as pool:
        return families, dict(zip(cases, pool.map(run, cases)))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", FAMILIES)
def test_block_norms_cover_the_experts_and_the_merge_is_stock_ties(runs, arch, granularity, tmp_path):
    families, results = runs
    config, out, merge, inspect = results[arch, granularity]
    assert merge.returncode == 0, merge.stderr[-2000:]
    base, tuned = load(families[arch][0]), [load(p) for p in families[arch][1:]]
    assert any(".experts.3." in name for name in base)  # the checkpoints store experts one by one
    expected = reference_norms(base, tuned, granularity)
    record = read_record(out)
    assert len(record["tensors"]) >= 2 * 9 + 2
    weights = {}
    for entry in record["tensors"]:
        norms = expected[group_of(entry["name"], granularity)]
        assert entry["norms"] == pytest.approx(norms, rel=1e-6), entry["name"]
        weights[entry["name"]] = reference_weights(norms, PRIORS)
        assert entry["weights"] == pytest.approx(weights[entry["name"]], rel=1e-6), entry["name"]

    stock_config = per_tensor_weight_config(config, weights, "ties")
    stock_config.pop("parameters")  # granularity is NAN's
    stock = mergekit_yaml(stock_config, str(tmp_path / "stock"))
    assert stock.returncode == 0, stock.stderr[-2000:]
    merged, reference = load(out), load(str(tmp_path / "stock"))
    assert merged.keys() == reference.keys() == {t["name"] for t in record["tensors"]}
    for name in merged:
        torch.testing.assert_close(merged[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)

    assert inspect.returncode == 0, inspect.stderr[-2000:]
    inspected = load_record(os.path.join(out + "-inspect", "coefficients.json"))
    # inspect's numbers are the merge's, bit for bit (the order of the converted expert
    # tensors is mergekit's schedule, which differs between the two task graphs)
    assert weighing_of(inspected) == weighing_of(record)


MISSING = "model.layers.1.self_attn.k_proj.weight"


@pytest.fixture
def family_missing_a_tensor(tmp_path):
    paths = moe_family(str(tmp_path / "family"), "mixtral", SCALES)
    state = load_file(os.path.join(paths[2], "model.safetensors"))
    del state[MISSING]
    save_file(state, os.path.join(paths[2], "model.safetensors"))
    return paths


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_a_planned_tensor_missing_from_a_model_is_an_error_naming_both(family_missing_a_tensor, granularity):
    from mergekit.common import ModelReference

    from mergekit_nan.adapters.mergekit_io import group_norms
    from mergekit_nan.core.parameters import NanConfigError, NanSettings

    base, *models = (ModelReference.parse(p) for p in family_missing_a_tensor)
    settings = NanSettings(granularity=granularity)
    with pytest.raises(NanConfigError, match=f"model {re.escape(str(models[1]))} has no tensor {re.escape(MISSING)}"):
        group_norms("model.layers.1.input_layernorm.weight", base, models, settings, torch.float32, torch.device("cpu"))


def test_a_merge_with_a_missing_tensor_fails_naming_it(family_missing_a_tensor, tmp_path):
    config = nan_config("nan_ties", family_missing_a_tensor, PRIORS, "float32", {"granularity": "layer"})
    out = str(tmp_path / "out")
    run = mergekit_yaml(config, out)
    assert run.returncode != 0
    assert MISSING in run.stderr and family_missing_a_tensor[2] in run.stderr
    assert not os.path.exists(os.path.join(out, "nan_coefficients.json"))
    assert not os.path.exists(os.path.join(out, "config.json"))

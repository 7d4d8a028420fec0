"""nan_multislerp and nan_nuslerp through the real `mergekit-yaml`, against independent results.

Each merge must equal stock mergekit's method of the same name given, tensor by tensor,
the weights an independent float64 NAN computation prescribes (0 for a model whose delta
is zero there: the slerp family is handed every model), with every other parameter of the
stock method passed through. nan_nuslerp is also checked against spherical interpolation
of the two deltas written out in float64. In ft0 the q_proj tensors are untouched.
"""

import math
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from checkpoints import load, make_family
from merging import (
    DTYPES,
    TOLERANCE,
    load_record,
    mergekit_nan_inspect,
    mergekit_yaml,
    nan_config,
    per_tensor_weight_config,
    read_record,
    reference_group_weights,
    reference_weights,
    run_in_process,
)

from mergekit_nan.adapters import registered_names
from mergekit_nan.yaml_run import write_config

pytestmark = pytest.mark.skipif(
    not {"nan_multislerp", "nan_nuslerp"} <= set(registered_names()),
    reason="this mergekit has no multislerp or nuslerp",
)

LLAMA_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
GROUP_OF = {
    "layer": lambda n: f"layer {m.group(1)}" if (m := LLAMA_LAYER.match(n)) else n,
    "model": lambda n: "all",
}
# case -> (method, the parameters besides NAN's, NAN's parameters)
CASES = {
    "multislerp": ("multislerp", {}, {}),
    "multislerp-unnormalized": ("multislerp", {"normalize_weights": False, "eps": 1e-6}, {"temperature": 2.0}),
    "nuslerp": ("nuslerp", {}, {}),
    "nuslerp-row-wise": ("nuslerp", {"nuslerp_row_wise": True, "nuslerp_flatten": False}, {"temperature": 0.5}),
    "nuslerp-per-row": ("nuslerp", {"nuslerp_flatten": False}, {}),
}
RUNS = [(case, dtype, "tensor") for case in CASES for dtype in DTYPES] + [
    (case, "float32", granularity) for case in ("multislerp", "nuslerp") for granularity in GROUP_OF
]
PRIORS = {"multislerp": [1.0, 2.0, 0.5], "nuslerp": [1.0, 2.0]}


def members(paths, method):
    """Base and the models merged: all three fine-tunes, or for nuslerp the least and most trained."""
    return paths if method == "multislerp" else [paths[0], paths[1], paths[3]]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("slerp")
    return {
        dtype: make_family(str(root / dtype), [0.002, 0.01, 0.05], dtype=torch_dtype, skip={0: ["q_proj"]})
        for dtype, torch_dtype in DTYPES.items()
    }


@pytest.fixture(scope="module")
def merges(families, tmp_path_factory):
    root = tmp_path_factory.mktemp("slerp-merges")
    jobs = {}
    for case, dtype, granularity in RUNS:
        method, own, nan = CASES[case]
        shared = {**own, **nan, **({"granularity": granularity} if granularity != "tensor" else {})}
        paths = members(families[dtype], method)
        config = nan_config(f"nan_{method}", paths, PRIORS[method], dtype, shared)
        jobs[(case, dtype, granularity)] = (config, str(root / f"{case}-{dtype}-{granularity}"))
    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(jobs, pool.map(lambda job: mergekit_yaml(*job), jobs.values())))
    return jobs, runs


def expected_weights(case, dtype, granularity, families):
    method, _, nan = CASES[case]
    paths = members(families[dtype], method)
    base, tuned = load(paths[0]), [load(p) for p in paths[1:]]
    temperature = nan.get("temperature", 1.0)
    if granularity == "tensor":
        return reference_weights(base, tuned, PRIORS[method], temperature)
    return reference_group_weights(base, tuned, PRIORS[method], temperature, GROUP_OF[granularity])


@pytest.mark.parametrize("case, dtype, granularity", RUNS)
def test_equals_stock_method_with_nan_weights(families, merges, tmp_path, case, dtype, granularity):
    jobs, runs = merges
    run = runs[(case, dtype, granularity)]
    assert run.returncode == 0, run.stderr[-3000:]
    config, out = jobs[(case, dtype, granularity)]
    method = CASES[case][0]
    weights = expected_weights(case, dtype, granularity, families)
    stock_config = per_tensor_weight_config(config, weights, method)
    stock_config.get("parameters", {}).pop("granularity", None)
    stock_out = str(tmp_path / "stock")
    run_in_process(stock_config, stock_out)
    base = load(config["base_model"])
    merged, stock = load(out), load(stock_out)
    assert merged.keys() == stock.keys() == base.keys()
    for name in base:
        assert merged[name].dtype == DTYPES[dtype]
        torch.testing.assert_close(merged[name], stock[name], **TOLERANCE[dtype], msg=name)

    record = read_record(out)
    assert record["merge_method"] == f"nan_{method}" and record["wrapped_method"] == method
    assert record["parameters"]["granularity"] == granularity
    for key, value in CASES[case][1].items():
        assert record["parameters"][key] == value
    for entry in record["tensors"]:
        assert entry["weights"] == pytest.approx(weights[entry["name"]], rel=1e-5), entry["name"]
    frozen = [t for t in record["tensors"] if "q_proj" in t["name"]]
    assert frozen and all(t["weights"][0] == 0 for t in frozen)


def spherical(t, v0, v1):
    """slerp of two flattened float64 vectors, by the textbook formula."""
    a, b = v0.flatten(), v1.flatten()
    theta = math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm())))))
    return ((math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)).reshape(v0.shape)


def test_nuslerp_is_slerp_of_the_deltas_at_nan_share(families, merges):
    """Default nuslerp (flattened): base + slerp(t, delta_0, delta_1) with t = w_1 / (w_0 + w_1);
    where ft0 is untouched, t = 1 and the result is base + ft2's delta."""
    _, out = merges[0][("nuslerp", "float32", "tensor")]
    paths = members(families["float32"], "nuslerp")
    base, first, second = (load(p) for p in paths)
    merged = load(out)
    for name, b in base.items():
        d0, d1 = first[name].double() - b.double(), second[name].double() - b.double()
        n0, n1 = d0.norm().item(), d1.norm().item()
        if "q_proj" in name:
            assert n0 == 0
            expected = b.double() + d1
        else:
            t = (2.0 / n1) / (1.0 / n0 + 2.0 / n1)  # priors 1 and 2, T = 1
            expected = b.double() + spherical(t, d0, d1)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["multislerp-unnormalized", "nuslerp-row-wise"])
def test_inspect_equals_the_merge_record(families, merges, tmp_path, case):
    config, out = merges[0][(case, "bfloat16", "tensor")]
    run = mergekit_nan_inspect(write_config(tmp_path / "c.yml", config), "--out", tmp_path / "inspect")
    assert run.returncode == 0, run.stderr[-2000:]
    assert load_record(tmp_path / "inspect" / "coefficients.json") == read_record(out)  # bit for bit


def test_nuslerp_takes_exactly_two_models(families, tmp_path):
    config = nan_config("nan_nuslerp", families["float32"], [1.0, 1.0, 1.0], "float32")
    run = mergekit_yaml(config, str(tmp_path / "out"))
    assert run.returncode != 0
    assert "nan_nuslerp merges exactly 2 models besides the base model; `models:` has 3" in run.stderr
    assert not (tmp_path / "out").exists()


def test_slice_with_one_model_is_refused(families, tmp_path):
    base, ft0, ft1, _ = families["float32"]
    layers = [0, 2]
    config = {
        "merge_method": "nan_nuslerp",
        "base_model": base,
        "slices": [
            {"sources": [{"model": m, "layer_range": layers} for m in (base, ft0, ft1)]},
            {"sources": [{"model": m, "layer_range": layers} for m in (base, ft0)]},
        ],
        "dtype": "float32",
    }
    run = mergekit_yaml(config, str(tmp_path / "out"))
    assert run.returncode != 0
    assert "`models:` has" not in run.stderr
    assert f"slice 1 has 1 ({ft0})" in run.stderr


@pytest.mark.parametrize("method", ["nan_multislerp", "nan_nuslerp"])
def test_without_base_model_the_error_names_it(families, tmp_path, method):
    paths = families["float32"][1:3]
    config = {"merge_method": method, "models": [{"model": p} for p in paths], "dtype": "float32"}
    run = mergekit_yaml(config, str(tmp_path / "out"))
    assert run.returncode != 0
    assert f"{method} needs `base_model:` in the config" in run.stderr


def test_a_tensor_no_model_changed_is_the_base_where_stock_multislerp_fails(tmp_path):
    """Stock multislerp of three or more task vectors raises on a tensor whose deltas are all zero
    (frozen embeddings, say); nan_multislerp leaves no model taking part there and writes the base
    tensor. (With two models stock multislerp falls back to linear interpolation.)"""
    untouched = {index: ["q_proj"] for index in range(3)}
    paths = make_family(str(tmp_path / "family"), [0.01, 0.02, 0.03], skip=untouched)
    stock = mergekit_yaml(nan_config("multislerp", paths, [1.0] * 3, "float32"), str(tmp_path / "stock"))
    assert stock.returncode != 0 and "weighted sum of the input tensors is zero" in stock.stderr
    run = mergekit_yaml(nan_config("nan_multislerp", paths, [1.0] * 3, "float32"), str(tmp_path / "nan"))
    assert run.returncode == 0, run.stderr[-3000:]
    base, merged = load(paths[0]), load(str(tmp_path / "nan"))
    frozen = [name for name in base if "q_proj" in name]
    assert frozen and all(torch.equal(merged[name], base[name]) for name in frozen)

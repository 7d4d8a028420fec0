"""Every nan_* method through the real `mergekit-yaml`, checked against independent results.

One family of tiny LLaMA checkpoints (a base and three fine-tunes whose deltas differ
25x in size) is merged with each method in float32 and bfloat16. Each result must
equal stock mergekit's method of the same name given, tensor by tensor, the weights
that an independent float64 computation of NAN prescribes; `nan_task_arithmetic`
must also equal base + lambda * sum w_i delta_i written out by hand.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from checkpoints import load, make_family
from merging import (
    DTYPES,
    METHODS,
    PRIORS,
    SEED,
    TOLERANCE,
    default_temperature,
    load_record,
    mergekit_nan_inspect,
    mergekit_yaml,
    nan_config,
    per_tensor_weight_config,
    read_record,
    reference_weights,
    run_in_process,
)

from mergekit_nan.yaml_run import write_config


@pytest.fixture(scope="session")
def sweep(tmp_path_factory):
    """All 16 nan merges, run two at a time, each by the real command line."""
    root = tmp_path_factory.mktemp("sweep")
    families = {d: make_family(str(root / d), [0.002, 0.01, 0.05], dtype=t) for d, t in DTYPES.items()}
    jobs = {}
    for dtype, paths in families.items():
        for method, (shared, per_model) in METHODS.items():
            config = nan_config(f"nan_{method}", paths, PRIORS, dtype, shared, per_model)
            jobs[(method, dtype)] = (config, str(root / f"out-nan_{method}-{dtype}"))
    with ThreadPoolExecutor(2) as pool:
        runs = dict(
            zip(jobs, pool.map(lambda job: mergekit_yaml(job[0], job[1], "--random-seed", str(SEED)), jobs.values()))
        )
    return families, jobs, runs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_equals_stock_method_with_nan_weights(sweep, tmp_path, method, dtype):
    families, jobs, runs = sweep
    run = runs[(method, dtype)]
    assert run.returncode == 0, run.stderr[-3000:]
    config, out = jobs[(method, dtype)]
    paths = families[dtype]
    base, tuned = load(paths[0]), [load(p) for p in paths[1:]]
    temperature = METHODS[method][0].get("temperature", default_temperature(method))
    weights = reference_weights(base, tuned, PRIORS, temperature)

    stock_out = str(tmp_path / "stock")
    run_in_process(per_tensor_weight_config(config, weights, method), stock_out, seed=SEED)
    merged, stock = load(out), load(stock_out)
    assert merged.keys() == stock.keys() == base.keys()
    for name in base:
        assert merged[name].dtype == DTYPES[dtype]
        torch.testing.assert_close(merged[name], stock[name], **TOLERANCE[dtype], msg=name)
        assert not torch.equal(merged[name], base[name]), name

    record = read_record(out)
    assert record["merge_method"] == f"nan_{method}" and record["wrapped_method"] == method
    assert record["models"] == paths[1:] and record["base_model"] == paths[0]
    assert record["parameters"]["temperature"] == temperature
    assert sorted(t["name"] for t in record["tensors"]) == sorted(base)
    for entry in record["tensors"]:
        assert entry["weights"] == pytest.approx(weights[entry["name"]], rel=1e-5)
        assert sum(entry["coefficients"]) == pytest.approx(1.0)
        assert entry["priors"] == PRIORS


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_equals_closed_form(sweep, dtype):
    families, jobs, runs = sweep
    shared, _ = METHODS["task_arithmetic"]
    paths = families[dtype]
    base, tuned = load(paths[0]), [load(p) for p in paths[1:]]
    weights = reference_weights(base, tuned, PRIORS, shared["temperature"])
    merged = load(jobs[("task_arithmetic", dtype)][1])
    for name, b in base.items():
        delta = sum(w * (t[name].double() - b.double()) for w, t in zip(weights[name], tuned))
        expected = (b.double() + shared["lambda"] * delta).to(DTYPES[dtype])
        torch.testing.assert_close(merged[name], expected, **TOLERANCE[dtype], msg=name)


def test_model_card_names_nan_and_the_paper(sweep):
    _, jobs, _ = sweep
    out = jobs[("ties", "float32")][1]
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "[NAN + TIES](https://arxiv.org/abs/2505.16148)" in card
    record = read_record(out)
    assert "### NAN coefficients" in card and "`temperature: 1.0`" in card
    for index, model in enumerate(record["models"]):
        coefficients = [t["coefficients"][index] for t in record["tensors"]]
        mean = sum(coefficients) / len(coefficients)
        # the delta norm relative to the others: median over tensors of n_i / geometric mean
        ratios = sorted(t["norms"][index] / math.prod(t["norms"]) ** (1 / len(t["norms"])) for t in record["tensors"])
        middle = len(ratios) // 2
        relative = ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2
        factors = [t["weights"][index] / t["priors"][index] for t in record["tensors"]]
        factor = sum(factors) / len(factors)
        row = (
            f"| {model} | {relative:.2f} | {mean:.3f} | {min(coefficients):.3f} | {max(coefficients):.3f} "
            f"| {factor:.3f} |"
        )
        assert row in card
    # ft2's delta is 25x ft0's: its coefficient is under a quarter of an equal share everywhere
    assert f"{record['models'][2]} gets less than 25% of an equal share on {len(record['tensors'])} of the" in card
    assert f"{record['models'][0]} gets less than" not in card


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties", "ties"])
def test_unset_temperature_is_the_methods_default(tmp_path, method):
    """With no `temperature` in the config, each method merges at its documented default
    (4 for task arithmetic and DARE-TIES, the paper's 1 for TIES), and the record, the
    card and `inspect` all say so."""
    paths = make_family(str(tmp_path / "family"), [0.002, 0.01, 0.05])
    per_model = METHODS[method][1]
    config = nan_config(f"nan_{method}", paths, PRIORS, "float32", None, per_model)
    out = str(tmp_path / "nan")
    run = mergekit_yaml(config, out, "--random-seed", str(SEED))
    assert run.returncode == 0, run.stderr[-3000:]
    temperature = default_temperature(method)
    base, tuned = load(paths[0]), [load(p) for p in paths[1:]]
    weights = reference_weights(base, tuned, PRIORS, temperature)
    run_in_process(per_tensor_weight_config(config, weights, method), str(tmp_path / "stock"), seed=SEED)
    merged, stock = load(out), load(str(tmp_path / "stock"))
    for name in base:
        torch.testing.assert_close(merged[name], stock[name], **TOLERANCE["float32"], msg=name)

    record = read_record(out)
    assert record["parameters"]["temperature"] == temperature
    for entry in record["tensors"]:
        assert entry["weights"] == pytest.approx(weights[entry["name"]], rel=1e-5)
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert f"`temperature: {temperature}`" in card

    inspected = tmp_path / "inspect"
    config_file = write_config(tmp_path / "c.yml", config)
    look = mergekit_nan_inspect(config_file, "--out", inspected)
    assert look.returncode == 0, look.stderr[-2000:]
    assert load_record(inspected / "coefficients.json") == record

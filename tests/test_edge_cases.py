"""Untouched tensors, NaN/Inf inputs and bad configs, through mergekit's real pipeline."""

import glob
import os

import pytest
import torch
from checkpoints import load, make_family
from edge_families import POISONED, poisoned_family
from merging import (
    default_temperature,
    mergekit_yaml,
    nan_config,
    per_tensor_weight_config,
    read_record,
    reference_weights,
    run_in_process,
)
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def lora_like(tmp_path_factory):
    """ft0 never touched q_proj or k_proj; nobody touched k_proj (as LoRAs on other modules)."""
    root = tmp_path_factory.mktemp("lora_like")
    skip = {0: ["q_proj", "k_proj"], 1: ["k_proj"], 2: ["k_proj"]}
    return make_family(str(root), [0.002, 0.01, 0.05], skip=skip)


def test_untouched_tensors(lora_like, tmp_path):
    paths = lora_like
    out = str(tmp_path / "ta")
    run_in_process(nan_config("nan_task_arithmetic", paths, [1, 1, 1], "float32"), out)
    base, tuned, merged = load(paths[0]), [load(p) for p in paths[1:]], load(out)
    weights = reference_weights(base, tuned, [1, 1, 1], default_temperature("nan_task_arithmetic"))
    record = {t["name"]: t for t in read_record(out)["tensors"]}
    for name, b in base.items():
        if "k_proj" in name:  # every delta zero: the output is the base tensor
            assert torch.equal(merged[name], b), name
            assert record[name]["weights"] == [0.0, 0.0, 0.0]
            continue
        if "q_proj" in name:  # ft0 takes no part; the other two share a budget of 2
            assert record[name]["coefficients"][0] == 0.0 and record[name]["weights"][0] == 0.0
            assert sum(record[name]["weights"]) == pytest.approx(2.0)
        expected = b.double() + sum(w * (t[name].double() - b.double()) for w, t in zip(weights[name], tuned))
        torch.testing.assert_close(merged[name], expected.float(), rtol=1e-5, atol=1e-6, msg=name)


def test_untouched_model_stays_out_of_ties_vote(lora_like, tmp_path):
    paths = lora_like
    config = nan_config("nan_ties", paths, [1, 1, 1], "float32", model_parameters={"density": 0.5})
    run_in_process(config, str(tmp_path / "nan"))
    base, tuned = load(paths[0]), [load(p) for p in paths[1:]]
    stock = per_tensor_weight_config(config, reference_weights(base, tuned, [1, 1, 1], 1.0), "ties")
    run_in_process(stock, str(tmp_path / "stock"))
    merged, expected = load(str(tmp_path / "nan")), load(str(tmp_path / "stock"))
    for name in base:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def assert_no_finished_model(out):
    assert not os.path.exists(os.path.join(out, "config.json"))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "nan_coefficients.json"))
    for shard in glob.glob(os.path.join(out, "*.safetensors")):
        assert all(torch.isfinite(t).all() for t in load_file(shard).values())


@pytest.mark.parametrize("where, poison", [("ft", float("nan")), ("base", float("inf"))])
def test_non_finite_input_stops_the_merge_naming_tensor_and_model(tmp_path, where, poison):
    paths = poisoned_family(str(tmp_path), where, poison)
    out = str(tmp_path / "out")
    run = mergekit_yaml(nan_config("nan_ties", paths, [1, 1], "float32"), out)
    assert run.returncode != 0
    culprit = paths[0] if where == "base" else paths[1]
    assert f"NaN or Inf in tensor {POISONED} of model {culprit}" in run.stderr
    assert_no_finished_model(out)


@pytest.mark.parametrize("temperature", [-1, 0, "hot", ".nan"])
def test_bad_temperature_fails_before_loading_tensors(lora_like, tmp_path, temperature):
    config = nan_config("nan_ties", lora_like, [1, 1, 1], "float32", {"temperature": temperature})
    if temperature == ".nan":
        config["parameters"]["temperature"] = float("nan")
    out = str(tmp_path / "out")
    if temperature == -1:  # once through the real command line
        run = mergekit_yaml(config, out)
        assert run.returncode != 0 and "`temperature`" in run.stderr
        assert "Executing graph" not in run.stderr  # stopped while planning
    else:
        with pytest.raises(Exception, match="`temperature`"):
            run_in_process(config, out)
    assert_no_finished_model(out)


def test_missing_base_model_is_explained(lora_like, tmp_path):
    config = nan_config("nan_task_arithmetic", lora_like, [1, 1, 1], "float32")
    del config["base_model"]
    out = str(tmp_path / "out")
    run = mergekit_yaml(config, out)
    assert run.returncode != 0
    assert "nan_task_arithmetic needs `base_model:`" in run.stderr
    assert_no_finished_model(out)


def test_negative_weight_names_model_and_parameter(lora_like, tmp_path):
    config = nan_config("nan_task_arithmetic", lora_like, [1, -1, 1], "float32")
    with pytest.raises(ValueError, match=f"`weight` of model {lora_like[2]} is -1"):
        run_in_process(config, str(tmp_path / "out"))

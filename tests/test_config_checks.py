"""Configs are checked once, while the merge is planned and before any tensor loads;
`inspect` fails, or passes, exactly where the merge does."""

import logging

import pytest
import torch
from checkpoints import load, make_family
from edge_families import poisoned_family
from merging import default_temperature, mergekit_yaml, nan_config, read_record, run_in_process


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(str(tmp_path_factory.mktemp("checks")), [0.01, 0.03, 0.02])


def linear_config(paths, priors, **shared):
    config = {
        "merge_method": "nan_linear",
        "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths, priors)],
        "dtype": "float32",
    }
    if shared:
        config["parameters"] = shared
    return config


def with_model_parameter(config, index, **parameters):
    config["models"][index]["parameters"].update(parameters)
    return config


# name -> (config builder, text the error must contain); each fails before any tensor loads
BAD = {
    "misspelled temperature": (
        lambda f: nan_config("nan_ties", f, [1, 1, 1], "float32", {"temprature": 2}),
        "unknown parameter `temprature` in the top-level `parameters:`; did you mean `temperature`?",
    ),
    "temperature per model": (
        lambda f: with_model_parameter(nan_config("nan_ties", f, [1, 1, 1], "float32"), 1, temperature=5),
        "`temperature` is set for model {ft1}, but NAN's `temperature` is shared by all models",
    ),
    "granularity bogus": (
        lambda f: nan_config("nan_ties", f, [1, 1, 1], "float32", {"granularity": "bogus"}),
        "NAN parameter `granularity` must be one of tensor, layer, model; got 'bogus'",
    ),
    "norm_of bogus": (
        lambda f: nan_config("nan_task_arithmetic", f, [1, 1, 1], "float32", {"norm_of": "bogus"}),
        "NAN parameter `norm_of` must be one of delta, weights; got 'bogus'",
    ),
    "temperature zero": (
        lambda f: nan_config("nan_ties", f, [1, 1, 1], "float32", {"temperature": 0}),
        "NAN parameter `temperature` must be a finite number > 0, got 0",
    ),
    "negative weight": (
        lambda f: nan_config("nan_task_arithmetic", f, [1, -1, 1], "float32"),
        "nan_task_arithmetic: `weight` of model {ft1} is -1",
    ),
    "infinite weight in a filter": (
        lambda f: with_model_parameter(
            nan_config("nan_ties", f, [1, 1, 1], "float32"),
            0,
            weight=[{"filter": "mlp", "value": float("inf")}, {"value": 1.0}],
        ),
        "nan_ties: `weight` of model {ft0} is inf",
    ),
    "nan_linear weights all zero": (
        lambda f: linear_config(f[1:], [0, 0, 0]),
        "nan_linear: every model's `weight` is 0; a weighted average needs at least one weight > 0",
    ),
}


def expected_text(case, family):
    return BAD[case][1].format(ft0=family[1], ft1=family[2])


@pytest.fixture
def count_loads(monkeypatch):
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    loads = []
    original = LazyTensorLoader.get_tensor

    def counting(self, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("key"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", counting)
    return loads


@pytest.mark.parametrize("case", BAD)
def test_bad_config_fails_before_loading_and_inspect_agrees(family, tmp_path, case, count_loads):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_nan.inspect import inspect_config

    config = BAD[case][0](family)
    with pytest.raises(Exception) as merge_error:
        run_in_process(config, str(tmp_path / "out"))
    assert expected_text(case, family) in str(merge_error.value)
    assert count_loads == []  # stopped while planning
    assert not (tmp_path / "out").exists()
    with pytest.raises(Exception) as inspect_error:
        inspect_config(MergeConfiguration.model_validate(config), MergeOptions(quiet=True))
    assert str(inspect_error.value) == str(merge_error.value)


def test_bad_config_through_mergekit_yaml(family, tmp_path):
    run = mergekit_yaml(BAD["misspelled temperature"][0](family), str(tmp_path / "out"))
    assert run.returncode != 0
    assert expected_text("misspelled temperature", family) in run.stderr
    assert "Executing graph" not in run.stderr


def test_unknown_key_warns_naming_the_nearest_parameter_and_merges(family, tmp_path, caplog):
    config = nan_config("nan_task_arithmetic", family, [1, 1, 1], "float32", {"sharpness": 3})
    with caplog.at_level(logging.WARNING, logger="mergekit_nan"):
        run_in_process(config, str(tmp_path / "out"))
    assert (
        "nan_task_arithmetic: parameter `sharpness` in the top-level `parameters:` is not a parameter of "
        "nan_task_arithmetic and is ignored; the nearest known parameter is"
    ) in caplog.text
    assert read_record(str(tmp_path / "out"))["parameters"]["temperature"] == default_temperature("nan_task_arithmetic")


def test_nan_linear_with_a_zero_weight_merges_like_stock_linear(family, tmp_path):
    paths, priors = family[1:], [1.0, 0.0, 2.0]
    out = str(tmp_path / "out")
    run = mergekit_yaml(linear_config(paths, priors), out)
    assert run.returncode == 0, run.stderr[-2000:]
    models, merged = [load(p) for p in paths], load(out)
    record = {t["name"]: t for t in read_record(out)["tensors"]}
    for name in models[0]:
        norms = [m[name].double().norm().item() for m in models]
        alpha = [1 / n / sum(1 / x for x in norms) for n in norms]
        expected = sum(p * a * m[name].double() for p, a, m in zip(priors, alpha, models)) / sum(
            p * a for p, a in zip(priors, alpha)
        )
        torch.testing.assert_close(merged[name], expected.float(), rtol=1e-5, atol=1e-6, msg=name)
        assert record[name]["weights"][1] == 0.0 and record[name]["coefficients"] == pytest.approx(alpha, rel=1e-6)


def test_a_config_of_the_base_alone_merges_and_inspects(family, tmp_path):
    from merging import mergekit_nan_inspect

    from mergekit_nan.yaml_run import write_config

    config = {"merge_method": "nan_ties", "base_model": family[0], "models": [{"model": family[0]}], "dtype": "float32"}
    out = str(tmp_path / "out")
    run = mergekit_yaml(config, out)
    assert run.returncode == 0, run.stderr[-2000:]
    base, merged = load(family[0]), load(out)
    assert all(torch.equal(merged[k], v) for k, v in base.items())
    inspect = mergekit_nan_inspect(write_config(tmp_path / "c.yml", config))
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    assert "No model other than the base takes part" in inspect.stdout


def test_inspect_on_a_nan_input_names_tensor_and_model_and_no_folder(tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_nan.inspect import inspect_config

    paths = poisoned_family(str(tmp_path / "p"), "ft", float("nan"))
    config = nan_config("nan_ties", paths, [1, 1], "float32")
    with pytest.raises(ValueError) as error:
        inspect_config(MergeConfiguration.model_validate(config), MergeOptions(quiet=True))
    assert (
        str(error.value)
        == f"NaN or Inf in tensor model.layers.1.mlp.up_proj.weight of model {paths[1]}; refusing to merge it"
    )

"""The shipped example configs are valid mergekit configs for registered nan_* methods."""

import glob
import os

import pytest
import yaml

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "example_configs", "*.yml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_valid(path):
    from mergekit.config import MergeConfiguration

    from mergekit_nan.adapters import generation

    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    config = MergeConfiguration.model_validate(raw)
    assert config.merge_method.startswith("nan_")
    assert (config.base_model is None) == (config.merge_method == "nan_linear")
    known = set(generation().parameter_names(config.merge_method))
    named = set(raw.get("parameters") or {})
    for model in raw["models"]:
        named |= set(model.get("parameters") or {})
    assert named <= known, named - known


def test_one_config_per_method():
    from mergekit_nan.adapters import WRAPPED_METHODS

    names = {os.path.basename(p)[:-4] for p in CONFIGS}
    assert {f"nan_{m}" for m in WRAPPED_METHODS} | {"nan_linear"} <= names

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
    from mergekit_nan.adapters import SLERP_METHODS, WRAPPED_METHODS

    names = {os.path.basename(p)[:-4] for p in CONFIGS}
    assert {f"nan_{m}" for m in WRAPPED_METHODS + SLERP_METHODS} | {"nan_linear"} <= names


def test_the_readme_names_what_the_demo_writes_and_writes_only_ignored_paths():
    """example_configs/README.md: every demo path is one the demo writes, and every file its
    commands write is one git ignores (nothing lands untracked in the repository)."""
    import re
    import subprocess

    from mergekit_nan.demo import TASKS

    root = os.path.join(os.path.dirname(__file__), "..")
    text = open(os.path.join(root, "example_configs", "README.md"), encoding="utf-8").read()
    demo_files = (
        {"base"} | {f"ft-{t}" for t in TASKS} | {f"merged-{m}{e}" for m in ("ties", "nan_ties") for e in ("", ".yml")}
    )
    written = re.findall(r"> (\S+)", text) + re.findall(r"mergekit-yaml \S+ (\S+)", text)
    assert written
    for path in re.findall(r"demo-out/seed\d/([\w.-]+)", text):
        assert path in demo_files, path
    for path in re.findall(r"demo-out/[\w.-]+", text):
        assert re.fullmatch(r"demo-out/seed\d", path) or path in written, path
    for path in written:
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=root)
        assert ignored.returncode == 0, f"{path} would be left untracked in the repository"

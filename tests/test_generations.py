"""Both mergekit API generations give the same record for the same merge.

Needs the other generation's environment: set MERGEKIT_NAN_OTHER_PYTHON to its
interpreter (CI does). Each environment's stock-equality tests (test_merges.py and
others) check the merged tensors against that environment's own stock methods.
"""

import json
import os
import pathlib
import subprocess

import pytest
from checkpoints import make_family
from merging import mergekit_yaml, nan_config

OTHER = os.environ.get("MERGEKIT_NAN_OTHER_PYTHON")


def mergekit_version(python):
    code = "from importlib.metadata import version; print(version('mergekit'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not OTHER, reason="set MERGEKIT_NAN_OTHER_PYTHON to the other generation's python")
@pytest.mark.parametrize(
    "method, shared, per_model",
    [
        ("nan_ties", {"temperature": 0.7, "lambda": 1}, {"density": 0.6}),
        ("nan_task_arithmetic", {"granularity": "layer"}, {}),
        ("nan_linear", {}, {}),
        ("nan_multislerp", {"normalize_weights": False}, {}),
        ("nan_nuslerp", {"nuslerp_flatten": False}, {}),
    ],
)
def test_same_record_under_both_generations(tmp_path, monkeypatch, method, shared, per_model):
    import sys

    assert mergekit_version(OTHER) != mergekit_version(sys.executable), "the two environments hold the same mergekit"
    paths = make_family(str(tmp_path / "family"), [0.003, 0.02, 0.01])
    if method == "nan_linear":
        config = {
            "merge_method": method,
            "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths, [1, 2, 1])],
            "dtype": "float32",
        }
    elif method == "nan_nuslerp":  # two models
        config = nan_config(method, paths[:3], [1, 2], "float32", shared, per_model)
    else:
        config = nan_config(method, paths, [1, 2, 1], "float32", shared, per_model)
    here, there = str(tmp_path / "here"), str(tmp_path / "there")
    # each its own norm cache, so that both compute every norm (a record says how many it read)
    monkeypatch.setenv("MERGEKIT_NAN_NORM_CACHE", str(tmp_path / "cache-here"))
    run = mergekit_yaml(config, here)
    assert run.returncode == 0, run.stderr[-2000:]
    command = str(pathlib.Path(OTHER).parent / "mergekit-yaml")
    monkeypatch.setenv("MERGEKIT_NAN_NORM_CACHE", str(tmp_path / "cache-there"))
    run = mergekit_yaml(config, there, command=command)
    assert run.returncode == 0, run.stderr[-2000:]
    mine = pathlib.Path(here, "nan_coefficients.json").read_bytes()
    theirs = pathlib.Path(there, "nan_coefficients.json").read_bytes()
    assert mine == theirs, (json.loads(mine)["parameters"], json.loads(theirs)["parameters"])

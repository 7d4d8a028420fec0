"""What an output folder says after a merge: a finished merge, or what it held before.

A folder with config.json and weights holds one finished merge, and a
nan_coefficients.json in it belongs to that merge; a failed NAN merge leaves nothing of
its own behind and says what the folder holds.
"""

import hashlib
import os
import signal
import subprocess
import time

import pytest
from checkpoints import make_family
from edge_families import POISONED, poisoned_family
from merging import mergekit_yaml, nan_config, read_record

from mergekit_nan.adapters.lifecycle import LOCK_FILENAME
from mergekit_nan.yaml_run import command_path, write_config


def snapshot(folder):
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
    }


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    return {
        "good": make_family(str(root / "good"), [0.01, 0.03]),
        "other": make_family(str(root / "other"), [0.02, 0.05, 0.01]),
        "poisoned": poisoned_family(str(root / "poisoned"), "ft", float("nan")),
    }


def test_failed_rerun_leaves_the_earlier_merge_as_it_was(families, tmp_path):
    out = str(tmp_path / "out")
    good = mergekit_yaml(nan_config("nan_ties", families["good"], [1, 1], "float32"), out)
    assert good.returncode == 0, good.stderr[-2000:]
    before = snapshot(out)
    # small shards, so the failing run has written several before it meets the NaN
    run = mergekit_yaml(nan_config("nan_ties", families["poisoned"], [1, 1], "float32"), out, "--out-shard-size", "20K")
    assert run.returncode != 0
    assert f"NaN or Inf in tensor {POISONED} of model {families['poisoned'][1]}" in run.stderr
    assert f"{out} still holds the model of an earlier merge, as it was before this run" in run.stderr
    assert snapshot(out) == before  # byte for byte, and no shard of the failed run left


def test_failed_merge_into_a_new_folder_leaves_no_weights(families, tmp_path):
    out = str(tmp_path / "out")
    run = mergekit_yaml(nan_config("nan_ties", families["poisoned"], [1, 1], "float32"), out, "--out-shard-size", "20K")
    assert run.returncode != 0
    assert f"{out} holds no merged model" in run.stderr
    assert not os.path.exists(out) or not [n for n in os.listdir(out) if n.endswith(".safetensors")]


def test_a_stock_merge_removes_an_earlier_nan_record(families, tmp_path):
    out = str(tmp_path / "out")
    assert mergekit_yaml(nan_config("nan_ties", families["good"], [1, 1], "float32"), out).returncode == 0
    assert read_record(out)["models"] == families["good"][1:]
    stock = nan_config("ties", families["other"], [1, 1, 1], "float32")
    run = mergekit_yaml(stock, out)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "nan_coefficients.json"))


def test_a_nan_merge_replaces_the_record_and_the_shards_of_an_earlier_merge(families, tmp_path):
    out = str(tmp_path / "out")
    first = mergekit_yaml(
        nan_config("nan_ties", families["other"], [1, 1, 1], "float32"), out, "--out-shard-size", "20K"
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    second = mergekit_yaml(nan_config("nan_task_arithmetic", families["good"], [1, 1], "float32"), out)
    assert second.returncode == 0, second.stderr[-2000:]
    weights = sorted(n for n in os.listdir(out) if ".safetensors" in n)
    assert weights == ["model.safetensors"]  # the 20K shards and their index were another merge's
    record = read_record(out)
    assert record["merge_method"] == "nan_task_arithmetic" and record["models"] == families["good"][1:]


def start_merge(config, out, *extra):
    """A real mergekit-yaml, started and not waited for."""
    launcher = write_config(out + ".yml", {**config, "dtype": "float32"})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [command_path("mergekit-yaml"), str(launcher), out, "--no-copy-tokenizer", *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stopped_mid_merge(config, out):
    """Start a merge and stop it (SIGSTOP) once it has written its first temporary shard."""
    child = start_merge(config, out, "--out-shard-size", "20K")
    first_shard = os.path.join(out, "model-1.safetensors")
    while not os.path.exists(first_shard):
        assert child.poll() is None, f"the merge ended before it could be stopped: {child.communicate()[1][-2000:]}"
        time.sleep(0.001)
    os.kill(child.pid, signal.SIGSTOP)
    return child


def test_a_second_merge_into_a_folder_in_use_is_refused(families, tmp_path):
    out = str(tmp_path / "out")
    first_config = nan_config("nan_ties", families["other"], [1, 1, 1], "float32")
    first = stopped_mid_merge(first_config, out)
    try:
        second = mergekit_yaml(nan_config("nan_task_arithmetic", families["good"], [1, 1], "float32"), out)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, first_err = first.communicate(timeout=600)
    assert second.returncode != 0
    assert f"Another merge is writing into {out}" in second.stderr, second.stderr[-2000:]
    assert first.returncode == 0, first_err[-2000:]
    # the folder is the first merge alone, and its record describes it
    assert read_record(out)["models"] == families["other"][1:]
    alone = str(tmp_path / "alone")
    assert mergekit_yaml(first_config, alone, "--out-shard-size", "20K").returncode == 0
    card = "README.md"  # the model card names the folder
    mine, solo = snapshot(out), snapshot(alone)
    assert mine.pop(card) and solo.pop(card)
    assert mine == solo  # byte for byte: no lock file left, no shard of the second


def test_a_killed_merge_leaves_no_lock_that_stops_the_next(families, tmp_path):
    out = str(tmp_path / "out")
    killed = stopped_mid_merge(nan_config("nan_ties", families["other"], [1, 1, 1], "float32"), out)
    killed.kill()
    killed.communicate()
    # a stock merge takes the folder too: the lock the killed merge held is free again
    run = mergekit_yaml(nan_config("ties", families["good"], [1, 1], "float32"), out)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, LOCK_FILENAME))
    assert not os.path.exists(os.path.join(out, "nan_coefficients.json"))

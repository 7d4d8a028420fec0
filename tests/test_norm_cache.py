"""The norm cache of granularity layer/model, through the real mergekit-yaml: it serves
what an earlier merge or inspect computed, and is never wrong (a file rewritten in place,
corrupt cache files, two merges filling it at once, a cache that cannot be written)."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from checkpoints import load, make_family
from merging import BIN, mergekit_nan_inspect, mergekit_yaml, nan_config, read_record, reference_group_weights

from mergekit_nan.core.norm_cache import CACHE_FORMAT, ENVIRONMENT_VARIABLE, default_directory
from mergekit_nan.yaml_run import write_config

PRIORS = [1.0, 1.0, 2.0]
TEMPERATURE = 0.5
TENSORS = 21  # of the tiny LLaMA: 2 blocks of 9, embeddings, final norm, head
EVERY_NORM = 4 * TENSORS  # each tensor's base norm and 3 delta norms


@pytest.fixture
def family(tmp_path):
    return make_family(str(tmp_path / "family"), [0.002, 0.01, 0.05], skip={0: ["q_proj"]})


def config_of(family, granularity="model", dtype="float32"):
    parameters = {"granularity": granularity, "temperature": TEMPERATURE}
    return nan_config("nan_task_arithmetic", family, PRIORS, dtype, parameters)


def merged(config, out, cache, monkeypatch, *extra):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(cache))
    run = mergekit_yaml(config, str(out), *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def assert_matches_reference(family, out, granularity="model"):
    """The merged model and its weights against float64 norms of the files as they are now."""
    base, tuned = load(family[0]), [load(p) for p in family[1:]]
    group_of = (lambda n: "all") if granularity == "model" else (lambda n: n.split(".")[2] if ".layers." in n else n)
    weights = reference_group_weights(base, tuned, PRIORS, TEMPERATURE, group_of)
    result = load(str(out))
    record = {t["name"]: t for t in read_record(str(out))["tensors"]}
    for name, b in base.items():
        assert record[name]["weights"] == pytest.approx(weights[name], rel=1e-6), name
        expected = b.double() + sum(w * (t[name].double() - b.double()) for w, t in zip(weights[name], tuned))
        torch.testing.assert_close(result[name], expected.float(), rtol=1e-5, atol=1e-6, msg=name)


def cache_use(out):
    return read_record(str(out)).get("norm_cache")


def cache_files(cache):
    return sorted(glob.glob(os.path.join(str(cache), "*", "*.json")))


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_a_second_merge_reads_every_norm_from_the_cache(family, tmp_path, monkeypatch, granularity):
    cache = tmp_path / "cache"
    config = config_of(family, granularity)
    merged(config, tmp_path / "first", cache, monkeypatch)
    assert cache_use(tmp_path / "first") == {"read": 0, "added": EVERY_NORM}
    merged(config, tmp_path / "second", cache, monkeypatch)
    assert cache_use(tmp_path / "second") == {"read": EVERY_NORM, "added": 0}
    assert_matches_reference(family, tmp_path / "second", granularity)
    first, second = load(str(tmp_path / "first")), load(str(tmp_path / "second"))
    assert all(torch.equal(first[name], second[name]) for name in first)
    # another dtype is another norm: a bfloat16 merge computes its own
    merged(config_of(family, granularity, "bfloat16"), tmp_path / "bf16", cache, monkeypatch)
    assert cache_use(tmp_path / "bf16") == {"read": 0, "added": EVERY_NORM}


def test_inspect_fills_the_cache_for_the_merge(family, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    config_path = str(tmp_path / "model.yml")
    write_config(config_path, config_of(family))
    inspected = mergekit_nan_inspect(config_path, "--norm-cache", str(cache), "--out", str(tmp_path / "inspected"))
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    assert f"layer/model norms: 0 read from the norm cache, {EVERY_NORM} computed" in inspected.stdout
    merged(config_of(family), tmp_path / "out", cache, monkeypatch)
    assert cache_use(tmp_path / "out") == {"read": EVERY_NORM, "added": 0}
    assert_matches_reference(family, tmp_path / "out")


def rewrite_in_place(path, name, value):
    """Overwrite tensor `name` of a float32 safetensors file byte for byte (same size),
    then set its access and modification times back to what they were."""
    before = os.stat(path)
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        entry = json.loads(handle.read(length))[name]
        start, stop = entry["data_offsets"]
        handle.seek(8 + length + start)
        handle.write(value.to(torch.float32).contiguous().numpy().tobytes())
        assert handle.tell() == 8 + length + stop
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_file_rewritten_in_place_is_not_served_from_the_cache(family, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    merged(config_of(family), tmp_path / "first", cache, monkeypatch)
    path = os.path.join(family[2], "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensor = load(family[2])[name]
    rewrite_in_place(path, name, tensor + 0.5 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(3)))
    merged(config_of(family), tmp_path / "second", cache, monkeypatch)
    # every norm of the rewritten file is taken again (the other files' are served)
    assert cache_use(tmp_path / "second") == {"read": EVERY_NORM - TENSORS, "added": TENSORS}
    assert_matches_reference(family, tmp_path / "second")


def test_corrupt_cache_files_are_ignored_once_and_rebuilt(family, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    merged(config_of(family), tmp_path / "first", cache, monkeypatch)
    files = cache_files(cache)
    assert len(files) == 4  # the base's norms and one table per (model, base)
    truncated, garbage, other_format, wrong_value = files
    with open(truncated, "r+b") as handle:
        handle.truncate(os.path.getsize(truncated) // 2)
    with open(garbage, "wb") as handle:
        handle.write(b"\x00\xffnot json")
    with open(other_format, encoding="utf-8") as handle:
        document = json.load(handle)
    with open(other_format, "w", encoding="utf-8") as handle:
        json.dump({**document, "format": "mergekit-nan/norm-cache/0"}, handle)
    with open(wrong_value, encoding="utf-8") as handle:
        document = json.load(handle)
    document["norms"] = {name: -1.0 for name in document["norms"]}
    with open(wrong_value, "w", encoding="utf-8") as handle:
        json.dump(document, handle)
    run = merged(config_of(family), tmp_path / "second", cache, monkeypatch)
    for path in files:
        assert run.stderr.count(path) == 1, run.stderr[-3000:]  # one warning each
    assert cache_use(tmp_path / "second") == {"read": 0, "added": EVERY_NORM}
    assert_matches_reference(family, tmp_path / "second")
    for path in files:  # rebuilt
        with open(path, encoding="utf-8") as handle:
            assert json.load(handle)["format"] == CACHE_FORMAT
    run = merged(config_of(family), tmp_path / "third", cache, monkeypatch)
    assert "norm cache" not in run.stderr
    assert cache_use(tmp_path / "third") == {"read": EVERY_NORM, "added": 0}


def test_two_merges_filling_the_cache_at_once_leave_it_correct(family, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(cache))
    runs = []
    for index, granularity in enumerate(["model", "layer", "model"]):
        config = str(tmp_path / f"{index}.yml")
        write_config(config, config_of(family, granularity))
        command = [os.path.join(BIN, "mergekit-yaml"), config, str(tmp_path / f"out{index}"), "--no-copy-tokenizer"]
        runs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for run in runs:
        assert run.wait() == 0, run.stderr.read()[-3000:]
    for path in cache_files(cache):
        with open(path, encoding="utf-8") as handle:
            assert json.load(handle)["format"] == CACHE_FORMAT
    assert not glob.glob(os.path.join(str(cache), "*", ".partial-*"))
    merged(config_of(family), tmp_path / "after", cache, monkeypatch)
    assert cache_use(tmp_path / "after") == {"read": EVERY_NORM, "added": 0}
    assert_matches_reference(family, tmp_path / "after")


# The real mergekit-yaml in a fresh interpreter (the hook registers the methods), with
# the cache directory's writes failing as on a read-only or a full file system.
FAILING_WRITES = """
import errno, os, sys, tempfile
cache, failure = sys.argv.pop(1), sys.argv.pop(1)
real_mkstemp = tempfile.mkstemp
def mkstemp(*args, dir=None, **kwargs):
    if dir is not None and os.path.abspath(dir).startswith(cache):
        if failure == "read-only":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)
        return os.open("/dev/full", os.O_WRONLY), os.path.join(dir, ".partial-on-a-full-disk.json")
    return real_mkstemp(*args, dir=dir, **kwargs)
tempfile.mkstemp = mkstemp
from mergekit.scripts.run_yaml import main
main()
"""


@pytest.mark.parametrize("failure", ["read-only", "full"])
def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_merge(family, tmp_path, monkeypatch, failure):
    if failure == "full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    cache = tmp_path / "cache"
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(cache))
    config = str(tmp_path / "merge.yml")
    write_config(config, config_of(family))
    out = tmp_path / "out"
    command = [sys.executable, "-c", FAILING_WRITES, str(cache), failure, config, str(out), "--no-copy-tokenizer"]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("could not be written") == 1, run.stderr[-3000:]
    assert cache_files(cache) == []
    assert_matches_reference(family, out)


def test_a_cache_path_that_is_not_a_directory_costs_a_warning(family, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    run = merged(config_of(family), tmp_path / "out", tmp_path / "a-file" / "cache", monkeypatch)
    assert run.stderr.count("could not be written") == 1, run.stderr[-3000:]
    assert_matches_reference(family, tmp_path / "out")


def test_off_keeps_no_cache(family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv(ENVIRONMENT_VARIABLE)
    config = str(tmp_path / "merge.yml")
    write_config(config, config_of(family))
    run = subprocess.run(
        [os.path.join(BIN, "mergekit-nan-yaml"), config, str(tmp_path / "out"), "--norm-cache", "off"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert cache_use(tmp_path / "out") is None
    assert not (tmp_path / "hf").exists()
    assert_matches_reference(family, tmp_path / "out")
    # without the option: the Hugging Face cache's folder
    merged_default = mergekit_yaml(config_of(family), str(tmp_path / "default"))
    assert merged_default.returncode == 0, merged_default.stderr[-3000:]
    assert cache_files(tmp_path / "hf" / "mergekit-nan" / "norms")


def test_default_directory_follows_the_hugging_face_cache():
    assert default_directory({"HF_HOME": "/data/hf"}) == "/data/hf/mergekit-nan/norms"
    assert default_directory({"XDG_CACHE_HOME": "/x"}) == "/x/huggingface/mergekit-nan/norms"
    assert default_directory({ENVIRONMENT_VARIABLE: "/n", "HF_HOME": "/h"}) == "/n"
    assert default_directory({ENVIRONMENT_VARIABLE: "OFF"}) is None


def test_merges_whose_inputs_are_not_the_stored_tensors_use_no_cache():
    from mergekit.config import MergeConfiguration

    from mergekit_nan.adapters.lifecycle import inputs_as_stored

    plain = {"merge_method": "nan_ties", "base_model": "/b", "models": [{"model": "/m"}]}
    assert inputs_as_stored(MergeConfiguration.model_validate(plain))
    assert not inputs_as_stored(MergeConfiguration.model_validate({**plain, "tokenizer_source": "base"}))
    sliced = {
        "merge_method": "nan_ties",
        "base_model": "/b",
        "slices": [{"sources": [{"model": "/b", "layer_range": [0, 2]}, {"model": "/m", "layer_range": [0, 2]}]}],
    }
    assert not inputs_as_stored(MergeConfiguration.model_validate(sliced))

"""mergekit's `--multi-gpu` executor with NAN methods, on two CPU "devices".

`lifecycle.py` hands `MultiGPUExecutor`'s worker threads the merge's session; without it
the workers' tensor tasks would not reach the record. The merge runs through mergekit's
own command (`mergekit.scripts.run_yaml`) in a fresh interpreter whose accelerator is made
two "cpu" devices: mergekit's accelerator type and count are patched, and CUDA streams
become no-ops. Every result must equal the single-device merge bit for bit, and the record
must list every tensor of the model.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from checkpoints import load, make_family
from merging import mergekit_yaml, nan_config, read_record, weighing_of

from mergekit_nan.yaml_run import write_config

TWO_CPU_DEVICES = textwrap.dedent(
    """
    import contextlib, sys
    import torch
    import mergekit.merge  # the plugin patches the executor as this loads
    import mergekit.multigpu_executor as executor

    executor.get_torch_accelerator_type = lambda *a: "cpu"
    executor.get_torch_accelerator_count = lambda *a: 2
    torch.cuda.Stream = lambda *a, **k: None
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    started = []
    original = executor.MultiGPUExecutor._device_worker  # the plugin's, around mergekit's
    def counting(self, task_list, cached_values, device, quiet):
        started.append(str(device))
        return original(self, task_list, cached_values, device, quiet)
    executor.MultiGPUExecutor._device_worker = counting

    from mergekit.scripts.run_yaml import main
    try:
        main(sys.argv[1:])
    except SystemExit as stop:
        if stop.code:
            raise
    print("DEVICES", sorted(set(started)))
    """
)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(str(tmp_path_factory.mktemp("family")), [0.004, 0.02, 0.05])


def multi_gpu_merge(config: dict, out: str) -> subprocess.CompletedProcess:
    path = write_config(f"{out}.yml", config)
    command = [sys.executable, "-c", TWO_CPU_DEVICES, str(path), out, "--multi-gpu", "--no-copy-tokenizer"]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.parametrize(
    "method, granularity",
    [("nan_ties", "tensor"), ("nan_ties", "layer"), ("nan_ties", "model"), ("nan_task_arithmetic", "model")],
)
def test_two_devices_equal_one_bit_for_bit(family, tmp_path, method, granularity):
    config = nan_config(method, family, [1.0, 2.0, 0.5], "float32", {"granularity": granularity})
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    run = mergekit_yaml(config, single)
    assert run.returncode == 0, run.stderr[-3000:]
    run = multi_gpu_merge(config, multi)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "DEVICES ['cpu:0', 'cpu:1']" in run.stdout, run.stdout[-2000:]  # both workers ran tensor tasks

    one, two, base = load(single), load(multi), load(family[0])
    assert one.keys() == two.keys() == base.keys()
    for name in base:
        assert torch.equal(one[name], two[name]), name
    record, alone = read_record(multi), read_record(single)
    assert sorted(t["name"] for t in record["tensors"]) == sorted(base)
    assert weighing_of(record) == weighing_of(alone)

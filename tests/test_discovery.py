"""How mergekit finds the methods: the import hook and imports in fresh interpreters, the APIs."""

import os
import subprocess
import sys

import pytest
import torch
from checkpoints import load, make_family
from merging import BIN, default_temperature, nan_config, read_record

from mergekit_nan.yaml_run import write_config

NAMES = [
    "nan_task_arithmetic",
    "nan_ties",
    "nan_dare_ties",
    "nan_dare_linear",
    "nan_breadcrumbs",
    "nan_breadcrumbs_ties",
    "nan_della",
    "nan_della_linear",
    "nan_linear",
    "nan_multislerp",  # both installed generations (index 0.1.4, 0.1.5) have the slerp family
    "nan_nuslerp",
]
WITHOUT_HOOK = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_TargetFinder']\n"
CHECK = f"""
import mergekit.merge_methods.registry as registry
if hasattr(registry, 'registered_methods'):  # mergekit 0.1.5
    names = {{m.spec.name for m in registry.registered_methods()}}
else:  # mergekit 0.1.4
    names = set(registry.REGISTERED_MERGE_METHODS)
import mergekit.merge
wrapped = getattr(mergekit.merge.run_merge, '_mergekit_nan', False)  # the merge lifecycle is hooked
print(sorted(n for n in names if n.startswith('nan_')) == sorted({NAMES!r}) and wrapped)
"""


def python(code):
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_start_up_installs_only_the_hook():
    code = (
        "import sys; print(any(type(f).__name__ == '_TargetFinder' for f in sys.meta_path), "
        "[m for m in ('torch', 'mergekit', 'mergekit_nan') if m in sys.modules])"
    )
    out, err = python(code).communicate()
    assert out.split() == ["True", "[]"], err


ORDERS = {
    "mergekit only (the hook registers)": "import mergekit.merge_methods",
    "plugin first": "import mergekit_nan; import mergekit.merge_methods",
    "mergekit first": "import mergekit.merge_methods; from mergekit.merge import run_merge; import mergekit_nan",
    "plugin's registering module first": "import mergekit_nan.adapters",
    "plugin's pure submodule first": "import mergekit_nan.core.coefficients, mergekit_nan.core.record; import mergekit.merge",
    "registry module first": "import mergekit.merge_methods.registry; import mergekit_nan.adapters",
}


def test_every_import_order_registers_once_with_and_without_hook():
    procs = {}
    for label, imports in ORDERS.items():
        again = "\nimport mergekit_nan; mergekit_nan.register_methods(); mergekit_nan.register_methods()"
        procs[(label, "hook")] = python(imports + again + CHECK)
        if "mergekit_nan" in imports:
            procs[(label, "no hook")] = python(WITHOUT_HOOK + imports + again + CHECK)
    procs[("control", "no hook")] = python(WITHOUT_HOOK + "import mergekit.merge_methods" + CHECK)
    results = {key: proc.communicate() for key, proc in procs.items()}
    for key, (out, err) in results.items():
        expected = "False" if key[0] == "control" else "True"
        assert out.strip() == expected, (key, err[-2000:])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(str(tmp_path_factory.mktemp("family")), [0.01, 0.04])


def test_console_script_registers_without_the_hook(family, tmp_path):
    config = str(write_config(tmp_path / "c.yml", nan_config("nan_ties", family, [1, 1], "float32")))
    out = str(tmp_path / "out")
    script = os.path.join(BIN, "mergekit-nan-yaml")
    code = (
        WITHOUT_HOOK + f"sys.argv = [{script!r}, {config!r}, {out!r}, '--no-copy-tokenizer']\n"
        "from mergekit_nan.cli import run_yaml\nrun_yaml()"
    )
    _, err = python(code).communicate()
    assert read_record(out)["merge_method"] == "nan_ties", err[-2000:]
    assert os.path.exists(os.path.join(out, "config.json"))
    assert subprocess.run([script, "--help"], capture_output=True, text=True).returncode == 0


def test_merge_tensors_and_merge_state_dicts(family):
    import mergekit.merge_methods as merge_methods

    import mergekit_nan

    if not hasattr(merge_methods, "merge_tensors"):
        pytest.skip("mergekit 0.1.4 has no merge_tensors/merge_state_dicts API")
    merge_tensors, merge_state_dicts = merge_methods.merge_tensors, merge_methods.merge_state_dicts

    base, a, b = (load(p) for p in family)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors = [base[name], a[name], b[name]]
    n = [(t.double() - base[name].double()).norm().item() for t in tensors[1:]]

    def weights(method):  # the paper's n^(-1/T) over the two models, budget 2
        power = -1 / default_temperature(method)
        return [2 * x**power / sum(y**power for y in n) for x in n]

    w = weights("nan_task_arithmetic")
    expected = base[name] + sum(wi * (t - base[name]) for wi, t in zip(w, tensors[1:]))
    with mergekit_nan.recording() as records:
        merged = merge_tensors(tensors, "nan_task_arithmetic", base_index=0, name=name)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)
    assert records[0].tensor == name and list(records[0].weights) == pytest.approx(w)

    w = weights("nan_ties")
    merged_all = merge_state_dicts({"base": base, "a": a, "b": b}, "nan_ties", base="base", parameters={"density": 1.0})
    assert merged_all.keys() == base.keys()
    stock = merge_state_dicts(
        {"base": base, "a": a, "b": b},
        "ties",
        base="base",
        parameters={"weight": {"a": w[0], "b": w[1]}, "density": 1.0},
    )
    torch.testing.assert_close(merged_all[name], stock[name], rtol=1e-5, atol=1e-6)

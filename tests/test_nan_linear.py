"""nan_linear: a weighted average of whole models (no base), weights from inverse weight norms."""

import pytest
import torch
from checkpoints import load, make_family
from merging import mergekit_yaml, read_record


def test_nan_linear_through_mergekit_yaml(tmp_path):
    # Three "models" that differ a lot in scale: NAN favours the small-norm ones.
    paths = make_family(str(tmp_path / "f"), [0.5, 2.0])
    priors = [1.0, 1.0, 3.0]
    config = {
        "merge_method": "nan_linear",
        "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths, priors)],
        "parameters": {"temperature": 2.0},
        "dtype": "float32",
    }
    out = str(tmp_path / "out")
    run = mergekit_yaml(config, out)
    assert run.returncode == 0, run.stderr[-2000:]
    models = [load(p) for p in paths]
    merged = load(out)
    record = {t["name"]: t for t in read_record(out)["tensors"]}
    for name in models[0]:
        norms = [m[name].double().norm().item() for m in models]
        alpha = [n**-0.5 / sum(x**-0.5 for x in norms) for n in norms]
        mass = sum(p * a for p, a in zip(priors, alpha))
        expected = sum(p * a * m[name].double() for p, a, m in zip(priors, alpha, models)) / mass
        torch.testing.assert_close(merged[name], expected.float(), rtol=1e-5, atol=1e-6, msg=name)
        assert record[name]["coefficients"] == pytest.approx(alpha, rel=1e-6)
    assert read_record(out)["base_model"] is None

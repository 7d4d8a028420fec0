"""`mergekit-nan inspect` shows exactly the numbers a real merge uses, and writes nothing model-like."""

import csv
import json
import os
import subprocess

from checkpoints import make_family
from merging import BIN, mergekit_yaml, nan_config, read_record

from mergekit_nan.yaml_run import write_config


def test_inspect_equals_the_merge_record(tmp_path):
    paths = make_family(
        str(tmp_path / "family"), [0.003, 0.02], dtype=__import__("torch").bfloat16, skip={0: ["v_proj"]}
    )
    config = nan_config("nan_dare_ties", paths, [1.0, 3.0], "bfloat16", {"temperature": 0.7}, {"density": 0.5})
    merge = mergekit_yaml(config, str(tmp_path / "merged"))
    assert merge.returncode == 0, merge.stderr[-2000:]

    out = tmp_path / "inspect"
    run = subprocess.run(
        [
            os.path.join(BIN, "mergekit-nan"),
            "inspect",
            str(write_config(tmp_path / "c.yml", config)),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    with open(out / "coefficients.json", encoding="utf-8") as handle:
        inspected = json.load(handle)
    assert inspected == read_record(str(tmp_path / "merged"))  # every float, bit for bit
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()

    with open(out / "coefficients.csv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 * len(inspected["tensors"])
    row = next(r for r in table if r["name"] == "model.layers.1.self_attn.v_proj.weight" and r["model"] == paths[1])
    assert row["layer"] == "1" and float(row["coefficient"]) == 0.0  # untouched by that model
    assert "mean coefficient per layer" in run.stdout and paths[2] in run.stdout
    try:
        import matplotlib  # noqa: F401  (the `plot` extra)
    except ImportError:
        assert "pip install 'mergekit-nan[plot]'" in run.stdout
    else:
        assert (out / "coefficients.png").stat().st_size > 1000

"""`mergekit-nan inspect` shows exactly the numbers a real merge uses, and writes nothing model-like."""

import csv
import os

import pytest
import yaml
from checkpoints import make_family
from merging import load_record, mergekit_nan_inspect, mergekit_yaml, nan_config, own_stderr_lines, read_record

from mergekit_nan.yaml_run import write_config


def test_inspect_equals_the_merge_record(tmp_path):
    paths = make_family(
        str(tmp_path / "family"), [0.003, 0.02], dtype=__import__("torch").bfloat16, skip={0: ["v_proj"]}
    )
    config = nan_config("nan_dare_ties", paths, [1.0, 3.0], "bfloat16", {"temperature": 0.7}, {"density": 0.5})
    merge = mergekit_yaml(config, str(tmp_path / "merged"))
    assert merge.returncode == 0, merge.stderr[-2000:]

    out = tmp_path / "inspect"
    run = mergekit_nan_inspect(write_config(tmp_path / "c.yml", config), "--out", out)
    assert run.returncode == 0, run.stderr[-2000:]
    inspected = load_record(out / "coefficients.json")
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
        assert "pip install matplotlib" in run.stdout
    else:
        assert (out / "coefficients.png").stat().st_size > 1000


def test_without_matplotlib_the_hint_is_an_install_that_works(tmp_path):
    paths = make_family(str(tmp_path / "family"), [0.01, 0.02])
    config = write_config(tmp_path / "c.yml", nan_config("nan_ties", paths, [1, 1], "float32"))
    hidden = tmp_path / "no-matplotlib" / "matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = dict(os.environ, PYTHONPATH=str(hidden.parent))
    run = mergekit_nan_inspect(config, "--out", tmp_path / "inspect", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "mergekit-nan[plot]" not in run.stdout  # not on the package index: that install fails
    assert "pip install matplotlib" in run.stdout and 'pip install ".[plot]"' in run.stdout
    assert not (tmp_path / "inspect" / "coefficients.png").exists()


@pytest.mark.parametrize(
    "config, message",
    [
        (  # NAN's own check
            {
                "merge_method": "nan_ties",
                "base_model": "BASE",
                "models": [{"model": "FT"}],
                "parameters": {"granularity": "bogus"},
            },
            "NAN parameter `granularity` must be one of tensor, layer, model; got 'bogus'",
        ),
        (  # mergekit's validation (pydantic)
            {"merge_method": "nan_ties", "base_model": "BASE", "models": [{"modle": "FT"}]},
            "is not a valid mergekit config: models.0.model: Field required",
        ),
        (  # a stock method NAN wraps is inspected as its nan_ version (tests/test_shares.py); this one is not
            {"merge_method": "passthrough", "models": [{"model": "FT"}]},
            "needs a nan_* merge method or a stock method that one wraps",
        ),
    ],
    ids=["nan-check", "validation", "unwrapped-method"],
)
def test_a_config_error_is_one_line_and_exit_status_1(tmp_path, config, message):
    paths = make_family(str(tmp_path / "family"), [0.01])
    text = yaml.safe_dump(config).replace("BASE", paths[0]).replace("FT", paths[1])
    (tmp_path / "c.yml").write_text(text)
    run = mergekit_nan_inspect(tmp_path / "c.yml")
    assert run.returncode == 1
    lines = own_stderr_lines(run.stderr)
    assert len(lines) == 1 and message in lines[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr + run.stdout
    verbose = mergekit_nan_inspect(tmp_path / "c.yml", "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr

"""`mergekit-nan inspect`: what the weights do to the merge (delta share, sign-election share,
cosine), stock weights against NAN's, checked against float64 computations written here
from the definitions, and against what mergekit's own TIES merge produces."""

import csv
import json
import math

import pytest
import torch
from checkpoints import load, make_family
from merging import (
    default_temperature,
    mergekit_nan_inspect,
    mergekit_yaml,
    nan_config,
    reference_weights,
    share_reference,
    top_magnitude,
)

from mergekit_nan.core.shares import tensor_shares
from mergekit_nan.yaml_run import write_config

PRIORS = [1.0, 2.0, 0.5]
DENSITY = 0.4


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    # ft0 leaves v_proj untouched: it takes no part there
    return make_family(str(tmp_path_factory.mktemp("family")), [0.003, 0.02, 0.05], skip={0: ["v_proj"]})


def run_inspect(config, tmp_path, *extra):
    out = tmp_path / "inspect"
    run = mergekit_nan_inspect(write_config(tmp_path / "c.yml", config), "--out", out, *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads((out / "shares.json").read_text()), out


@pytest.mark.parametrize(
    "method, election, density",
    [("ties", True, DENSITY), ("task_arithmetic", False, None)],
)
@pytest.mark.parametrize("config_names", ["stock", "nan"])
def test_every_figure_equals_a_float64_computation(family, tmp_path, method, election, density, config_names):
    per_model = {"density": density} if density else {}
    config = nan_config(f"nan_{method}", family, PRIORS, "float32", {"temperature": 2.0}, per_model)
    temperature = 2.0
    if config_names == "stock":  # the config a user has: the stock method, compared with nan_'s defaults
        config["merge_method"] = method
        config.pop("parameters")
        temperature = default_temperature(method)
    run, shares, _ = run_inspect(config, tmp_path)
    assert shares["stock_method"] == method and shares["nan_method"] == f"nan_{method}"
    models = shares["models"]
    assert models == family[1:]
    nan = reference_weights(load(family[0]), [load(p) for p in family[1:]], PRIORS, temperature)
    # NAN's weights here are float64's; the plugin's agree to ~1e-7 (its norms are float32 sums)
    for setting, weights_of, rel in (("stock", lambda name: PRIORS, 1e-9), ("nan", lambda name: nan[name], 1e-6)):
        expected = share_reference(load(family[0]), [load(p) for p in family[1:]], weights_of, election, density)
        for scope, summary in [("all", shares["whole_model"])] + list(shares["layers"].items()):
            want = expected[scope]
            assert summary["sampled_tensors"] == 0 and not summary["estimated"]
            for i, model in enumerate(models):
                got = summary[setting][model]
                share = want["energy"][i] / sum(want["energy"])
                assert got["delta_share"]["value"] == pytest.approx(share, rel=rel, abs=1e-12), (scope, setting)
                assert got["delta_share"]["stderr"] == 0
                if election:
                    win = want["wins"][i] / want["disputed"]
                    assert got["sign_election_share"]["value"] == pytest.approx(win, rel=rel), (scope, setting)
                else:
                    assert got["sign_election_share"] is None
                for j, other in enumerate(models):
                    dots = want["dots"]
                    cosine = dots[(i, j)] / math.sqrt(dots[(i, i)] * dots[(j, j)])
                    assert summary["cosine"][model][other] == pytest.approx(cosine, rel=1e-9, abs=1e-12)
    # the readings name both methods, and the CSV holds every scope, setting and model
    assert f"under {method}, " in run.stdout and f"under nan_{method}" in run.stdout
    with open(tmp_path / "inspect" / "shares.csv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == (1 + len(shares["layers"])) * 2 * 3


def test_stock_ties_sign_share_is_what_mergekits_ties_elects(family, tmp_path):
    """Under the config's weights, a model wins a disputed coordinate when mergekit's own TIES
    merge moved it in that model's (trimmed, non-zero) direction."""
    per_model = {"density": DENSITY}
    config = nan_config("ties", family, PRIORS, "float32", None, per_model)
    config.pop("parameters", None)
    merge = mergekit_yaml(config, str(tmp_path / "merged"))
    assert merge.returncode == 0, merge.stderr[-3000:]
    _, shares, _ = run_inspect(config, tmp_path)
    base, tuned, merged = load(family[0]), [load(p) for p in family[1:]], load(str(tmp_path / "merged"))
    wins, disputed = [0, 0, 0], 0
    for name, b in base.items():
        trimmed = [top_magnitude((t[name] - b).double(), DENSITY) for t in tuned]
        signs = torch.stack([x.sign() for x in trimmed])
        against = (signs > 0).any(0) & (signs < 0).any(0)
        moved = (merged[name].double() - b.double()).sign()
        disputed += int(against.sum())
        for i in range(3):
            wins[i] += int((against & (signs[i] == moved) & (signs[i] != 0)).sum())
    for i, model in enumerate(family[1:]):
        got = shares["whole_model"]["stock"][model]["sign_election_share"]["value"]
        assert got == pytest.approx(wins[i] / disputed, rel=1e-9)
    # NAN gives the longest delta (ft2) a smaller say than the config's weights do
    nan, stock = shares["whole_model"]["nan"], shares["whole_model"]["stock"]
    assert nan[family[3]]["sign_election_share"]["value"] < stock[family[3]]["sign_election_share"]["value"]


def test_sampled_figures_are_within_their_error_of_the_exact_ones():
    generator = torch.Generator().manual_seed(3)
    tensors = []
    for index in range(4):
        base = torch.randn(300, 200, generator=generator)
        tuned = [base + scale * torch.randn(300, 200, generator=generator) for scale in (0.01, 0.03, 0.1)]
        tensors.append((f"model.layers.{index}.mlp.weight", base, tuned))
    weights = {"stock": [1.0, 1.0, 1.0], "nan": [2.0, 0.7, 0.3]}

    def trim(_, values):
        return top_magnitude(values, 0.3)

    def measured(**sizes):
        from mergekit_nan.core.shares import summarize

        shares = [tensor_shares(n, ["a", "b", "c"], b, t, weights, trim, election=True, **sizes) for n, b, t in tensors]
        return summarize(shares, ["a", "b", "c"])

    exact = measured(exact_limit=10**9)
    sampled = measured(exact_limit=1000, sample_size=8192)
    assert exact["sampled_tensors"] == 0 and sampled["sampled_tensors"] == 4
    for setting in ("stock", "nan"):
        for model in "abc":
            for key in ("delta_share", "sign_election_share"):
                want, got = exact[setting][model][key], sampled[setting][model][key]
                assert want["stderr"] == 0 and 0 < got["stderr"] < 0.05
                assert abs(got["value"] - want["value"]) < 4 * got["stderr"], (setting, model, key)


def test_a_randomized_method_says_its_shares_are_estimated(family, tmp_path):
    config = nan_config("dare_ties", family, PRIORS, "float32", None, {"density": 0.5})
    config.pop("parameters", None)
    run, shares, _ = run_inspect(config, tmp_path, "--random-seed", "1")
    assert shares["whole_model"]["estimated"]
    assert "dare_ties draws a random mask: its shares are estimated" in run.stdout


def test_per_tensor_figures_and_no_stale_share_files(family, tmp_path):
    config = nan_config("nan_ties", family, PRIORS, "float32", None, {"density": DENSITY})
    _, shares, out = run_inspect(config, tmp_path, "--per-tensor")
    assert sorted(shares["tensors"]) == sorted(load(family[0]))
    v_proj = shares["tensors"]["model.layers.0.self_attn.v_proj.weight"]
    assert v_proj["nan"][family[1]]["delta_share"]["value"] == 0  # untouched by ft0
    # the same folder, then a method outside the task-arithmetic family: no shares file is left
    linear = {"merge_method": "nan_linear", "models": [{"model": p} for p in family[1:]], "dtype": "float32"}
    run = mergekit_nan_inspect(write_config(tmp_path / "l.yml", linear), "--out", out)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not (out / "shares.json").exists() and not (out / "shares.csv").exists()
    assert "what the weights do" not in run.stdout


def test_a_stock_method_nan_does_not_wrap_is_refused(family, tmp_path):
    config = {"merge_method": "passthrough", "models": [{"model": family[1]}], "dtype": "float32"}
    run = mergekit_nan_inspect(write_config(tmp_path / "c.yml", config))
    assert run.returncode == 1
    assert "inspect needs a nan_* merge method or a stock method that one wraps, not 'passthrough'" in run.stderr


def test_no_shares_writes_the_coefficients_only(family, tmp_path):
    config = nan_config("nan_ties", family, PRIORS, "float32", None, {"density": DENSITY})
    out = tmp_path / "inspect"
    run = mergekit_nan_inspect(write_config(tmp_path / "c.yml", config), "--out", out, "--no-shares")
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "coefficients.json").exists() and not (out / "shares.json").exists()
    assert "what the weights do" not in run.stdout

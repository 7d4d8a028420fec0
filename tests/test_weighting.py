"""`weighting: shrink_median | shrink_geomean`: shrink long deltas, never stretch short ones.

The formula against a direct float64 computation and its defining properties, then every
task-vector method through the real `mergekit-yaml` against stock mergekit given the
weights that computation prescribes, and the edge cases (one model, equal norms, a zero
delta, priors of 0, huge priors).
"""

import math
import statistics
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from checkpoints import base_state, load, make_family, perturbed, save_llama
from hypothesis import given
from hypothesis import strategies as st
from merging import (
    DTYPES,
    METHODS,
    PRIORS,
    SEED,
    TOLERANCE,
    default_temperature,
    mergekit_yaml,
    nan_config,
    per_tensor_weight_config,
    read_record,
    run_in_process,
)

from mergekit_nan.core.coefficients import shrink_weights, weights_for

norms_st = st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=8)
priors_st = st.floats(min_value=0, max_value=10)


def direct_reference(norms, priors, kind):
    live = [n for n, p in zip(norms, priors) if n > 0 and p > 0]
    if not live:
        return None
    if kind == "median":
        ordered = sorted(live)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return math.prod(live) ** (1 / len(live))


def direct_shrink(norms, priors, kind, temperature=1.0):
    """w_i = prior_i * min(1, r / n_i)^(1/T), r over the models with a delta and a prior > 0."""
    ref = direct_reference(norms, priors, kind)
    if ref is None:
        return [0.0] * len(norms)
    return [p * min(1.0, ref / n) ** (1 / temperature) if n > 0 else 0.0 for n, p in zip(norms, priors)]


@pytest.mark.parametrize("kind", ["median", "geomean"])
@given(pairs=st.lists(st.tuples(st.floats(min_value=1e-3, max_value=1e3), priors_st), min_size=1, max_size=8))
def test_matches_direct_formula(kind, pairs):
    norms, priors = [n for n, _ in pairs], [p for _, p in pairs]
    chosen = shrink_weights(norms, priors, reference=kind)
    assert list(chosen.weights) == pytest.approx(direct_shrink(norms, priors, kind), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("kind", ["median", "geomean"])
@given(norms=norms_st, temperature=st.floats(min_value=0.1, max_value=10), factor=st.floats(1e-6, 1e6))
def test_never_stretches_and_ignores_common_scale(kind, norms, temperature, factor):
    chosen = shrink_weights(norms, None, temperature, reference=kind)
    assert all(0 < w <= 1.0 for w in chosen.weights)
    assert math.fsum(chosen.coefficients) == pytest.approx(1.0)
    scaled = shrink_weights([n * factor for n in norms], None, temperature, reference=kind)
    assert scaled.weights == pytest.approx(chosen.weights, rel=1e-9)
    # the model with the smallest delta, and every model at or below the reference, keeps its prior
    ref = direct_reference(norms, [1.0] * len(norms), kind)
    for n, w in zip(norms, chosen.weights):
        if n <= ref * (1 - 1e-12):
            assert w == 1.0


def test_median_shrinks_only_the_long_delta():
    # SmolLM2 `intensity`'s norms: code 9.3, prose 2.7, arith 20.5 -> arith at 9.3/20.5
    chosen = weights_for("shrink_median", [9.3, 2.7, 20.5])
    assert chosen.weights == pytest.approx([1.0, 1.0, 9.3 / 20.5])
    assert chosen.coefficients == pytest.approx([1 / (2 + 9.3 / 20.5)] * 2 + [(9.3 / 20.5) / (2 + 9.3 / 20.5)])
    geo = (9.3 * 2.7 * 20.5) ** (1 / 3)
    assert weights_for("shrink_geomean", [9.3, 2.7, 20.5]).weights == pytest.approx([geo / 9.3, 1.0, geo / 20.5])
    # T = 2 halves the shrink in log space
    assert weights_for("shrink_median", [9.3, 2.7, 20.5], temperature=2).weights[2] == pytest.approx(
        (9.3 / 20.5) ** 0.5
    )


@pytest.mark.parametrize("weighting", ["shrink_median", "shrink_geomean"])
def test_edge_cases(weighting):
    assert weights_for(weighting, [3.0], [0.7]).weights == (0.7,)  # a single model keeps its prior
    assert weights_for(weighting, [2.0, 2.0, 2.0], [0.3, 1.0, 2.0]).weights == (0.3, 1.0, 2.0)  # equal norms
    zero = weights_for(weighting, [0.0, 1.0, 4.0])  # a zero delta takes no part, nor sets the reference
    assert zero.weights[0] == 0.0 and zero.participating == (False, True, True)
    assert zero.weights[1] == 1.0 and zero.weights[2] == pytest.approx(
        direct_shrink([1.0, 4.0], [1, 1], weighting[7:])[1]
    )
    # a prior of 0 gets weight 0 and does not move the reference: the 100x delta stays out of it
    assert weights_for(weighting, [1.0, 1.0, 100.0], [1.0, 1.0, 0.0]).weights == (1.0, 1.0, 0.0)
    assert weights_for(weighting, [0.0, 0.0]).weights == (0.0, 0.0)
    assert weights_for(weighting, [1.0, 2.0], [0.0, 0.0]).weights == (0.0, 0.0)
    # priors are used as they are: any finite value works (nothing is summed)
    assert weights_for(weighting, [1.0, 1.0, 1.0], [1e308] * 3).weights == (1e308,) * 3
    # norms 1e-300 and 1e300 apart stay finite
    assert all(math.isfinite(w) for w in weights_for(weighting, [1e-300, 1.0, 1e300]).weights)


def test_unknown_weighting_is_named():
    with pytest.raises(ValueError, match="`weighting`"):
        weights_for("shrink", [1.0, 2.0])


# --- through the real mergekit-yaml ------------------------------------------------------

# every method with shrink_median in both dtypes; shrink_geomean on two methods
CASES = [(m, "shrink_median", d) for m in METHODS for d in DTYPES] + [
    (m, "shrink_geomean", "float32") for m in ("task_arithmetic", "ties")
]


def reference_shrink_weights(base, tuned, priors, kind, temperature):
    """Per-tensor float64 norms -> direct_shrink, a model with a negligible delta left out."""
    weights = {}
    for name, b in base.items():
        b64 = b.double()
        norms = [(t[name].double() - b64).norm().item() for t in tuned]
        norms = [n if n > 1e-6 * b64.norm().item() else 0.0 for n in norms]
        weights[name] = direct_shrink(norms, priors, kind, temperature)
    return weights


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("shrink")
    families = {d: make_family(str(root / d), [0.002, 0.01, 0.05], dtype=t) for d, t in DTYPES.items()}
    jobs = {}
    for method, weighting, dtype in CASES:
        shared, per_model = METHODS[method]
        config = nan_config(
            f"nan_{method}", families[dtype], PRIORS, dtype, {**shared, "weighting": weighting}, per_model
        )
        jobs[(method, weighting, dtype)] = (config, str(root / f"out-{method}-{weighting}-{dtype}"))
    with ThreadPoolExecutor(2) as pool:
        runs = dict(
            zip(jobs, pool.map(lambda job: mergekit_yaml(job[0], job[1], "--random-seed", str(SEED)), jobs.values()))
        )
    return families, jobs, runs


@pytest.mark.parametrize("method, weighting, dtype", CASES)
def test_equals_stock_method_with_shrink_weights(sweep, tmp_path, method, weighting, dtype):
    families, jobs, runs = sweep
    run = runs[(method, weighting, dtype)]
    assert run.returncode == 0, run.stderr[-3000:]
    config, out = jobs[(method, weighting, dtype)]
    paths = families[dtype]
    base, tuned = load(paths[0]), [load(p) for p in paths[1:]]
    temperature = METHODS[method][0].get("temperature", default_temperature(method))
    weights = reference_shrink_weights(base, tuned, PRIORS, weighting.removeprefix("shrink_"), temperature)

    stock_config = per_tensor_weight_config(config, weights, method)
    stock_config["parameters"].pop("weighting")
    run_in_process(stock_config, str(tmp_path / "stock"), seed=SEED)
    merged, stock = load(out), load(str(tmp_path / "stock"))
    assert merged.keys() == stock.keys() == base.keys()
    for name in base:
        assert merged[name].dtype == DTYPES[dtype]
        torch.testing.assert_close(merged[name], stock[name], **TOLERANCE[dtype], msg=name)

    record = read_record(out)
    assert record["parameters"]["weighting"] == weighting
    for entry in record["tensors"]:
        assert entry["weights"] == pytest.approx(weights[entry["name"]], rel=1e-5)
        # ft2's delta is 5x ft1's and 25x ft0's: it is the one shrunk; nobody is stretched
        assert entry["weights"][0] == PRIORS[0] and entry["weights"][2] < PRIORS[2]
        assert sum(entry["coefficients"]) == pytest.approx(1.0)
    if (method, weighting, dtype) == ("ties", "shrink_median", "float32"):
        card = open(f"{out}/README.md", encoding="utf-8").read()
        assert "`weighting: shrink_median`" in card


def test_zero_delta_and_zero_prior_through_mergekit_yaml(tmp_path):
    """ft0 changes nothing (delta 0), ft3 has weight 0: both stay out, and out of the median."""
    state = base_state()
    paths = [save_llama(str(tmp_path / "base"), state, torch.float32)]
    for index, scale in enumerate([0.0, 0.01, 0.03, 0.5]):
        tuned = perturbed(state, scale, seed=200 + index) if scale else state
        paths.append(save_llama(str(tmp_path / f"ft{index}"), tuned, torch.float32))
    priors = [1.0, 1.0, 1.0, 0.0]
    config = nan_config("nan_task_arithmetic", paths, priors, "float32", {"weighting": "shrink_median"})
    run = mergekit_yaml(config, str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr[-3000:]
    base, tuned, merged = load(paths[0]), [load(p) for p in paths[1:]], load(str(tmp_path / "out"))
    for name, b in base.items():
        b64 = b.double()
        n1, n2 = ((t[name].double() - b64).norm().item() for t in tuned[1:3])
        # the median of two participants is their mean: ft1 keeps 1, ft2 is shrunk, by
        # (ref / n2)^(1/T) at the method's default temperature
        ref = statistics.median([n1, n2])
        w2 = min(1.0, (ref / n2) ** (1 / default_temperature("nan_task_arithmetic")))
        expected = b64 + (tuned[1][name].double() - b64) + w2 * (tuned[2][name].double() - b64)
        torch.testing.assert_close(merged[name], expected.float(), rtol=1e-5, atol=1e-6, msg=name)
    for entry in read_record(str(tmp_path / "out"))["tensors"]:
        assert entry["weights"][0] == 0.0 and entry["weights"][3] == 0.0


@pytest.mark.parametrize("weighting", ["paper", "shrink_median"])
def test_budget_past_the_float_range_is_refused_at_planning(tmp_path, weighting):
    paths = make_family(str(tmp_path / "family"), [0.01, 0.02])
    config = nan_config("nan_ties", paths, [1e308, 1e308], "float32", {"weighting": weighting})  # a finite float
    run = mergekit_yaml(config, str(tmp_path / "out"))
    assert run.returncode != 0
    assert "`weight`" in run.stderr and paths[1] in run.stderr and "OverflowError" not in run.stderr


def test_huge_finite_priors_with_a_finite_sum_merge(tmp_path):
    """Priors are ratios to NAN: 1e30 and 3e30 give the weights 1 and 3 would, times 1e30."""
    paths = make_family(str(tmp_path / "family"), [0.01, 0.02])
    outs = {}
    for label, priors in (("huge", [1e30, 3e30]), ("plain", [1.0, 3.0])):
        outs[label] = str(tmp_path / label)
        run = mergekit_yaml(nan_config("nan_ties", paths, priors, "float32"), outs[label])
        assert run.returncode == 0, run.stderr[-3000:]
    huge, plain = read_record(outs["huge"]), read_record(outs["plain"])
    for a, b in zip(huge["tensors"], plain["tensors"]):
        assert [w / 1e30 for w in a["weights"]] == pytest.approx(b["weights"], rel=1e-12)
    torch.testing.assert_close(load(outs["huge"]), load(outs["plain"]), rtol=1e-6, atol=1e-7)


def test_bad_weighting_is_named_at_planning(tmp_path):
    paths = make_family(str(tmp_path / "family"), [0.01, 0.02])
    run = mergekit_yaml(nan_config("nan_ties", paths, [1, 1], "float32", {"weighting": "shrink"}), str(tmp_path / "o"))
    assert run.returncode != 0 and "`weighting`" in run.stderr and "shrink_median" in run.stderr

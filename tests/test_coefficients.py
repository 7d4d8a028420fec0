"""The coefficient formula, against a direct computation and its defining properties."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mergekit_nan.core.coefficients import check_temperature, inverse_norm_softmax, nan_weights

norms_st = st.lists(st.floats(min_value=1e-30, max_value=1e30), min_size=1, max_size=8)
temps_st = st.floats(min_value=0.05, max_value=50)


def direct_alpha(norms, temperature):
    """n^(-1/T) / sum n^(-1/T), straight from the paper, in float64 (safe range only)."""
    powers = [n ** (-1.0 / temperature) for n in norms]
    return [p / sum(powers) for p in powers]


@given(
    st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=8), st.floats(min_value=0.25, max_value=8)
)
def test_matches_direct_formula(norms, temperature):
    assert inverse_norm_softmax(norms, temperature) == pytest.approx(
        direct_alpha(norms, temperature), rel=1e-9, abs=1e-300
    )


@given(norms_st, temps_st)
def test_finite_and_sums_to_one_over_extreme_norms(norms, temperature):
    alpha = inverse_norm_softmax(norms, temperature)
    assert all(math.isfinite(a) and 0 <= a <= 1 for a in alpha)
    assert math.fsum(alpha) == pytest.approx(1.0, rel=1e-12)


@given(norms_st, temps_st, st.randoms())
def test_permutation_equivariant(norms, temperature, rnd):
    order = list(range(len(norms)))
    rnd.shuffle(order)
    alpha = inverse_norm_softmax(norms, temperature)
    shuffled = inverse_norm_softmax([norms[i] for i in order], temperature)
    assert shuffled == pytest.approx([alpha[i] for i in order], rel=1e-12, abs=1e-300)


@given(
    st.lists(st.floats(min_value=1e-20, max_value=1e20), min_size=1, max_size=8),
    temps_st,
    st.floats(min_value=1e-8, max_value=1e8),
)
def test_invariant_to_common_scale(norms, temperature, factor):
    alpha = inverse_norm_softmax(norms, temperature)
    scaled = inverse_norm_softmax([n * factor for n in norms], temperature)
    assert scaled == pytest.approx(alpha, rel=1e-9, abs=1e-250)


@given(norms_st, temps_st)
def test_smaller_norm_never_gets_smaller_coefficient(norms, temperature):
    alpha = inverse_norm_softmax(norms, temperature)
    for i in range(len(norms)):
        for j in range(len(norms)):
            if norms[i] < norms[j]:
                assert alpha[i] >= alpha[j]


@given(st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=2, max_size=8))
def test_large_temperature_tends_to_uniform(norms):
    uniform = 1 / len(norms)
    spread = [max(abs(a - uniform) for a in inverse_norm_softmax(norms, t)) for t in (1, 10, 1e3, 1e6)]
    assert spread == sorted(spread, reverse=True)  # monotone approach
    assert spread[-1] < 1e-4


def test_half_temperature_is_inverse_squared_norm():
    norms = [0.5, 2.0, 4.0]
    alpha = inverse_norm_softmax(norms, 0.5)
    inv_sq = [1 / n**2 for n in norms]
    assert alpha == pytest.approx([v / sum(inv_sq) for v in inv_sq], rel=1e-12)


def test_zero_norms_take_no_part():
    assert inverse_norm_softmax([0.0, 1.0, 3.0]) == pytest.approx([0.0, 0.75, 0.25])
    assert inverse_norm_softmax([0.0, 0.0]) == (0.0, 0.0)


@given(
    st.lists(
        st.tuples(st.floats(min_value=1e-6, max_value=1e6), st.floats(min_value=0, max_value=10)),
        min_size=1,
        max_size=8,
    ),
    temps_st,
)
def test_weights_keep_the_prior_budget(pairs, temperature):
    norms = [n for n, _ in pairs]
    priors = [p for _, p in pairs]
    chosen = nan_weights(norms, priors, temperature)
    alpha = direct_alpha(norms, temperature) if max(norms) / min(norms) < 1e6 else chosen.coefficients
    mass = sum(p * a for p, a in zip(priors, alpha))
    expected = [sum(priors) * p * a / mass if mass else 0.0 for p, a in zip(priors, alpha)]
    assert list(chosen.weights) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    if mass:
        assert math.fsum(chosen.weights) == pytest.approx(sum(priors), rel=1e-9)


def test_unit_priors_give_budget_of_model_count():
    chosen = nan_weights([1.0, 2.0, 4.0])
    assert chosen.weights == pytest.approx([3 * 4 / 7, 3 * 2 / 7, 3 * 1 / 7])


def test_negligible_delta_leaves_the_normalization():
    # 1e-9 relative to a base of norm 10 is below the cut; it gets nothing and the
    # budget S counts only the two models that changed the tensor.
    chosen = nan_weights([1e-8, 1.0, 1.0], base_norm=10.0)
    assert chosen.participating == (False, True, True)
    assert chosen.coefficients == pytest.approx([0.0, 0.5, 0.5])
    assert chosen.weights == pytest.approx([0.0, 1.0, 1.0])


def test_all_zero_deltas_give_zero_weights():
    chosen = nan_weights([0.0, 0.0], [1.0, 2.0])
    assert chosen.weights == (0.0, 0.0) and chosen.participating == (False, False)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "hot", None, True])
def test_bad_temperature_is_named(bad):
    with pytest.raises(ValueError, match="temperature"):
        check_temperature(bad)


def test_numeric_string_temperature_is_accepted():
    # PyYAML reads `1e-1` as a string; mergekit treats such strings as numbers.
    assert check_temperature("1e-1") == 0.1


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_prior_is_named(bad):
    with pytest.raises(ValueError, match="weight #1"):
        nan_weights([1.0, 2.0], [1.0, bad])

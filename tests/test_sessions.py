"""One merge, one state: merges in a row share nothing, merges in threads keep apart."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from checkpoints import load, make_family
from merging import default_temperature, nan_config, read_record, reference_weights


def run_merge(config, out, card=True):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=card)
    mergekit_run_merge(MergeConfiguration.model_validate(config), out, options=options)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions")
    return make_family(str(root / "a"), [0.01, 0.04]), make_family(str(root / "b"), [0.03, 0.02, 0.05])


def test_a_card_less_nan_merge_leaves_nothing_for_the_next_merge(families, tmp_path):
    from mergekit_nan.core.session import current

    run_merge(nan_config("nan_ties", families[0], [1, 1], "float32"), str(tmp_path / "nan"), card=False)
    assert current() is None
    run_merge(nan_config("ties", families[1], [1, 1, 1], "float32"), str(tmp_path / "ties"))
    card = open(os.path.join(tmp_path, "ties", "README.md"), encoding="utf-8").read()
    assert "NAN" not in card
    assert not os.path.exists(os.path.join(tmp_path, "ties", "nan_coefficients.json"))


def test_a_failed_merge_closes_its_session(families, tmp_path):
    from mergekit_nan.core.session import current

    with pytest.raises(Exception, match="`temperature`"):
        run_merge(nan_config("nan_ties", families[0], [1, 1], "float32", {"temperature": -1}), str(tmp_path / "out"))
    assert current() is None


def test_two_merges_in_threads_keep_their_records_apart(families, tmp_path):
    outs = [str(tmp_path / "a"), str(tmp_path / "b")]
    jobs = [
        (nan_config("nan_task_arithmetic", family, [1.0] * (len(family) - 1), "float32"), out)
        for family, out in zip(families, outs)
    ]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: run_merge(*job), jobs))
    for family, out in zip(families, outs):
        record = read_record(out)
        assert record["models"] == family[1:]
        base, tuned = load(family[0]), [load(p) for p in family[1:]]
        weights = reference_weights(base, tuned, [1.0] * len(tuned), default_temperature("nan_task_arithmetic"))
        assert sorted(t["name"] for t in record["tensors"]) == sorted(base)  # each tensor once
        for entry in record["tensors"]:
            assert entry["weights"] == pytest.approx(weights[entry["name"]], rel=1e-6)
        card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
        assert all(model in card for model in family[1:])
        other = families[1] if family is families[0] else families[0]
        assert not any(model in card for model in other[1:])

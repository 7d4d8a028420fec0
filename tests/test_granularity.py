"""granularity (tensor / layer / model) and norm_of (delta / weights) against references."""

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from checkpoints import load, make_family
from merging import (
    default_temperature,
    mergekit_yaml,
    nan_config,
    read_record,
    reference_group_weights,
    run_in_process,
)
from safetensors.torch import save_file

LLAMA_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
CASES = {
    "layer": ({"granularity": "layer"}, lambda n: f"layer {m.group(1)}" if (m := LLAMA_LAYER.match(n)) else n, "delta"),
    "model": ({"granularity": "model", "temperature": 0.5}, lambda n: "all", "delta"),
    "weights": ({"norm_of": "weights"}, lambda n: n, "weights"),
    "layer-weights": (
        {"granularity": "layer", "norm_of": "weights"},
        lambda n: f"layer {m.group(1)}" if (m := LLAMA_LAYER.match(n)) else n,
        "weights",
    ),
}
PRIORS = [1.0, 1.0, 2.0]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(str(tmp_path_factory.mktemp("g")), [0.002, 0.01, 0.05], skip={0: ["q_proj"]})


@pytest.fixture(scope="module")
def merges(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("merges")
    jobs = {
        case: (nan_config("nan_task_arithmetic", family, PRIORS, "float32", params), str(root / case))
        for case, (params, _, _) in CASES.items()
    }
    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(jobs, pool.map(lambda job: mergekit_yaml(*job), jobs.values())))
    return jobs, runs


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_through_mergekit_yaml(family, merges, case):
    jobs, runs = merges
    assert runs[case].returncode == 0, runs[case].stderr[-2000:]
    params, group_of, norm_of = CASES[case]
    base, tuned = load(family[0]), [load(p) for p in family[1:]]
    weights = reference_group_weights(
        base, tuned, PRIORS, params.get("temperature", default_temperature("nan_task_arithmetic")), group_of, norm_of
    )
    merged = load(jobs[case][1])
    record = {t["name"]: t for t in read_record(jobs[case][1])["tensors"]}
    for name, b in base.items():
        assert record[name]["weights"] == pytest.approx(weights[name], rel=1e-6), name
        expected = b.double() + sum(w * (t[name].double() - b.double()) for w, t in zip(weights[name], tuned))
        torch.testing.assert_close(merged[name], expected.float(), rtol=1e-5, atol=1e-6, msg=name)
    if case == "model":  # one norm per model: every tensor's coefficients agree
        assert len({tuple(t["coefficients"]) for t in record.values() if "q_proj" not in t["name"]}) == 1


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_prepass_reads_each_input_once(family, tmp_path, monkeypatch, granularity):
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    from mergekit_nan.adapters import mergekit_io

    reads, passes, measured, inside = [], [], [], [False]
    original_get = LazyTensorLoader.get_tensor
    original_init, original_measure = mergekit_io.NormPass.__init__, mergekit_io.NormPass._measure

    def counting_get(self, key, *args, **kwargs):
        if inside[0]:
            reads.append((id(self), key))
        return original_get(self, key, *args, **kwargs)

    def counting_init(self, *args, **kwargs):
        passes.append(args)
        original_init(self, *args, **kwargs)

    def counting_measure(self, group, *args):
        measured.append(group)
        inside[0] = True
        try:
            return original_measure(self, group, *args)
        finally:
            inside[0] = False

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", counting_get)
    monkeypatch.setattr(mergekit_io.NormPass, "__init__", counting_init)
    monkeypatch.setattr(mergekit_io.NormPass, "_measure", counting_measure)
    monkeypatch.setenv("MERGEKIT_NAN_NORM_CACHE", str(tmp_path / "cache"))
    config = nan_config("nan_ties", family, PRIORS, "float32", {"granularity": granularity})
    run_in_process(config, str(tmp_path / "out"))
    tensors = load(family[0])
    assert len(passes) == 1  # once per merge, however many tensor tasks ask
    groups = (
        {"model"}
        if granularity == "model"
        else {f"layer {i}" for i in range(2)} | {n for n in tensors if not LLAMA_LAYER.match(n)}
    )
    assert sorted(measured) == sorted(groups)  # each group once
    # base + 3 models, each tensor once, except the one whose merge asks for its group's
    # norm: mergekit has loaded that one already
    assert len(reads) == len(set(reads)) == 4 * (len(tensors) - len(groups))

    # The same merge again: every norm is in the norm cache, the pass reads nothing.
    reads.clear()
    run_in_process(config, str(tmp_path / "again"))
    assert reads == []
    assert read_record(str(tmp_path / "again"))["norm_cache"] == {"read": 4 * len(tensors), "added": 0}
    for name, tensor in load(str(tmp_path / "out")).items():
        assert torch.equal(tensor, load(str(tmp_path / "again"))[name]), name


def test_layer_groups_follow_mergekit_architecture_info_on_gpt2(tmp_path):
    from mergekit.common import ModelReference
    from transformers import GPT2Config, GPT2LMHeadModel

    from mergekit_nan.adapters.mergekit_io import tensor_groups

    config = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    config.architectures = ["GPT2LMHeadModel"]
    paths = []
    for index, scale in enumerate([0.0, 0.01, 0.04]):
        torch.manual_seed(0)
        state = GPT2LMHeadModel(config).state_dict()
        gen = torch.Generator().manual_seed(index)
        state = {
            k: v + scale * torch.randn(v.shape, generator=gen)
            for k, v in state.items()
            if k != "lm_head.weight" and v.is_floating_point() and ".attn.bias" not in k
        }
        path = str(tmp_path / f"gpt2-{index}")
        config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
        paths.append(path)

    groups = tensor_groups(ModelReference.parse(paths[0]), "layer")
    block = re.compile(r"^(?:transformer\.)?h\.(\d+)\.")
    names = set(load(paths[0]))
    covered = {n for n in groups} | {a for planned in groups.values() for a in planned.aliases}
    assert names <= covered
    for name, planned in groups.items():
        match = block.match(name)
        assert planned.group == (f"layer {match.group(1)}" if match else name), name
    assert len({p.group for p in groups.values() if p.group.startswith("layer")}) == 3

    out = str(tmp_path / "merged")
    run_in_process(nan_config("nan_task_arithmetic", paths, [1.0, 1.0], "float32", {"granularity": "layer"}), out)
    base, tuned = load(paths[0]), [load(p) for p in paths[1:]]
    record = {t["name"]: t for t in read_record(out)["tensors"]}
    group_of = lambda n: f"layer {m.group(1)}" if (m := block.match(n)) else n  # noqa: E731
    weights = reference_group_weights(base, tuned, [1.0, 1.0], default_temperature("nan_task_arithmetic"), group_of)
    assert len(record) == len(base)
    for name, entry in record.items():  # mergekit names GPT-2 weights without 'transformer.'
        checkpoint_name = name if name in base else next(n for n in base if n.endswith("." + name))
        assert entry["weights"] == pytest.approx(weights[checkpoint_name], rel=1e-6), name


def test_tied_embeddings_count_once_with_granularity_model(tmp_path):
    # tie_word_embeddings: the file stores model.embed_tokens.weight only, and mergekit's
    # architecture lists lm_head.weight as tied to it; it is one stored tensor.
    paths = make_family(str(tmp_path / "tied"), [0.01, 0.03], tied=True)
    out = str(tmp_path / "out")
    run = mergekit_yaml(nan_config("nan_task_arithmetic", paths, [1.0, 1.0], "float32", {"granularity": "model"}), out)
    assert run.returncode == 0, run.stderr[-2000:]
    base, tuned = load(paths[0]), [load(p) for p in paths[1:]]
    assert "lm_head.weight" not in base
    expected = [sum((t[k].double() - b.double()).norm().item() ** 2 for k, b in base.items()) ** 0.5 for t in tuned]
    record = read_record(out)
    assert {t["name"] for t in record["tensors"]} == set(base)
    for entry in record["tensors"]:
        assert entry["norms"] == pytest.approx(expected, rel=1e-6), entry["name"]

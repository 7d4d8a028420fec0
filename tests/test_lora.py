"""LoRA adapters: merged through --lora-merge-cache with nan_* methods; norms from the Gram route."""

import pytest
import torch
from checkpoints import TINY_LLAMA, load, make_family
from merging import default_temperature, load_record, mergekit_yaml, read_record


def make_adapter(base_path, out, seed, scale, targets, rank=4, alpha=8, rslora=False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_path)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(out)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_family(str(root / "family"), [])[0]
    one = make_adapter(base, str(root / "a1"), 1, 0.05, ["q_proj", "v_proj"])
    two = make_adapter(base, str(root / "a2"), 2, 0.2, ["v_proj", "up_proj"], rank=2, alpha=4, rslora=True)
    return base, [str(root / "a1"), str(root / "a2")], [one, two]


def test_gram_route_equals_the_materialized_delta(adapters):
    from mergekit_nan.core.lora import adapter_deltas

    base_path, adapter_dirs, merged_states = adapters
    base = load(base_path)
    for adapter_dir, merged in zip(adapter_dirs, merged_states):
        norms = {name: delta.norm() for name, delta in adapter_deltas(adapter_dir).items()}
        for name, b in base.items():
            direct = (merged[name].double() - b.double()).norm().item()
            if name in norms:
                assert norms[name] == pytest.approx(direct, rel=1e-5), name
            else:
                assert direct < 1e-6 * b.double().norm().item(), name
        assert len(norms) == 2 * TINY_LLAMA["num_hidden_layers"]


@pytest.mark.parametrize("method", ["nan_task_arithmetic", "nan_ties"])
def test_adapters_merge_through_the_lora_cache(adapters, tmp_path, method):
    from mergekit_nan.core.lora import adapter_deltas

    base_path, adapter_dirs, _ = adapters
    config = {
        "merge_method": method,
        "base_model": base_path,
        "models": [{"model": f"{base_path}+{a}", "parameters": {"weight": 1.0}} for a in adapter_dirs],
        "dtype": "float32",
    }
    out = str(tmp_path / "out")
    run = mergekit_yaml(config, out, "--lora-merge-cache", str(tmp_path / "cache"))
    assert run.returncode == 0, run.stderr[-2000:]
    record = {t["name"]: t for t in read_record(out)["tensors"]}
    gram = [{name: delta.norm() for name, delta in adapter_deltas(a).items()} for a in adapter_dirs]
    merged, base = load(out), load(base_path)
    for name, entry in record.items():
        expected = [g.get(name, 0.0) for g in gram]
        assert entry["norms"] == pytest.approx(expected, rel=1e-5, abs=1e-6), name
        taking = [n > 0 for n in expected]
        assert [w > 0 for w in entry["weights"]] == taking, name
        if not any(taking):  # no adapter touched it: the base tensor, exactly
            assert torch.equal(merged[name], base[name]), name
    shared = "model.layers.0.self_attn.v_proj.weight"  # both adapters: NAN splits the budget of 2
    p1, p2 = (gram[i][shared] ** (-1 / default_temperature(method)) for i in (0, 1))
    assert record[shared]["weights"] == pytest.approx([2 * p1 / (p1 + p2), 2 * p2 / (p1 + p2)], rel=1e-5)
    only_one = "model.layers.0.self_attn.q_proj.weight"  # adapter 1 alone: its own weight, 1
    assert record[only_one]["weights"] == pytest.approx([1.0, 0.0])


def test_inspect_takes_adapter_norms_from_the_adapter_files(adapters, tmp_path):
    from merging import mergekit_nan_inspect

    from mergekit_nan.yaml_run import write_config

    base_path, adapter_dirs, _ = adapters
    config = {
        "merge_method": "nan_ties",
        "base_model": base_path,
        "models": [{"model": f"{base_path}+{a}", "parameters": {"weight": 1.0, "density": 0.5}} for a in adapter_dirs],
        "dtype": "float32",
    }
    merge = mergekit_yaml(config, str(tmp_path / "merged"), "--lora-merge-cache", str(tmp_path / "merge-cache"))
    assert merge.returncode == 0, merge.stderr[-2000:]
    cache = tmp_path / "inspect-cache"
    run = mergekit_nan_inspect(
        write_config(tmp_path / "c.yml", config), "--out", tmp_path / "inspect", "--lora-merge-cache", cache
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert not cache.exists() or not any(cache.iterdir())  # no adapter was merged into a full model
    inspected = load_record(tmp_path / "inspect" / "coefficients.json")
    merged = read_record(str(tmp_path / "merged"))
    assert [t["name"] for t in inspected["tensors"]] == [t["name"] for t in merged["tensors"]]
    for a, b in zip(inspected["tensors"], merged["tensors"]):
        for key in ("norms", "coefficients", "weights"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["name"], key)


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_inspect_shares_take_the_adapters_deltas(adapters, tmp_path, method):
    """inspect loads a LoRA on the base as the base itself; its shares must still be those of
    the adapter's delta: a float64 computation on the materialized merges, stock and NAN."""
    import json

    from merging import mergekit_nan_inspect, reference_weights, share_reference

    from mergekit_nan.yaml_run import write_config

    base_path, adapter_dirs, merged_states = adapters
    priors, density = [1.0, 0.5], (0.5 if method == "ties" else None)
    per_model = {"density": density} if density else {}
    config = {
        "merge_method": method,
        "base_model": base_path,
        "models": [
            {"model": f"{base_path}+{a}", "parameters": {"weight": w, **per_model}}
            for a, w in zip(adapter_dirs, priors)
        ],
        "dtype": "float32",
    }
    cache = tmp_path / "inspect-cache"
    run = mergekit_nan_inspect(
        write_config(tmp_path / "c.yml", config), "--out", tmp_path / "inspect", "--lora-merge-cache", cache
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert not cache.exists() or not any(cache.iterdir())  # still no adapter merged into a full model
    shares = json.loads((tmp_path / "inspect" / "shares.json").read_text())
    base = load(base_path)
    tuned = [{name: merged[name] for name in base} for merged in merged_states]
    nan = reference_weights(base, tuned, priors, default_temperature(f"nan_{method}"))
    models = shares["models"]
    for setting, weights_of in (("stock", lambda name: priors), ("nan", lambda name: nan[name])):
        want = share_reference(base, tuned, weights_of, method == "ties", density)["all"]
        got = shares["whole_model"][setting]
        for i, model in enumerate(models):
            assert got[model]["delta_share"]["value"] == pytest.approx(
                want["energy"][i] / sum(want["energy"]), rel=1e-4
            )
            assert got[model]["delta_share"]["value"] > 0, (setting, model)  # the adapter's delta, not a zero one
            if method == "ties":
                assert got[model]["sign_election_share"]["value"] == pytest.approx(
                    want["wins"][i] / want["disputed"], rel=1e-4
                )
        dots = want["dots"]
        assert shares["whole_model"]["cosine"][models[0]][models[1]] == pytest.approx(
            dots[(0, 1)] / (dots[(0, 0)] * dots[(1, 1)]) ** 0.5, rel=1e-4, abs=1e-9
        )


@pytest.mark.parametrize("transposed", [False, True])
def test_low_rank_entries_equal_the_full_matrix(transposed):
    from mergekit_nan.core.lora import LowRankDelta

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    full = 1.5 * (b @ a)
    full = full.T.contiguous() if transposed else full  # fan_in_fan_out stores the transpose
    delta = LowRankDelta(1.5, a, b, transposed)
    index = torch.randint(full.numel(), (50,), generator=gen)
    assert torch.allclose(delta.values(), full.reshape(-1), rtol=1e-12, atol=0)
    assert torch.allclose(delta.values(index), full.reshape(-1)[index], rtol=1e-12, atol=0)
    assert delta.norm() == pytest.approx(full.norm().item(), rel=1e-12)

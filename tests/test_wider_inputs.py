"""Inputs beyond the tiny LLaMA family: Phi3, 20 models, a `slices:` config, a vocabulary
mismatch merged with `tokenizer_source: base`.

(GPT-NeoX is not here: mergekit 0.1.5's architecture file asks for `attention.bias`, a
buffer transformers 5 no longer stores, so stock merges of such checkpoints fail too.)

Each NAN merge runs through the real `mergekit-yaml` and must equal stock mergekit's
method given, tensor by tensor, the weights of the independent float64 reference (or,
for task arithmetic, base + sum w_i delta_i written out by hand).
"""

import os

import pytest
import torch
from checkpoints import load, make_family, perturbed
from merging import (
    default_temperature,
    mergekit_yaml,
    nan_config,
    per_tensor_weight_config,
    reference_weights,
    run_in_process,
)
from safetensors.torch import save_file

ARCHITECTURES = {
    "Phi3ForCausalLM": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def other_family(root, architecture, scales):
    import transformers

    kind = architecture.replace("ForCausalLM", "")
    config = getattr(transformers, f"{kind}Config")(**ARCHITECTURES[architecture])
    config.architectures = [architecture]
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in getattr(transformers, architecture)(config).state_dict().items()}
    paths = []
    for index, state in enumerate([base] + [perturbed(base, s, seed=100 + i) for i, s in enumerate(scales)]):
        path = os.path.join(root, f"m{index}")
        os.makedirs(path)
        config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
        paths.append(path)
    return paths


def assert_equals_stock(paths, config, out, stock_out, method):
    run = mergekit_yaml(config, out)
    assert run.returncode == 0, run.stderr[-3000:]
    states = [load(p) for p in paths]
    priors = [m["parameters"]["weight"] for m in config["models"]]
    weights = reference_weights(states[0], states[1:], priors, default_temperature(method))
    run_in_process(per_tensor_weight_config(config, weights, method), stock_out)
    mine, stock = load(out), load(stock_out)
    assert mine.keys() == stock.keys()
    for name in stock:
        torch.testing.assert_close(mine[name], stock[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_other_architectures_equal_stock_ties_with_reference_weights(tmp_path, architecture):
    paths = other_family(str(tmp_path / "family"), architecture, [0.002, 0.01, 0.05])
    config = nan_config("nan_ties", paths, [1.0, 2.0, 0.5], "float32", None, {"density": 0.6})
    assert_equals_stock(paths, config, str(tmp_path / "nan"), str(tmp_path / "stock"), "ties")


def test_twenty_models(tmp_path):
    scales = [0.001 * (1 + i) for i in range(20)]
    paths = make_family(str(tmp_path / "family"), scales)
    config = nan_config("nan_ties", paths, [1.0 + (i % 3) for i in range(20)], "float32", None, {"density": 0.5})
    assert_equals_stock(paths, config, str(tmp_path / "nan"), str(tmp_path / "stock"), "ties")


def test_a_slices_config_weighs_the_layers_it_takes(tmp_path):
    """Output layer 0 is input layer 1: its weights come from layer 1's deltas."""
    paths = make_family(str(tmp_path / "family"), [0.002, 0.01, 0.05])
    config = {
        "merge_method": "nan_task_arithmetic",
        "base_model": paths[0],
        "slices": [{"sources": [{"model": p, "layer_range": [1, 2]} for p in paths]}],
        "dtype": "float32",
    }
    run = mergekit_yaml(config, str(tmp_path / "nan"))
    assert run.returncode == 0, run.stderr[-3000:]
    states = [load(p) for p in paths]
    weights = reference_weights(states[0], states[1:], [1.0, 1.0, 1.0], default_temperature("nan_task_arithmetic"))
    merged = load(str(tmp_path / "nan"))
    layer_names = [n for n in merged if n.startswith("model.layers.")]
    assert layer_names and all(n.startswith("model.layers.0.") for n in layer_names)
    for name in layer_names:
        source = name.replace("model.layers.0.", "model.layers.1.")
        base = states[0][source].double()
        expected = base + sum(w * (s[source].double() - base) for w, s in zip(weights[source], states[1:]))
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def save_tokenizer(path, size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t0").save_pretrained(path)


def test_a_vocab_mismatch_with_tokenizer_source_base(tmp_path):
    """Fine-tunes with 4 added tokens, merged onto the base vocabulary: every model's
    embedding and head enter the merge as their first 96 rows."""
    from checkpoints import base_state, save_llama

    base = base_state()
    paths = [save_llama(str(tmp_path / "base"), base, torch.float32)]
    save_tokenizer(paths[0], 96)
    for index, scale in enumerate([0.002, 0.01, 0.05]):
        grown = base_state(vocab_size=100)
        state = perturbed({k: v for k, v in base.items()}, scale, seed=100 + index)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            grown[name][:96] = state[name]
            state[name] = grown[name]
        path = save_llama(str(tmp_path / f"ft{index}"), state, torch.float32, vocab_size=100)
        save_tokenizer(path, 100)
        paths.append(path)
    config = nan_config("nan_ties", paths, [1.0, 2.0, 0.5], "float32", None, {"density": 0.6})
    config["tokenizer_source"] = "base"
    run = mergekit_yaml(config, str(tmp_path / "nan"))
    assert run.returncode == 0, run.stderr[-3000:]
    states = [load(p) for p in paths]
    aligned = [{k: (v[:96] if v.shape[0] == 100 else v) for k, v in s.items()} for s in states]
    weights = reference_weights(aligned[0], aligned[1:], [1.0, 2.0, 0.5], 1.0)
    run_in_process(per_tensor_weight_config(config, weights, "ties"), str(tmp_path / "stock"))
    mine, stock = load(str(tmp_path / "nan")), load(str(tmp_path / "stock"))
    assert mine["model.embed_tokens.weight"].shape[0] == 96
    for name in stock:
        torch.testing.assert_close(mine[name], stock[name], rtol=1e-5, atol=1e-6, msg=name)

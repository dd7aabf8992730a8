"""(IA)^3 (minillm/peft/ia3.py): init, shapes, the two kinds of scaling, merge/unmerge, hostile adapter files.
Parity with peft's IA3 is in parity/peft_methods.py (`python -m parity --only peft_methods --rows ia3`)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minillm import peft as peft_format
from minillm.config import ModelConfig
from minillm.model import CausalLM
from minillm.peft import ia3
from minillm.peft.ia3 import IA3Config, IA3Linear

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny(model_type: str = "llama", seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    cfg = dict(model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    cfg.update(overrides)
    return CausalLM(ModelConfig(**cfg), fused=False).eval()


def x_batch(T: int = 6) -> torch.Tensor:
    return torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(3))


def perturb(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


# ---- init, targets, shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type,attn", [("llama", "k_proj"), ("qwen2", "q_proj"), ("qwen3", "q_proj")])
def test_default_targets_shapes_and_init(model_type, attn):
    model = peft_format.apply(tiny(model_type), IA3Config())
    layers = ia3.ia3_layers(model)
    assert sorted({n.rsplit(".", 1)[1] for n in layers}) == sorted([attn, "v_proj", "down_proj"])
    for name, layer in layers.items():
        base = layer.base_layer
        if name.endswith("down_proj"):  # feed-forward: scales the input
            assert layer.is_feedforward and layer.ia3_l.shape == (1, base.in_features)
        else:
            assert not layer.is_feedforward and layer.ia3_l.shape == (base.out_features, 1)
        assert torch.equal(layer.ia3_l, torch.ones_like(layer.ia3_l))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{n}.ia3_l" for n in layers]
    assert model.peft_config.target_modules == ia3.DEFAULT_TARGETS[model_type]


def test_init_false_keeps_the_randn_draws_in_module_order():
    model = tiny()
    torch.manual_seed(5)
    peft_format.apply(model, IA3Config(init_ia3_weights=False))
    torch.manual_seed(5)
    for layer in ia3.ia3_layers(model).values():  # named_modules() order, one randn per layer
        assert torch.equal(layer.ia3_l, torch.randn(layer.ia3_l.shape))


def test_init_ones_changes_nothing_and_uses_the_same_draws():
    model, plain = tiny(), tiny()
    x = x_batch()
    torch.manual_seed(9)
    peft_format.apply(model, IA3Config())
    after = torch.randn(3)
    other = tiny()
    torch.manual_seed(9)
    peft_format.apply(other, IA3Config(init_ia3_weights=False))
    assert torch.equal(after, torch.randn(3))  # the same RNG use whether or not the draws are kept (peft's)
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain(x).logits)


def test_targets_not_including_the_default_feedforward_are_accepted_and_saved_back(tmp_path):
    # peft accepts target_modules=[k_proj, v_proj] (the default feedforward down_proj is then no target); its
    # saved file lists feedforward_modules=[down_proj], which minillm must read back
    model = peft_format.apply(tiny(), IA3Config(target_modules=["k_proj", "v_proj"]))
    assert not any(layer.is_feedforward for layer in ia3.ia3_layers(model).values())
    perturb(model)
    peft_format.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["feedforward_modules"] == ["down_proj"]
    loaded = peft_format.load_adapter(tiny(), tmp_path)
    x = x_batch()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="must be a subset of target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["up_proj"])  # a list the user gave: peft's check


def test_config_errors_are_sentences():
    for bad in ({"target_modules": 3}, {"feedforward_modules": [1]}, {"init_ia3_weights": "yes"}):
        with pytest.raises(ValueError, match="IA3Config") as e:
            IA3Config(**bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="must match nn.Linear modules"):
        peft_format.apply(tiny(), IA3Config(target_modules=["nothing_here"]))


# ---- the two scalings, merge and unmerge ----------------------------------------------------------------

def _linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=bias)
    with torch.no_grad():
        if bias:
            lin.bias.add_(1.0)
    return lin


@pytest.mark.parametrize("feedforward", [False, True])
def test_scaling_output_with_bias_or_input(feedforward):
    lin = _linear()
    W, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    layer = IA3Linear(lin, is_feedforward=feedforward, init_ones=True)
    with torch.no_grad():
        layer.ia3_l.copy_(torch.linspace(0.5, 2.0, layer.ia3_l.numel()).reshape(layer.ia3_l.shape))
    l = layer.ia3_l.detach().flatten()  # noqa: E741
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    want = (x * l) @ W.T + b if feedforward else (x @ W.T + b) * l  # input scaling; output scaling incl. the bias
    assert (layer(x) - want).abs().max() <= 1e-6


@pytest.mark.parametrize("feedforward,bias", [(False, True), (True, True), (False, False)])
def test_merge_and_unmerge(feedforward, bias):
    lin = _linear(bias)
    W = lin.weight.detach().clone()
    B = lin.bias.detach().clone() if bias else None
    layer = IA3Linear(lin, is_feedforward=feedforward, init_ones=False)  # random l, some near 0, some negative
    l = layer.ia3_l.detach().clone()  # noqa: E741
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        assert torch.equal(lin.weight, W * l)  # rows (l out x 1) or columns (l 1 x in)
        if bias:
            assert torch.equal(lin.bias, B * l.flatten() if not feedforward else B)
        assert (layer(x) - before).abs().max() <= 1e-5
        layer.unmerge()
        assert torch.equal(lin.weight, (W * l) / (l + 1e-8))  # peft's unmerge: close to W, not exactly
        assert (lin.weight - W).abs().max() <= 1e-5
        assert not layer.merged and (layer(x) - before).abs().max() <= 1e-5


def test_merge_and_unload_gives_the_plain_model():
    model = peft_format.apply(tiny("qwen2"), IA3Config())  # q/k/v biases: the output scaling reaches them
    perturb(model)
    x = x_batch()
    with torch.no_grad():
        want = model(x).logits
        merged = peft_format.merge_and_unload(model)
        assert not ia3.ia3_layers(merged) and getattr(merged, "peft_config", None) is None
        assert type(merged.model.layers[0].self_attn.v_proj) is nn.Linear
        assert (merged(x).logits - want).abs().max() <= 1e-5


def test_switched_off_is_the_base_model_and_merged_refuses():
    model, plain = tiny(), tiny()
    model = peft_format.apply(model, IA3Config())
    perturb(model)
    x = x_batch()
    with torch.no_grad():
        on = model(x).logits
        with peft_format.disable_adapter(model):
            assert torch.equal(model(x).logits, plain(x).logits)
        assert torch.equal(model(x).logits, on)
        for layer in ia3.ia3_layers(model).values():
            layer.merge()
        with pytest.raises(ValueError, match="merged .* cannot be switched off") as e:
            with peft_format.disable_adapter(model):
                pass
        assert "\n" not in str(e.value)


# ---- hostile adapter files: one sentence naming the file, the model untouched ---------------------------

def _saved(tmp_path) -> dict[str, torch.Tensor]:
    model = peft_format.apply(tiny(), IA3Config())
    peft_format.save_adapter(model, tmp_path)
    return load_file(tmp_path / "adapter_model.safetensors")


def _refused(tmp_path, match: str) -> None:
    model = tiny()
    with pytest.raises(ValueError, match=match) as e:
        peft_format.load_adapter(model, tmp_path)
    msg = str(e.value)
    assert "adapter_model.safetensors" in msg and "\n" not in msg
    assert not ia3.ia3_layers(model) and getattr(model, "peft_config", None) is None  # nothing applied
    assert all(p.requires_grad for p in model.parameters())  # nor frozen


def _rewrite(tmp_path, change) -> None:
    tensors = _saved(tmp_path)
    key = next(k for k in tensors if "layers.0.self_attn.k_proj" in k)
    tensors[key] = change(tensors[key])
    save_file(tensors, tmp_path / "adapter_model.safetensors")


def test_hostile_wrong_shape(tmp_path):
    _rewrite(tmp_path, lambda t: torch.ones(t.shape[0] + 1, 1))
    _refused(tmp_path, r"k_proj.ia3_l has shape \(17, 1\), this model needs \(16, 1\)")


def test_hostile_nan(tmp_path):
    _rewrite(tmp_path, lambda t: t.masked_fill(torch.arange(t.numel()).reshape(t.shape) == 2, float("nan")))
    _refused(tmp_path, "holds NaN or infinite values")


def test_hostile_integer_dtype(tmp_path):
    _rewrite(tmp_path, lambda t: t.to(torch.int32))
    _refused(tmp_path, "is int32, adapter tensors must be floating point")


def test_hostile_missing_and_unexpected(tmp_path):
    tensors = _saved(tmp_path)
    key = next(iter(tensors))
    tensors["base_model.model.model.layers.0.mlp.up_proj.ia3_l"] = tensors.pop(key)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    _refused(tmp_path, "adapter tensors do not match the model: 1 missing")


def test_hostile_symlink_outside_the_directory(tmp_path):
    adapter, outside = tmp_path / "adapter", tmp_path / "elsewhere"
    adapter.mkdir(), outside.mkdir()
    _saved(adapter)
    (adapter / "adapter_model.safetensors").rename(outside / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    _refused(adapter, "is a symlink to .*, outside the checkpoint directory")

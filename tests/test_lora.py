"""minillm.lora: parity with peft at a small budget, merge/unmerge algebra, freezing, file format, errors."""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from minillm import lora as ml
from minillm.config import ModelConfig
from minillm.model import CausalLM
from parity import lora as pl

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_model(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    cfg.update(overrides)
    return CausalLM(ModelConfig(**cfg))


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


# ---- parity with peft (the rows of `python -m parity --only lora`, small budget) -------------------------

def test_parity_rows_small_budget():
    rows = list(pl.rows(budget=0.25))
    assert len(rows) == 10
    for row in rows:
        assert row.configs > 0, row.check
        assert row.passed, f"{row.check}: max|Δ|={row.max_delta:.3g} > {row.tolerance:g} {row.note}"


def test_parity_check_can_fail():
    """The comparison is not vacuous: one changed B entry on our side shows up in logits and merged weights."""
    case = pl.Case(targets="attn", dora=True)
    ours, pm = pl.lora_pair(case)
    with torch.no_grad():
        ours.model.layers[0].self_attn.k_proj.lora_B.weight[0, 0] += 0.5
    ours.eval(), pm.eval()
    x = torch.randint(0, case.vocab, (2, 7))
    assert (ours(x).logits - pm(input_ids=x).logits).abs().max() > 1e-4


def test_peft_to_minillm_name():
    assert pl.peft_to_minillm_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == \
        "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert pl.peft_to_minillm_name("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert pl.peft_to_minillm_name(
        "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector.default.weight") == \
        "model.layers.1.mlp.up_proj.lora_magnitude_vector"
    assert pl.peft_to_minillm_name("base_model.model.lm_head.original_module.weight") is None


# ---- LoRALinear algebra ---------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(st.integers(1, 24), st.integers(1, 24), st.integers(1, 6), st.sampled_from([1, 8, 16]), st.booleans(),
       st.booleans(), st.booleans())
def test_lora_linear_matches_formula_and_merge(fan_in, fan_out, r, alpha, bias, rslora, dora):
    torch.manual_seed(fan_in * 100 + fan_out)
    base = nn.Linear(fan_in, fan_out, bias=bias)
    w0 = base.weight.detach().clone()
    layer = ml.LoRALinear(base, r, alpha, use_rslora=rslora, use_dora=dora)
    randomize_adapters(layer)
    x = torch.randn(3, fan_in)
    s = alpha / (r ** 0.5 if rslora else r)
    assert layer.scaling == pytest.approx(s)
    w = w0 + layer.lora_B.weight @ layer.lora_A.weight * s
    if dora:  # W' = m * (W + s B A) / ||W + s B A||_row
        w = layer.lora_magnitude_vector[:, None] * w / torch.linalg.norm(w, dim=1, keepdim=True)
    expected = x @ w.T + (base.bias if bias else 0)
    y = layer(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.weight, w, atol=1e-6, rtol=0)
    layer.unmerge()
    assert not layer.merged
    assert (base.weight - w0).abs().max() <= 1e-6


def test_lora_linear_init_and_dropout():
    torch.manual_seed(0)
    layer = ml.LoRALinear(nn.Linear(16, 8), r=4, lora_alpha=8, lora_dropout=0.5)
    assert torch.count_nonzero(layer.lora_B.weight) == 0  # B = 0: the adapted layer starts equal to the base
    bound = (1 / 16) ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 16: U(-1/sqrt(16), 1/sqrt(16))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.5 * bound
    randomize_adapters(layer)
    x = torch.randn(5, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))  # dropout off in eval
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # on in train mode, LoRA branch only


# ---- on the model ---------------------------------------------------------------------------------------

def test_merge_is_idempotent_and_unmerge_restores_base():
    for dora in (False, True):
        model = tiny_model()
        base = {k: v.clone() for k, v in model.state_dict().items()}
        ml.apply_lora(model, ml.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_dora=dora),
                      verbose=False)
        randomize_adapters(model)
        model.eval()
        x = torch.randint(0, 64, (2, 6))
        with torch.no_grad():
            unmerged = model(x).logits
            ml.merge_lora(model)
            once = {k: v.clone() for k, v in model.state_dict().items()}
            ml.merge_lora(model)  # second merge: no change
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in once.items())
            torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=0)
            q = model.model.layers[0].self_attn.q_proj
            w0 = base["model.layers.0.self_attn.q_proj.weight"]
            assert q.merged and (q.base_layer.weight - w0).abs().max() > 1e-3
            ml.unmerge_lora(model)
            ml.unmerge_lora(model)  # idempotent too
        for k, v in model.state_dict().items():
            if ".base_layer." in k:
                key = k.replace(".base_layer.", ".")
                assert (v - base[key]).abs().max() <= 1e-6, k


def test_only_lora_parameters_require_grad_and_counts():
    model = tiny_model()
    cfg = ml.LoraConfig(r=4, lora_alpha=8)  # default targets: q_proj, v_proj
    assert cfg.target_modules == ["q_proj", "v_proj"]
    ml.apply_lora(model, cfg, verbose=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(re.search(r"\.(q|v)_proj\.lora_[AB]\.weight$", n) for n in trainable)
    # q: 32 -> 32, v: 32 -> 16 (2 kv heads x 8); r * (in + out) each, 2 layers
    assert ml.count_parameters(model)[0] == 2 * 4 * ((32 + 32) + (32 + 16))
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "model.layers.0.self_attn.k_proj.weight" in keys  # untouched modules keep their names


def test_modules_to_save_and_all_linear_exclude_lm_head():
    model = tiny_model(tie_word_embeddings=True)
    ml.apply_lora(model, ml.LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"]), verbose=False)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.requires_grad
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied: training lm_head moves only it
    assert model.config.tie_word_embeddings is False
    assert len(ml.lora_layers(model)) == 2 * 7


def test_print_matches_peft(capsys):
    import peft
    case = pl.Case(targets="all-linear", dora=True)
    ours, ref = pl.base_models(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(ref, pl._peft_config(case))
    capsys.readouterr()
    pm.print_trainable_parameters()
    theirs = capsys.readouterr().out.strip()
    ml.apply_lora(ours, pl._lora_config(case))
    assert capsys.readouterr().out.strip() == theirs
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", theirs)


def test_tiny_preset_lora_vs_full_finetune_counts():
    model = CausalLM(ModelConfig.preset("tiny"))
    full = ml.count_parameters(model)[0]
    assert full == model.config.num_params()
    ml.apply_lora(model, ml.LoraConfig(r=8, lora_alpha=16), verbose=False)
    lora, total = ml.count_parameters(model)
    c = model.config
    q_out, v_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    assert lora == c.num_hidden_layers * 8 * ((c.hidden_size + q_out) + (c.hidden_size + v_out))
    assert total == full + lora


def test_works_on_plain_module_tree():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4)))
    ml.apply_lora(net, ml.LoraConfig(r=2, target_modules=r"0|2\.0"), verbose=False)
    assert isinstance(net[0], ml.LoRALinear) and isinstance(net[2][0], ml.LoRALinear)
    net(torch.randn(3, 8)).sum().backward()
    assert net[0].lora_B.weight.grad is not None and net[0].base_layer.weight.grad is None


def test_enable_input_require_grads():
    model = tiny_model()
    ml.apply_lora(model, ml.LoraConfig(), verbose=False)
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    model(torch.randint(0, 64, (1, 4)))
    handle = ml.enable_input_require_grads(model)
    model(torch.randint(0, 64, (1, 4)))
    handle.remove()
    assert seen == [False, True]


def test_merge_and_unload_returns_plain_model():
    model = tiny_model()
    ml.apply_lora(model, ml.LoraConfig(target_modules="all-linear"), verbose=False)
    plain = ml.merge_and_unload(model)
    assert type(plain) is CausalLM and not ml.lora_layers(plain)
    assert set(plain.state_dict()) == set(tiny_model().state_dict())


# ---- files ----------------------------------------------------------------------------------------------

def test_saved_files_match_peft_layout(tmp_path):
    import peft
    case = pl.Case(targets="all-linear", dora=True, modules_to_save=("lm_head", "embed_tokens"))
    ours, ref = pl.base_models(case)
    ml.apply_lora(ours, pl._lora_config(case), verbose=False)
    ml.save_adapter(ours, tmp_path / "ours", base_model_name_or_path="some/model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(ref, pl._peft_config(case)).save_pretrained(tmp_path / "peft")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in a
    assert "base_model.model.lm_head.weight" in a
    ca, cb = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    assert set(ca) <= set(cb)
    assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])
    for key in ("peft_type", "r", "lora_alpha", "use_dora", "use_rslora", "bias", "modules_to_save"):
        assert ca[key] == cb[key], key
    assert ca["base_model_name_or_path"] == "some/model"


def _saved(tmp_path, r=4, **overrides):
    model = tiny_model(**overrides)
    ml.apply_lora(model, ml.LoraConfig(r=r), verbose=False)
    randomize_adapters(model)
    ml.save_adapter(model, tmp_path)
    return model


def test_load_adapter_roundtrip(tmp_path):
    model = _saved(tmp_path)
    fresh = ml.load_adapter(tiny_model(), tmp_path)
    x = torch.randint(0, 64, (2, 5))
    assert torch.equal(model(x).logits, fresh(x).logits)


def test_error_wrong_r(tmp_path):
    _saved(tmp_path, r=4)
    model = ml.apply_lora(tiny_model(), ml.LoraConfig(r=8), verbose=False)
    with pytest.raises(ValueError, match=r"r=4.*r=8"):
        ml.load_adapter(model, tmp_path)
    # a config that lies about r: the tensor shapes give it away
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(ValueError, match=r"shape \(4, 32\).*r=8"):
        ml.load_adapter(tiny_model(), tmp_path)


def test_error_missing_keys(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del sd[dropped]
    save_file(sd, path)
    with pytest.raises(ValueError, match=re.escape(dropped)):
        ml.load_adapter(tiny_model(), tmp_path)


def test_error_target_module_the_model_lacks(tmp_path):
    _saved(tmp_path)  # 2 layers
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj.*does not have"):
        ml.load_adapter(tiny_model(num_hidden_layers=1), tmp_path)


def test_error_unsupported_saved_option(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 2}}))
    with pytest.raises(ValueError, match="rank_pattern"):
        ml.load_adapter(tiny_model(), tmp_path)


def test_error_matching_nothing_names_patterns_and_modules():
    with pytest.raises(ValueError, match=r"qproj.*matched no module.*self_attn\.q_proj"):
        ml.apply_lora(tiny_model(), ml.LoraConfig(target_modules=["qproj"]), verbose=False)
    with pytest.raises(ValueError, match="matched no module"):
        ml.apply_lora(tiny_model(), ml.LoraConfig(target_modules=r"layers\.9\..*"), verbose=False)


def test_error_bad_config_and_targets():
    with pytest.raises(ValueError, match="r must be a positive int"):
        ml.LoraConfig(r=0)
    with pytest.raises(ValueError, match="bias"):
        ml.LoraConfig(bias="all")
    with pytest.raises(ValueError, match="RMSNorm.*nn.Linear only"):
        ml.apply_lora(tiny_model(), ml.LoraConfig(target_modules=["input_layernorm"]), verbose=False)
    model = ml.apply_lora(tiny_model(), ml.LoraConfig(), verbose=False)
    with pytest.raises(ValueError, match="already has LoRA"):
        ml.apply_lora(model, ml.LoraConfig(), verbose=False)
    with pytest.raises(ValueError, match="modules_to_save"):
        ml.apply_lora(tiny_model(), ml.LoraConfig(modules_to_save=["score"]), verbose=False)

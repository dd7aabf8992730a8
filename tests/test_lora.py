"""minillm.peft.lora: parity with peft at a small budget, merge/unmerge algebra, freezing, file format, errors."""

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

from minillm import peft as peft_format
from minillm.model import count_parameters, disable_input_require_grads, enable_input_require_grads
from minillm.peft import lora as ml
from minillm.config import ModelConfig
from minillm.model import CausalLM
from parity import lora as pl

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_model(seed: int = 0, fused: bool = True, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    cfg.update(overrides)
    return CausalLM(ModelConfig(**cfg), fused=fused)


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


# ---- parity with peft (the rows of `python -m parity --only lora`, small budget) -------------------------

def test_parity_rows_small_budget():
    rows = list(pl.rows(budget=0.25))
    assert len(rows) == 13
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
    layer = ml.LoRALinear(base, ml.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=dora))
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
    layer = ml.LoRALinear(nn.Linear(16, 8), ml.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5))
    assert torch.count_nonzero(layer.lora_B.weight) == 0  # B = 0: the adapted layer starts equal to the base
    bound = (1 / 16) ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 16: U(-1/sqrt(16), 1/sqrt(16))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.5 * bound
    randomize_adapters(layer)
    x = torch.randn(5, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))  # dropout off in eval
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # on in train mode
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)  # the same mask: dropout on the LoRA branch's input only (peft's placement)
    expected = layer.base_layer(x) + layer.lora_B(layer.lora_A(torch.nn.functional.dropout(x, 0.5))) * layer.scaling
    assert torch.equal(y, expected)


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
    assert count_parameters(model)[0] == 2 * 4 * ((32 + 32) + (32 + 16))
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
    full = count_parameters(model)[0]
    assert full == model.config.num_params()
    ml.apply_lora(model, ml.LoraConfig(r=8, lora_alpha=16), verbose=False)
    lora, total = count_parameters(model)
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
    handle = enable_input_require_grads(model)
    assert enable_input_require_grads(model) is handle  # idempotent: one hook
    model(torch.randint(0, 64, (1, 4)))
    disable_input_require_grads(model)
    model(torch.randint(0, 64, (1, 4)))
    assert seen == [False, True, False]


def _loss_and_grads(model, x, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks
    loss = model(x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("order", ["lora-then-checkpointing", "checkpointing-then-lora"])
def test_checkpointing_grads_equal_plain(reentrant, order):
    """Frozen embeddings, dropout active: checkpointed LoRA grads are bit-identical to the plain ones, in the
    Trainer's order (apply_lora, then activation_checkpointing_enable) and in peft's (checkpointing first)."""
    cfg = ml.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.2, use_dora=True,
                        modules_to_save=["lm_head"])  # a trainable lm_head: no error, LoRA grads would just be None
    x = torch.randint(0, 64, (2, 7))
    plain, ckpt = tiny_model(fused=False), tiny_model(fused=False)  # same seed: same weights
    kwargs = {"use_reentrant": reentrant}
    if order == "checkpointing-then-lora":
        ckpt.activation_checkpointing_enable(kwargs)
    for m in (plain, ckpt):
        torch.manual_seed(0)
        ml.apply_lora(m, cfg, verbose=False)
        randomize_adapters(m)
        m.train()
    if order == "lora-then-checkpointing":
        ckpt.activation_checkpointing_enable(kwargs)
    assert not ckpt.model.embed_tokens.weight.requires_grad
    l0, g0 = _loss_and_grads(plain, x)
    l1, g1 = _loss_and_grads(ckpt, x)
    assert torch.equal(l0, l1)
    assert set(g0) == set(g1) and all(g is not None for g in g1.values())
    assert len([n for n in g1 if ".lora_" in n]) == 2 * 7 * 3  # A, B, m of 7 Linears in 2 layers
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n


def test_reentrant_without_input_grads_is_what_the_hook_fixes():
    """The failure the hook exists for, so the test above can fail: without it re-entrant checkpointing over
    a frozen embedding gives a loss without grad_fn (the error users saw)."""
    model = tiny_model(fused=False)
    ml.apply_lora(model, ml.LoraConfig(), verbose=False)
    model.activation_checkpointing_enable({"use_reentrant": True})
    disable_input_require_grads(model)
    model.train()
    x = torch.randint(0, 64, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad=True"
        with pytest.raises(RuntimeError, match="does not require grad"):
            model(x, labels=x).loss.backward()


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
    peft_format.save_adapter(ours, tmp_path / "ours", base_model_name_or_path="some/model")
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
    peft_format.save_adapter(model, tmp_path)
    return model


def test_load_adapter_roundtrip(tmp_path):
    model = _saved(tmp_path)
    fresh = peft_format.load_adapter(tiny_model(), tmp_path)
    x = torch.randint(0, 64, (2, 5))
    assert torch.equal(model(x).logits, fresh(x).logits)


def test_error_wrong_r(tmp_path):
    _saved(tmp_path, r=4)
    model = ml.apply_lora(tiny_model(), ml.LoraConfig(r=8), verbose=False)
    with pytest.raises(ValueError, match=r"r=4.*r=8"):
        peft_format.load_adapter(model, tmp_path)
    # a config that lies about r: the tensor shapes give it away
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(ValueError, match=r"shape \(4, 32\).*r=8"):
        peft_format.load_adapter(tiny_model(), tmp_path)


def test_error_missing_keys(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del sd[dropped]
    save_file(sd, path)
    with pytest.raises(ValueError, match=re.escape(dropped)):
        peft_format.load_adapter(tiny_model(), tmp_path)


def test_error_target_module_the_model_lacks(tmp_path):
    _saved(tmp_path)  # 2 layers
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj.*does not have"):
        peft_format.load_adapter(tiny_model(num_hidden_layers=1), tmp_path)


def test_error_unsupported_saved_option(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 2}}))
    with pytest.raises(ValueError, match="rank_pattern"):
        peft_format.load_adapter(tiny_model(), tmp_path)


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
    with pytest.raises(ValueError, match="RMSNorm.*nn.Linear and nn.Embedding only"):
        ml.apply_lora(tiny_model(), ml.LoraConfig(target_modules=["input_layernorm"]), verbose=False)
    model = ml.apply_lora(tiny_model(), ml.LoraConfig(), verbose=False)
    with pytest.raises(ValueError, match="already has LoRA"):
        ml.apply_lora(model, ml.LoraConfig(), verbose=False)
    with pytest.raises(ValueError, match="modules_to_save"):
        ml.apply_lora(tiny_model(), ml.LoraConfig(modules_to_save=["score"]), verbose=False)


# ---- LoRA on a tied lm_head -----------------------------------------------------------------------------

def _tied_lm_head_model(dora: bool = False) -> CausalLM:
    model = tiny_model(fused=False, tie_word_embeddings=True)
    with pytest.warns(UserWarning, match=r"'lm_head' shares its weight with \['model\.embed_tokens'\]"):
        ml.apply_lora(model, ml.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], use_dora=dora),
                      verbose=False)
    randomize_adapters(model)
    return model.eval()


@pytest.mark.parametrize("dora", [False, True])
def test_tied_lm_head_merge_keeps_embedding_and_logits(dora, tmp_path):
    model = _tied_lm_head_model(dora)
    embed = model.model.embed_tokens.weight
    assert model.lm_head.base_layer.weight is embed  # still tied while training: no extra copy
    before = embed.detach().clone()
    x = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        unmerged = model(x).logits
        with pytest.warns(UserWarning, match="untied from the input embedding"):
            merged = ml.merge_and_unload(model)
        assert torch.equal(merged.model.embed_tokens.weight, before)  # the merge did not move the embedding
        assert merged.lm_head.weight is not merged.model.embed_tokens.weight
        assert merged.config.tie_word_embeddings is False
        torch.testing.assert_close(merged(x).logits, unmerged, atol=1e-6, rtol=0)
        merged.save_pretrained(tmp_path)  # now stores lm_head.weight: the reload is the merged model
        torch.testing.assert_close(CausalLM.from_pretrained(tmp_path).eval()(x).logits, unmerged, atol=1e-6, rtol=0)


def test_tied_lm_head_layer_merge_and_unmerge():
    """LoRALinear.merge() on its own unties too; unmerge() restores lm_head's values, the embedding never moved."""
    model = _tied_lm_head_model()
    before = model.model.embed_tokens.weight.detach().clone()
    model.lm_head.merge()
    assert torch.equal(model.model.embed_tokens.weight, before)
    assert (model.lm_head.base_layer.weight - before).abs().max() > 1e-3
    model.lm_head.unmerge()
    assert (model.lm_head.base_layer.weight - before).abs().max() <= 1e-6


def test_tied_lm_head_adapter_files_match_peft(tmp_path):
    import peft
    case = pl.Case(targets="qv+lm_head", tie=True)
    ours, ref = pl.base_models(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml.apply_lora(ours, pl._lora_config(case), verbose=False)
        peft.get_peft_model(ref, pl._peft_config(case)).save_pretrained(tmp_path / "peft")
    peft_format.save_adapter(ours, tmp_path / "ours")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert "base_model.model.lm_head.base_layer.weight" in b  # peft saves a targeted lm_head's base weight
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) or "lora_A" in k for k in a)
    with pytest.warns(UserWarning, match="shares its weight"):
        peft_format.load_adapter(pl.base_models(case)[0], tmp_path / "peft")  # and minillm loads peft's file


# ---- adapter_config.json and LoraConfig validation ------------------------------------------------------

BAD_CONFIG_VALUES = [  # (key, value written to adapter_config.json, what the error must say)
    ("r", "8", r"'r' must be a positive integer, got '8'"),
    ("r", 4.0, r"'r' must be a positive integer"),
    ("r", 0, r"'r' must be a positive integer"),
    ("r", -2, r"'r' must be a positive integer"),
    ("r", True, r"'r' must be a positive integer"),
    ("lora_alpha", "16", r"'lora_alpha' must be a finite number, got '16'"),
    ("lora_alpha", "NaN", r"'lora_alpha' must be a finite number"),
    ("lora_alpha", float("nan"), r"NaN is not a number JSON allows"),  # json writes NaN: refused at reading
    ("lora_alpha", float("inf"), r"Infinity is not a number JSON allows"),
    ("lora_alpha", 1e308, r"the update of model\.layers\.0\.self_attn\.q_proj \(B A \* 2\.5e\+307\) is not finite"),
    ("lora_alpha", None, r"'lora_alpha' must be a finite number"),
    ("lora_dropout", 1.5, r"'lora_dropout' must be a number in \[0, 1\)"),
    ("lora_dropout", "0.1", r"'lora_dropout' must be a number"),
    ("target_modules", 3, r"'target_modules' must be a string or a list of strings"),
    ("target_modules", ["q_proj", 1], r"'target_modules' must be a string or a list of strings"),
    ("target_modules", {"q_proj": 1}, r"'target_modules' must be a string or a list"),
    ("target_modules", "(unclosed", r"target_modules='\(unclosed' is not a valid regex"),
    ("target_modules", [], r"target_modules is an empty list"),
    ("modules_to_save", "lm_head", r"'modules_to_save' must be null or a list of strings"),
    ("use_dora", "false", r"'use_dora' must be true or false"),
    ("use_rslora", 1, r"'use_rslora' must be true or false"),
    ("peft_type", "ADALORA", r"peft_type 'ADALORA' is not one minillm implements"),
    ("peft_type", None, r"peft_type None is not one minillm implements"),
    ("bias", "all", r"'bias' must be \"none\""),
    ("init_lora_weights", "pissa", r"'init_lora_weights' must be true, false or \"gaussian\""),
    ("init_lora_weights", 1, r"'init_lora_weights' must be true, false or \"gaussian\""),
    ("ensure_weight_tying", True, r"'ensure_weight_tying' must be false"),
    ("rank_pattern", {"q_proj": 2}, r"'rank_pattern'=\{'q_proj': 2\} is not supported"),
    ("base_model_name_or_path", 5, r"'base_model_name_or_path' must be null or a string"),
]


@pytest.mark.parametrize("key,value,message", BAD_CONFIG_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_CONFIG_VALUES])
def test_adapter_config_bad_value_names_file_and_key(tmp_path, key, value, message):
    _saved(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*" + message):
        peft_format.load_adapter(tiny_model(), tmp_path)


@pytest.mark.parametrize("text,message", [
    ('{"r": 4,\n "lora_alpha": }', r"adapter_config\.json:2: not valid JSON"),
    ('[1, 2]', r"adapter_config\.json: expected a JSON object, got list"),
    ('{"lora_alpha": 8, "target_modules": ["q_proj"]}', r"adapter_config\.json: missing key 'r'"),
    ('{"r": 4, "target_modules": ["q_proj"]}', r"adapter_config\.json: missing key 'lora_alpha'"),
])
def test_adapter_config_malformed_file(tmp_path, text, message):
    _saved(tmp_path)
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        peft_format.load_adapter(tiny_model(), tmp_path)


@pytest.mark.parametrize("kwargs,message", [
    (dict(lora_alpha=float("nan")), r"LoraConfig\.lora_alpha must be a finite number > 0, got nan"),
    (dict(lora_alpha=float("-inf")), r"LoraConfig\.lora_alpha must be a finite number"),
    (dict(lora_alpha="16"), r"LoraConfig\.lora_alpha must be a finite number > 0, got '16'"),
    (dict(r=-1), r"LoraConfig\.r must be a positive int, got -1"),
    (dict(r=8.0), r"LoraConfig\.r must be a positive int, got 8\.0"),
    (dict(r=True), r"LoraConfig\.r must be a positive int, got True"),
    (dict(lora_dropout=float("nan")), r"LoraConfig\.lora_dropout must be a number in \[0, 1\), got nan"),
    (dict(lora_dropout=1.0), r"LoraConfig\.lora_dropout must be a number in \[0, 1\)"),
    (dict(target_modules=5), r"LoraConfig\.target_modules must be a string"),
    (dict(target_modules=["q_proj", None]), r"LoraConfig\.target_modules must be a string"),
    (dict(modules_to_save="lm_head"), r"LoraConfig\.modules_to_save must be a list of module names"),
    (dict(use_dora=1), r"LoraConfig\.use_dora must be true or false"),
])
def test_lora_config_python_api_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ml.LoraConfig(**kwargs)


# ---- saving from gathered / consolidated tensors (ZeRO-3) -----------------------------------------------

def test_save_adapter_from_state_dict_and_refuses_empty(tmp_path):
    model = _saved(tmp_path / "live")
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_format.save_adapter(model, tmp_path / "sd", state_dict=full)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("live", "sd"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    key = "model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(ValueError, match=r"1 adapter tensors are empty .*ZeRO-3.*q_proj\.lora_A"):
        peft_format.save_adapter(model, tmp_path / "bad", state_dict={**full, key: torch.empty(0)})
    del full[key]
    with pytest.raises(ValueError, match=r"state_dict lacks 1 adapter tensors.*q_proj\.lora_A"):
        peft_format.save_adapter(model, tmp_path / "bad", state_dict=full)


def test_trainer_reentrant_checkpointing_trains_like_plain(tmp_path):
    """The user's path from issue 9: HF Trainer, `gradient_checkpointing_kwargs={"use_reentrant": True}`, a LoRA'd
    minillm model with frozen embeddings. Two steps; the adapter must end bit-identical to a run without it."""
    import transformers
    x = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": row, "labels": row} for row in x]
    adapters = []
    for ckpt in (False, True):
        model = tiny_model(fused=False)
        torch.manual_seed(0)
        ml.apply_lora(model, ml.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated-alias FutureWarnings: this is the spelling users have
            args = transformers.TrainingArguments(
                output_dir=str(tmp_path / str(ckpt)), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": True} if ckpt else None,
                report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0)
            transformers.Trainer(model=model, args=args, train_dataset=data).train()
        assert model.gradient_checkpointing is ckpt
        adapters.append({k: v.detach().clone() for k, v in ml.METHOD.state_dict(model).items()})
    plain, checkpointed = adapters
    assert all(not torch.equal(v, torch.zeros_like(v)) for k, v in checkpointed.items() if "lora_B" in k)  # trained
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)


def test_corrupt_adapter_weights_name_the_file(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(ValueError, match=re.escape(str(path))):
        peft_format.load_adapter(tiny_model(), tmp_path)


# ---------------------------------------------------------------------------------------------------------
# LoRA on nn.Embedding (peft's lora.Embedding: lora_embedding_A (r, vocab), lora_embedding_B (dim, r))


@settings(max_examples=20, deadline=None, database=None, derandomize=True)
@given(st.integers(2, 30), st.integers(1, 12), st.integers(1, 6), st.sampled_from([1, 8, 16]), st.booleans(),
       st.sampled_from([None, 0, 1]))
def test_lora_embedding_matches_formula_and_merge(vocab, dim, r, alpha, rslora, padding_idx):
    torch.manual_seed(0)
    layer = ml.LoRAEmbedding(nn.Embedding(vocab, dim, padding_idx=padding_idx), ml.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora))
    x = torch.randint(0, vocab, (3, 5))
    assert torch.equal(layer(x), layer.base_layer(x))  # A = 0 at init: no change
    assert layer.lora_embedding_A.abs().sum() == 0 and layer.lora_embedding_B.abs().sum() > 0
    with torch.no_grad():
        layer.lora_embedding_A.normal_()
    s = alpha / (r ** 0.5 if rslora else r)
    want = layer.base_layer.weight[x] + (layer.lora_embedding_A.T[x] @ layer.lora_embedding_B.T) * s
    got = layer(x)
    assert (got - want).abs().max() <= 1e-5
    got.sum().backward()
    if padding_idx is not None:  # the pad token's column of A gets no gradient, as in nn.Embedding
        assert layer.lora_embedding_A.grad[:, padding_idx].abs().sum() == 0
    base = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert (layer(x) - want).abs().max() <= 1e-5
    layer.unmerge()
    assert (layer.base_layer.weight - base).abs().max() <= 1e-5


def test_lora_embedding_tied_merge_keeps_lm_head(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml.apply_lora(model, ml.LoraConfig(target_modules=["embed_tokens", "q_proj"]), verbose=False)
    randomize_adapters(model)
    assert isinstance(model.model.embed_tokens, ml.LoRAEmbedding)
    x = torch.randint(0, model.config.vocab_size, (2, 6))
    model.eval()
    with torch.no_grad():
        before = model(x).logits
        peft_format.save_adapter(model, tmp_path)
        keys = set(load_file(tmp_path / "adapter_model.safetensors"))
        assert {"base_model.model.model.embed_tokens.lora_embedding_A",
                "base_model.model.model.embed_tokens.lora_embedding_B",
                "base_model.model.model.embed_tokens.base_layer.weight"} <= keys  # peft's save_embedding_layers
        lm_head = model.lm_head.weight.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = ml.merge_and_unload(model)
        assert torch.equal(merged.lm_head.weight, lm_head)  # the merge did not move the output layer
        assert (merged(x).logits - before).abs().max() <= 1e-6
    other = tiny_model(tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_format.load_adapter(other, tmp_path)
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(x).logits, before)


def test_lora_embedding_refuses_dora():
    with pytest.raises(ValueError, match="use_dora"):
        ml.apply_lora(tiny_model(), ml.LoraConfig(target_modules=["embed_tokens"], use_dora=True), verbose=False)

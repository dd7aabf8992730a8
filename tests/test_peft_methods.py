"""Prompt tuning, prefix tuning, Houlsby adapters and the one peft-format save/load pair (minillm/peft/files.py)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import minillm
from minillm.peft import houlsby as ha
from minillm.peft import lora as ml
from minillm import peft as peft_format
from minillm.config import ModelConfig
from minillm.model import CausalLM
from minillm.peft.prefix import PrefixTuningConfig, PrefixTuningLM
from minillm.peft.prompt import PromptTuningConfig, PromptTuningLM, text_init_ids
from parity import peft_methods as pm

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    cfg.update(overrides)
    return CausalLM(ModelConfig(**cfg), fused=False).eval()


def randomize(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def batch(B: int = 2, T: int = 6, vocab: int = 64):
    x = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding
    return x, mask


def wrap(kind: str, model: CausalLM, P: int = 3):
    if kind == "prompt":
        return PromptTuningLM(model, PromptTuningConfig(num_virtual_tokens=P))
    if kind == "prefix-proj":
        return PrefixTuningLM(model, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True,
                                                        encoder_hidden_size=16))
    return PrefixTuningLM(model, PrefixTuningConfig(num_virtual_tokens=P))


# ---- parity with peft (a few rows of `python -m parity --only peft_methods`) ----------------------------

@pytest.mark.parametrize("label", ["prefix, no projection, GQA 4/2", "prompt, SAMPLE_VOCAB, qwen3 tied",
                                   "prefix, projection E=24, MQA, position_ids"])
def test_forward_matches_peft(label):
    logits, loss, grads, init = pm.measure(pm.NAMED[label])
    assert logits <= 1e-6 and loss <= 1e-6 and grads <= 1e-6 and init == 0.0


def test_generation_matches_peft_forward():
    assert pm.generation_delta(pm.PCase(projection=True)) == 0.0


def test_parity_check_can_fail(monkeypatch):
    # a prefix whose positions are off by one from peft's (+P) must show up in the logits
    orig = PrefixTuningLM.forward
    assert pm.measure(pm.NAMED["prefix, projection E=24, MQA, position_ids"])[0] == 0.0
    monkeypatch.setattr(PrefixTuningLM, "forward", lambda self, input_ids, attention_mask=None, position_ids=None,
                        **kw: orig(self, input_ids, attention_mask=attention_mask,
                                   position_ids=None if position_ids is None else position_ids - 1, **kw))
    assert pm.measure(pm.NAMED["prefix, projection E=24, MQA, position_ids"])[0] > 1e-4


def test_houlsby_vs_equations_and_identity():
    for args in [(0, 4, "gelu", 2, 2, "zero"), (1, 8, "relu", 1, 1, "houlsby")]:
        vs_equations, identity = pm.houlsby_measure(*args)
        assert vs_equations <= 1e-5 and identity == 0.0


# ---- prompt tuning --------------------------------------------------------------------------------------

def test_prompt_tuning_shapes_labels_and_frozen_base():
    model = tiny()
    w = wrap("prompt", model, P=3)
    assert [n for n, p in w.named_parameters() if p.requires_grad] == ["prompt_encoder.weight"]
    x, mask = batch()
    w.train()
    out = w(x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100))
    assert out.logits.shape == (2, 3 + 6, 64)
    out.loss.backward()
    assert w.prompt_encoder.weight.grad.abs().sum() > 0
    # the virtual tokens are never predicted (labels -100), but the last one predicts the first real token
    with torch.no_grad():
        logits = w(x, attention_mask=mask).logits[:, 3 - 1:-1]  # (B, T, V): positions P-1 .. P+T-2
        labels = x.masked_fill(mask == 0, -100)
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100)
        assert (w(x, attention_mask=mask, labels=labels).loss - want).abs() < 1e-6


def test_text_init_ids_rule_and_init():
    assert text_init_ids([5, 6, 7], 7) == [5, 6, 7, 5, 6, 7, 5]
    assert text_init_ids([5, 6, 7], 2) == [5, 6]
    model = tiny()
    w = PromptTuningLM(model, PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                                 init_token_ids=[9, 10, 11]))
    assert torch.equal(w.prompt_encoder.weight, model.model.embed_tokens.weight[[9, 10, 11, 9]])
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=0)


# ---- prefix tuning --------------------------------------------------------------------------------------

@settings(max_examples=4, deadline=None, database=None, derandomize=True)
@given(st.sampled_from(["prompt", "prefix", "prefix-proj"]), st.integers(1, 4), st.sampled_from([1, 2, 4]))
def test_cached_generation_equals_full_recompute(kind, P, kv):
    """generate() (prefix/prompt prefilled into the KV cache, left padding) vs argmax of full forwards."""
    w = wrap(kind, tiny(num_key_value_heads=kv), P)
    randomize(w)
    w.eval()
    x, mask = batch()
    with torch.no_grad():
        out = w.generate(x, max_new_tokens=5, attention_mask=mask, eos_token_id=[])
        seq, m = x, mask
        for _ in range(5):
            pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)
            nxt = w(seq, attention_mask=m, position_ids=pos).logits[:, -1].argmax(-1)
            seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, m.new_ones(2, 1)], 1)
    assert torch.equal(out, seq)


def test_prefix_kv_layout_and_no_rope():
    w = wrap("prefix", tiny(), P=2)
    keys, values = w.past_key_values(3)
    cfg = w.config
    assert len(keys) == len(values) == cfg.num_hidden_layers
    assert keys[0].shape == (3, cfg.num_key_value_heads, 2, cfg.head_dim)
    table = w.prefix_table().view(2, cfg.num_hidden_layers * 2, cfg.num_key_value_heads, cfg.head_dim)
    assert torch.equal(keys[1][0], table[:, 2].transpose(0, 1))  # layer 1 keys = slot 2, values = slot 3
    assert torch.equal(values[1][0], table[:, 3].transpose(0, 1))


def test_prefix_checkpointing():
    w = wrap("prefix-proj", tiny())
    x, mask = batch()
    w.train()
    w.gradient_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(NotImplementedError, match="use_reentrant"):
        w(x, attention_mask=mask, labels=x)
    assert pm.prefix_ckpt(pm.PCase(projection=True)) == 0.0


# ---- Houlsby adapters -----------------------------------------------------------------------------------

def test_houlsby_placement_counts_and_errors(capsys):
    model = tiny()
    ha.apply_adapters(model, ha.HoulsbyConfig(bottleneck=4))
    line = capsys.readouterr().out.strip()
    per = 2 * (32 * 4 + 4 + 4 * 32 + 32)  # two adapters per layer: down (m, d) + m, up (d, m) + d
    assert line.startswith(f"trainable params: {2 * per:,d} ||")
    assert isinstance(model.model.layers[0].self_attn.o_proj, ha.AdaptedLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, ha.AdaptedLinear)
    with pytest.raises(ValueError, match="smaller than the hidden size"):
        ha.apply_adapters(tiny(), ha.HoulsbyConfig(bottleneck=32), verbose=False)
    with pytest.raises(ValueError, match="already has adapters"):
        ha.apply_adapters(model, ha.HoulsbyConfig(), verbose=False)


# ---- one save/load pair, every method -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix-proj", "houlsby", "lora-embedding"])
def test_save_load_roundtrip(kind, tmp_path):
    model = tiny()
    if kind == "houlsby":
        w = ha.apply_adapters(model, ha.HoulsbyConfig(bottleneck=4), verbose=False)
    elif kind == "lora-embedding":
        w = ml.apply_lora(model, ml.LoraConfig(target_modules=["embed_tokens", "v_proj"]), verbose=False)
    else:
        w = wrap(kind, model)
    randomize(w)
    w.eval()
    x, mask = batch()
    with torch.no_grad():
        want = w(x, attention_mask=mask).logits
    peft_format.save_adapter(w, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == {"houlsby": ha.PEFT_TYPE, "lora-embedding": "LORA"}.get(
        kind, "PROMPT_TUNING" if kind == "prompt" else "PREFIX_TUNING")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft_format.load_adapter(tiny(), tmp_path).eval()
    with torch.no_grad():
        assert (loaded(x, attention_mask=mask).logits - want).abs().max() <= 1e-6


def test_load_errors_name_file_and_key(tmp_path):
    w = wrap("prefix", tiny())
    peft_format.save_adapter(w, tmp_path)
    with pytest.raises(ValueError, match=r"adapter_config.json: key 'num_layers' is 2, this model needs 3"):
        peft_format.load_adapter(tiny(num_hidden_layers=3), tmp_path)
    with pytest.raises(ValueError, match=r"key 'token_dim' is 16, this model needs 32"):
        peft_format.load_adapter(tiny(num_key_value_heads=4), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LOHA"}))
    with pytest.raises(ValueError, match="peft_type 'LOHA' is not one minillm implements"):
        peft_format.load_adapter(tiny(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "num_virtual_tokens": 5}))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: prompt_embeddings has shape \(3, 64\)"):
        peft_format.load_adapter(tiny(), tmp_path)


@pytest.mark.parametrize("kind", ["prompt", "prefix-proj", "houlsby"])
def test_hf_trainer_trains_each_with_checkpointing(kind, tmp_path):
    """The HF Trainer (as train/finetune.py uses it) trains every wrapper, activation checkpointing on."""
    import transformers

    model = tiny()
    w = ha.apply_adapters(model, ha.HoulsbyConfig(bottleneck=4), verbose=False) if kind == "houlsby" \
        else wrap(kind, model)
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
            for x in torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))]
    before = [p.detach().clone() for p in w.parameters() if p.requires_grad]
    args = transformers.TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                                          report_to=[], save_strategy="no", use_cpu=True, gradient_checkpointing=True,
                                          disable_tqdm=True)
    transformers.Trainer(model=w, args=args, train_dataset=data).train()
    after = [p for p in w.parameters() if p.requires_grad]
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(before, after))  # every trainable tensor moved
    assert not any(p.requires_grad for p in model.model.embed_tokens.parameters())  # the base stayed frozen


# ---- switching off: minillm.peft.disable_adapter == peft's disable_adapter() == the base model -----------

@pytest.mark.parametrize("label", sorted(pm.DISABLE_LORA))
def test_disable_adapter_lora_matches_peft(label):
    assert pm.disable_lora(pm.DISABLE_LORA[label]) == 0.0  # off == peft's off == base; back on after the block


@pytest.mark.parametrize("label", sorted(pm.DISABLE_PROMPT))
def test_disable_adapter_prompt_prefix_matches_peft(label):
    assert pm.disable_prompt_prefix(pm.DISABLE_PROMPT[label]) == 0.0


@pytest.mark.parametrize("label", sorted(pm.DISABLE_IA3))
def test_disable_adapter_ia3_matches_peft(label):
    assert pm.disable_ia3(pm.DISABLE_IA3[label]) == 0.0


def test_disable_adapter_houlsby_is_the_base_model():
    assert pm.disable_houlsby() == 0.0


def _refusal(model, match: str) -> None:
    """disable_adapter refuses with one sentence, and leaves the model as it was (still switched on)."""
    x, mask = batch()
    with torch.no_grad():
        before = model(x, attention_mask=mask).logits
        with pytest.raises(ValueError, match=match) as e:
            with peft_format.disable_adapter(model):
                pass
        assert "\n" not in str(e.value) and str(e.value)[-1] not in ",;:"
        assert torch.equal(model(x, attention_mask=mask).logits, before)


def test_disable_adapter_refusals_are_sentences():
    model = ml.apply_lora(tiny(), ml.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), verbose=False)
    _refusal(model, "LoRA with modules_to_save cannot be switched off")
    model = ha.apply_adapters(tiny(), ha.HoulsbyConfig(bottleneck=4, init="houlsby", train_norms=True), verbose=False)
    _refusal(model, "Houlsby adapters with train_norms cannot be switched off")
    model = ml.apply_lora(tiny(), ml.LoraConfig(target_modules=["q_proj", "v_proj"]), verbose=False)
    randomize(model)
    ml.merge_lora(model)  # merged in place: the layers are still there
    _refusal(model, "a merged LoRA cannot be switched off")
    merged = peft_format.merge_and_unload(ml.apply_lora(tiny(), ml.LoraConfig(), verbose=False))
    _refusal(merged, "has no fine-tuning method applied")


# ---- issue 25, item 8: an adapter_config.json without peft_type is LoRA ----------------------------------

def test_config_without_peft_type_loads_as_lora(tmp_path):
    model = ml.apply_lora(tiny(), ml.LoraConfig(target_modules=["q_proj", "v_proj"], r=4), verbose=False)
    randomize(model)
    peft_format.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    del cfg["peft_type"]  # older peft files, hand-written configs
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    _, d = peft_format.read_config(tmp_path)
    assert "peft_type" not in d
    assert peft_format.method_in(tmp_path) is peft_format.METHODS["LORA"]
    loaded = peft_format.load_adapter(tiny(), tmp_path)
    assert peft_format.method_of(loaded) is peft_format.METHODS["LORA"] and loaded.peft_config.r == 4
    x, mask = batch()
    with torch.no_grad():
        assert torch.equal(loaded(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits)


# ---- issue 25, item 9: Houlsby adapters on a bf16/fp16 base compute in fp32, output in the base dtype ------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_houlsby_low_precision_base_adapter_in_fp32(dtype):
    """The rule (minillm/peft/houlsby.py AdaptedLinear): the adapter's weights are fp32 and it computes in fp32
    on the base layer's output upcast; the sum is cast back to the base dtype once. Reference: the same
    equation by hand in fp32, rounded once to `dtype`. Tolerance: at most one ulp of `dtype` (the hand
    matmuls may round differently from F.linear in the last fp32 bit, which can flip a final rounding) on
    at most 2% of the elements; an adapter run in `dtype` rounds its bottleneck, its weights and the sum
    and misses on most elements (measured: 62% bf16, 57% fp16)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 64).to(dtype)  # tiny: bf16 matmuls are slow on CPU
    layer = ha.AdaptedLinear(base, ha.HoulsbyConfig(bottleneck=8, init="houlsby"))
    ad = layer.adapter
    assert {p.dtype for p in ad.parameters()} == {torch.float32}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ad.parameters():  # adapter output well above the base's: its rounding is what is measured
            p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(4, 16, generator=g).to(dtype)
        out = layer(x)
        y = base(x).float()
        ref = (y + F.gelu(y @ ad.down.weight.T + ad.down.bias) @ ad.up.weight.T + ad.up.bias).to(dtype)
    assert out.dtype == dtype
    diff = (out.float() - ref.float()).abs()
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp(min=torch.finfo(dtype).tiny)
    assert (diff <= ulp).all(), f"max |Δ| {diff.max():.3g} exceeds one {dtype} ulp"
    assert (diff > 0).float().mean() <= 0.02, f"{(diff > 0).float().mean():.0%} of the elements differ"


# ---- issue 25, item 10: init="houlsby" is N(0, 1e-2) truncated at +-2e-2 (two std) ------------------------

def test_houlsby_init_truncation_bounds():
    torch.manual_seed(0)
    ad = ha.HoulsbyAdapter(512, ha.HoulsbyConfig(bottleneck=256, init="houlsby"))
    for lin in (ad.down, ad.up):
        w = lin.weight.detach()
        assert w.abs().max() <= 2e-2  # the default bounds (+-2) would leave ~5 std = 5e-2 values here
        assert w.abs().max() >= 1.98e-2 and (w.abs() > 1.9e-2).float().mean() > 0.005  # the bound is reached
        assert 0.8e-2 <= w.std() <= 0.95e-2  # std of N(0, 1e-2) truncated at 2 std: 0.88e-2
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))

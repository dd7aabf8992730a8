"""minillm.CausalLM vs transformers' Llama/Qwen2/Qwen3, on configs drawn by hypothesis.

Each draw builds a random config (family, GQA ratio from MHA to MQA, explicit head_dim, biases, tying,
RoPE scaling type, padding side), fills minillm's model with random weights — biases and norm weights
too, so a missing bias or a wrong norm cannot hide behind zeros and ones — copies them into the
transformers model with a strict key check, and compares logits on non-padded positions, the loss, and
the gradient of every parameter.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import torch
import transformers
from hypothesis import strategies as st

from minillm import CausalLM, ModelConfig
from parity.harness import Row, property_rows

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()  # one progress line per check, not per shard

ROPE_SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
]


@st.composite
def configs(draw, rope_scalings=ROPE_SCALINGS) -> ModelConfig:
    model_type = draw(st.sampled_from(["llama", "qwen2", "qwen3"]))
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))  # kv == heads: MHA; kv == 1: MQA
    head_dim = draw(st.sampled_from([8, 16, 32]))
    explicit_head_dim = draw(st.booleans())  # hidden != heads * head_dim, as Qwen3 does
    hidden = draw(st.sampled_from([32, 48, 64])) if explicit_head_dim else heads * head_dim
    return ModelConfig(
        model_type=model_type, vocab_size=draw(st.sampled_from([61, 128])), hidden_size=hidden,
        intermediate_size=draw(st.sampled_from([40, 96])), num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim if explicit_head_dim else None,
        attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()) if model_type == "llama" else False,
        tie_word_embeddings=draw(st.booleans()), rope_theta=draw(st.sampled_from([10000.0, 500000.0])),
        rope_scaling=draw(st.sampled_from(rope_scalings)), rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
        max_position_embeddings=12, pad_token_id=0, eos_token_id=None,
    )


@st.composite
def cases(draw) -> dict:
    """A config plus a batch: (B, T) token ids, a padding side and a seed for the weights."""
    cfg = draw(configs())
    B, T = draw(st.integers(1, 3)), draw(st.integers(2, 20))  # T > 12 exercises dynamic/yarn beyond max_pos
    return {"cfg": cfg, "B": B, "T": T, "padding": draw(st.sampled_from(["none", "right", "left"])),
            "seed": draw(st.integers(0, 2**16))}


def random_model(cfg: ModelConfig, seed: int, attn: str = "sdpa", fused: bool = False) -> CausalLM:
    """fused=False: the exact path (logits materialised, transformers' loss op for op)."""
    torch.manual_seed(seed)
    model = CausalLM(cfg, attn_implementation=attn, fused=fused)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1 if p.dim() > 1 else 0.5)
    return model


def hf_copy(model: CausalLM, attn: str = "sdpa") -> torch.nn.Module:
    """transformers' model of the same architecture holding the same weights (strict key check)."""
    hf_config = transformers.AutoConfig.for_model(**model.config.to_hf())
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
        hf.load_state_dict(state, strict=False)  # lm_head is the tied embedding
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    else:
        hf.load_state_dict(state, strict=True)
    return hf


def batch(case: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """input_ids, attention_mask, position_ids, labels (-100 on padding)."""
    B, T, cfg = case["B"], case["T"], case["cfg"]
    g = torch.Generator().manual_seed(case["seed"])
    ids = torch.randint(1, cfg.vocab_size, (B, T), generator=g)
    if case["padding"] == "none":
        return ids, None, None, ids.clone()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # at least one full row
    ar = torch.arange(T)[None]
    mask = (ar < lengths[:, None]) if case["padding"] == "right" else (ar >= T - lengths[:, None])
    mask = mask.long()
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if case["padding"] == "left" else None
    return ids, mask, positions, ids.masked_fill(mask == 0, -100)


def forward_backward_deltas(case: dict, attn: str = "sdpa", fused: bool = False) -> list[float]:
    """max |Δ| of logits (non-padded positions; skipped on the fused path, which has none), loss, and
    every parameter's gradient."""
    ours = random_model(case["cfg"], case["seed"], attn, fused)
    ref = hf_copy(ours, attn)
    ids, mask, pos, labels = batch(case)
    a = ours(ids, attention_mask=mask, position_ids=pos, labels=labels)
    b = ref(ids, attention_mask=mask, position_ids=pos, labels=labels)
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    d_logits = 0.0 if fused else (a.logits - b.logits)[keep].abs().max().item()
    d_loss = (a.loss - b.loss).abs().item()
    a.loss.backward()
    b.loss.backward()
    ref_grads = dict(ref.named_parameters())
    d_grad = 0.0
    for name, p in ours.named_parameters():
        g_ref = ref_grads[name].grad
        if p.grad is None or g_ref is None:
            assert p.grad is None and g_ref is None, f"gradient missing on one side for {name}"
            continue
        d_grad = max(d_grad, (p.grad - g_ref).abs().max().item())
    return [d_logits, d_loss, d_grad]


@st.composite
def generation_cases(draw) -> dict:
    case = draw(cases())
    case["T"] = draw(st.integers(2, 8))
    case["padding"] = draw(st.sampled_from(["none", "left"]))  # generation pads on the left
    case["new"] = 32
    return case


def generation_delta(case: dict) -> float:
    """Number of differing tokens between minillm's and transformers' greedy outputs (0 = identical)."""
    ours = random_model(case["cfg"], case["seed"]).eval()
    ref = hf_copy(ours).eval()
    ids, mask, _, _ = batch(case)
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=case["new"])
    b = ref.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                     max_new_tokens=case["new"], do_sample=False, pad_token_id=0)
    if a.shape != b.shape:
        return float(abs(a.shape[1] - b.shape[1]) * a.shape[0] + 1)
    return float((a != b).sum().item())


def checkpoint_deltas(case: dict) -> list[float]:
    """minillm save -> transformers load, and transformers save (sharded) -> minillm load: same logits."""
    ours = random_model(case["cfg"], case["seed"]).eval()
    ids, mask, pos, _ = batch(case)
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad(), tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        expected = ours(ids, attention_mask=mask, position_ids=pos).logits
        ours.save_pretrained(d1)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d1, dtype=torch.float32).eval()
        d_to_hf = (ref(ids, attention_mask=mask, position_ids=pos).logits - expected)[keep].abs().max().item()
        ref.save_pretrained(d2, max_shard_size="20KB")  # several shards + model.safetensors.index.json
        back = CausalLM.from_pretrained(d2).eval()
        d_from_hf = (back(ids, attention_mask=mask, position_ids=pos).logits - expected)[keep].abs().max().item()
    return [d_to_hf, d_from_hf]


def bf16_delta(case: dict) -> float:
    """bf16 logits of minillm vs transformers, both in bf16 (same weights, rounded once)."""
    ours = random_model(case["cfg"], case["seed"]).to(torch.bfloat16)
    ref = hf_copy(ours).to(torch.bfloat16)
    ids, mask, pos, _ = batch(case)
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=pos).logits.float()
        b = ref(ids, attention_mask=mask, position_ids=pos).logits.float()
    return (a - b)[keep].abs().max().item()


def rows(budget: float = 1.0) -> Iterator[Row]:
    n = lambda k: max(1, int(round(k * budget)))
    ref = f"transformers {transformers.__version__}"
    yield from property_rows(
        [("logits fp32 (sdpa)", ref + " sdpa", "logits"), ("loss fp32 (sdpa)", ref, "loss"),
         ("grads of every parameter (sdpa)", ref, "grads")],
        cases(), forward_backward_deltas, n(40))
    yield from property_rows(
        [("logits fp32 (eager)", ref + " eager", "logits"), ("loss fp32 (eager)", ref, "loss"),
         ("grads of every parameter (eager)", ref, "grads")],
        cases(), lambda c: forward_backward_deltas(c, "eager"), n(15))
    yield from property_rows(
        [("loss fp32 (fused training path)", ref, "fused_loss"),
         ("grads of every parameter (fused path)", ref, "fused_grads")],
        cases(), lambda c: forward_backward_deltas(c, fused=True)[1:], n(15))
    yield from property_rows([("greedy generate, 32 tokens (mismatches)", ref + " generate", "generate")],
                             generation_cases(), lambda c: [generation_delta(c)], n(15))
    yield from property_rows(
        [("save -> transformers load (logits)", ref + " from_pretrained", "checkpoint"),
         ("transformers save (sharded) -> load", ref + " save_pretrained", "checkpoint")],
        cases(), checkpoint_deltas, n(6))
    # bf16 on CPU is ~200x slower than fp32 here, so only a few tiny cases; on GPU this would be the norm.
    yield from property_rows([("logits bf16 (tiny configs, CPU)", ref + " bf16", "bf16_logits")],
                             cases(), lambda c: [bf16_delta(c)], n(4))

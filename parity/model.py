"""minillm.CausalLM vs transformers' Llama/Qwen2/Qwen3, on configs drawn by hypothesis.

Each draw builds a random config (family, GQA ratio from MHA to MQA, explicit head_dim, biases, tying,
RoPE scaling type, padding side), fills minillm's model with random weights — biases and norm weights
too, so a missing bias or a wrong norm cannot hide behind zeros and ones — copies them into the
transformers model with a strict key check, and compares logits on non-padded positions, the loss, and
the gradient of every parameter.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import replace

import torch
import transformers
from hypothesis import strategies as st

from minillm import CausalLM, KVCache, ModelConfig
from minillm.config import HIDDEN_ACTS
from parity.harness import Row, property_rows

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()  # one progress line per check, not per shard

def maybe(draw, key: str, values: list) -> dict:
    """{key: value} or {} (key absent): transformers reads absent keys as their defaults."""
    return {} if draw(st.booleans()) else {key: draw(st.sampled_from(values))}


@st.composite
def rope_scalings(draw) -> dict | None:
    """Every rope_scaling key transformers reads (modeling_rope_utils.py), each drawn present or absent."""
    kind = draw(st.sampled_from([None, "linear", "dynamic", "yarn", "llama3"]))
    if kind is None:
        return None
    if kind in ("linear", "dynamic"):
        return {"rope_type": kind, "factor": draw(st.sampled_from([1.5, 2.0, 4.0]))}
    orig = draw(st.sampled_from([4, 8]))
    if kind == "llama3":
        return {"rope_type": kind, "factor": draw(st.sampled_from([4.0, 8.0])), "original_max_position_embeddings": orig,
                "low_freq_factor": draw(st.sampled_from([1.0, 2.0])), "high_freq_factor": draw(st.sampled_from([4.0, 8.0]))}
    # yarn: factor None = derived from max_position_embeddings / original_max_position_embeddings
    rs = {"rope_type": "yarn", "factor": draw(st.sampled_from([None, 2.0, 4.0])), "original_max_position_embeddings": orig}
    for key, values in [("attention_factor", [0.7, 1.3]), ("beta_fast", [8, 32.0]), ("beta_slow", [1, 2.0]),
                        ("mscale", [0.707, 1.0]), ("mscale_all_dim", [0.707, 1.0, 0.0]), ("truncate", [True, False])]:
        rs.update(maybe(draw, key, values))
    return rs


@st.composite
def configs(draw) -> ModelConfig:
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
        rope_scaling=draw(rope_scalings()), rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
        hidden_act=draw(st.sampled_from(["silu", "silu", *HIDDEN_ACTS])),
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
    return [d_logits, d_loss, grad_delta(ours, ref)]


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
    with warnings.catch_warnings():  # drawn configs go past max_position_embeddings on purpose: both sides must agree
        warnings.filterwarnings("ignore", message="prompt \\+ max_new_tokens")
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


# ---- packed rows (DataCollatorWithFlattening), mask forms, attention dropout, dynamic RoPE over calls ------------
@st.composite
def packed_cases(draw) -> dict:
    """Rows packing several documents each: lengths drawn per row (rows share T), seed for weights and ids."""
    cfg = draw(configs())
    B, T = draw(st.integers(1, 2)), draw(st.integers(3, 24))
    rows = []
    for r in range(B):  # row 0: >= 2 documents, the first of >= 2 tokens (so some label is not -100)
        cuts = draw(st.sets(st.integers(2 if r == 0 else 1, T - 1), min_size=1 if r == 0 else 0, max_size=min(4, T - 2)))
        bounds = [0, *sorted(cuts), T]
        rows.append([b - a for a, b in zip(bounds, bounds[1:])])  # document lengths of this row
    if (cfg.rope_scaling or {}).get("rope_type") == "dynamic":
        # dynamic RoPE grows with the longest position *in the call*: a document run alone would see other
        # frequencies once a packed row outgrows max_position_embeddings (transformers too). Keep documents
        # within it here; growth over calls has its own row (dynamic_cases).
        rows = [[m for n in lens for m in [cfg.max_position_embeddings] * (n // cfg.max_position_embeddings)
                 + [n % cfg.max_position_embeddings] if m] for lens in rows]
    return {"cfg": cfg, "docs": rows, "seed": draw(st.integers(0, 2**16))}


def packed_batch(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, position_ids, labels of packed rows, each row made by transformers' DataCollatorWithFlattening
    (positions restart at 0 per document, the first label of each document is -100)."""
    g = torch.Generator().manual_seed(case["seed"])
    collate = transformers.DataCollatorWithFlattening(return_position_ids=True, return_tensors="pt")
    out = [collate([{"input_ids": torch.randint(1, case["cfg"].vocab_size, (n,), generator=g).tolist()} for n in lens])
           for lens in case["docs"]]
    return tuple(torch.cat([o[k] for o in out]) for k in ("input_ids", "position_ids", "labels"))


def packed_deltas(case: dict, attn: str = "sdpa") -> list[float]:
    """Packed rows, no mask, no cache: max |Δ| of logits, loss, grads vs transformers (use_cache=False); the
    relative max |Δ| between packed logits and each document run alone; and, with a KVCache, logits vs
    transformers with its cache (where neither looks for packing)."""
    ours = random_model(case["cfg"], case["seed"], attn)
    ref = hf_copy(ours, attn)
    ids, pos, labels = packed_batch(case)
    a = ours(ids, position_ids=pos, labels=labels)
    b = ref(ids, position_ids=pos, labels=labels, use_cache=False)
    d_logits, d_loss = (a.logits - b.logits).abs().max().item(), (a.loss - b.loss).abs().item()
    a.loss.backward()
    b.loss.backward()
    d_grad = grad_delta(ours, ref)
    with torch.no_grad():
        d_alone = 0.0
        for r, lens in enumerate(case["docs"]):
            start = 0
            for n in lens:
                alone = ours(ids[r:r + 1, start:start + n]).logits[0]
                packed = a.logits[r, start:start + n]
                d_alone = max(d_alone, ((alone - packed).abs().max() / packed.abs().max().clamp(min=1)).item())
                start += n
        cache = KVCache(case["cfg"], ids.shape[0], ids.shape[1], torch.float32, ids.device)
        d_cache = (ours(ids, position_ids=pos, cache=cache).logits - ref(ids, position_ids=pos).logits).abs().max().item()
    return [d_logits, d_loss, d_grad, d_alone, d_cache]


def grad_delta(ours: CausalLM, ref: torch.nn.Module) -> float:
    """max |Δ| over every parameter's gradient (a gradient present on one side only fails the check)."""
    ref_grads = dict(ref.named_parameters())
    d = 0.0
    for name, p in ours.named_parameters():
        g_ref = ref_grads[name].grad
        if p.grad is None or g_ref is None:
            assert p.grad is None and g_ref is None, f"gradient missing on one side for {name}"
            continue
        d = max(d, (p.grad - g_ref).abs().max().item())
    return d


# ---- the incoming gradient: d (k * loss) -------------------------------------------------------------------------
# Training rarely backpropagates the loss itself: fp16 loss scaling multiplies it by 2^16 or so, DeepSpeed divides it
# by the accumulation steps, losses get weighted and summed. A backward that ignores the gradient flowing into the
# loss (the fused loss's d W, say) is invisible to loss.backward(), whose incoming gradient is exactly 1 (issue 25
# item 1). Drawn k: powers of two (exact scalings, as loss scalers use) and others (1/3: a divided loss).
SCALES = [2.0**16, 2.0**-3, 1 / 3, 3.0, 1e-3, 1024.0]


def _scaled(strategy) -> st.SearchStrategy:
    return st.tuples(strategy, st.sampled_from(SCALES)).map(lambda ck: {**ck[0], "k": ck[1]})


def scaled_grad_delta(ours: torch.nn.Module, ref: torch.nn.Module, loss_ours: torch.Tensor, loss_ref: torch.Tensor,
                      k: float, names=lambda n: n) -> float:
    """max |Δ| / k between the gradients of every trainable parameter after backward of k * loss on both sides:
    the same scale as the unscaled rows' gradients, so their tolerances apply. `names` maps the reference's
    parameter names to ours (peft's); a gradient on one side only fails the check."""
    (k * loss_ours).backward()
    (k * loss_ref).backward()
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs = {names(n): p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs), f"other trainable parameters: {sorted(set(mine) ^ set(theirs))}"
    d = 0.0
    for n, g in mine.items():
        assert (g is None) == (theirs[n] is None), f"gradient missing on one side for {n}"
        if g is not None:
            d = max(d, (g - theirs[n]).abs().max().item() / k)
    return d


def scaled_deltas(case: dict, fused: bool) -> list[float]:
    """d (k * loss) / k, model vs transformers, on padded batches: the exact path or the fused training path."""
    ours = random_model(case["cfg"], case["seed"], fused=fused).train()
    ref = hf_copy(ours).train()
    ids, mask, pos, labels = batch(case)
    a = ours(ids, attention_mask=mask, position_ids=pos, labels=labels)
    b = ref(ids, attention_mask=mask, position_ids=pos, labels=labels)
    assert (a.logits is None) == fused, "the fused case did not take the fused path"
    return [scaled_grad_delta(ours, ref, a.loss, b.loss, case["k"])]


def scaled_packed_deltas(case: dict) -> list[float]:
    """The same on packed rows (DataCollatorWithFlattening, no mask) on the fused training path, as packed SFT
    trains."""
    ours = random_model(case["cfg"], case["seed"], fused=True).train()
    ref = hf_copy(ours).train()
    ids, pos, labels = packed_batch(case)
    a, b = ours(ids, position_ids=pos, labels=labels), ref(ids, position_ids=pos, labels=labels, use_cache=False)
    return [scaled_grad_delta(ours, ref, a.loss, b.loss, case["k"])]


def scaled_lora_deltas(case: dict) -> list[float]:
    """The same for LoRA (minillm.peft vs peft, parity/lora.py's drawn cases) on the fused training path: the
    lm_head is frozen there, so only d h flows back through the fused loss."""
    from parity import lora as pl
    ours, ref = pl.lora_pair(case["lora"], case["seed"])
    ours.fused = True
    ours.train(), ref.train()
    x = pl._inputs(case["lora"], case["seed"])
    torch.manual_seed(case["seed"])  # the same dropout masks on both sides
    a = ours(x, labels=x)
    torch.manual_seed(case["seed"])
    b = ref(input_ids=x, labels=x)
    assert a.logits is None, "the LoRA case did not take the fused path"
    return [scaled_grad_delta(ours, ref, a.loss, b.loss, case["k"], pl.peft_to_minillm_name)]


@st.composite
def scaled_lora_cases(draw) -> dict:
    from parity import lora as pl
    return {"lora": draw(pl.cases()), "seed": draw(st.integers(0, 2**16)), "k": draw(st.sampled_from(SCALES))}


@st.composite
def mask_cases(draw) -> dict:
    """A 2-D padding mask or a 4-D mask (bool or additive float; per row or broadcast; per head or shared) with a
    random pattern (every query keeps its own key, so no row is fully masked)."""
    case = draw(cases())
    form = draw(st.sampled_from(["2d", "4d-bool", "4d-float"]))
    attn = "sdpa" if form == "4d-bool" else draw(st.sampled_from(["sdpa", "eager"]))  # eager refuses bool 4-D
    return {**case, "form": form, "attn": attn, "mask_batch": draw(st.sampled_from(["B", 1])),
            "mask_heads": draw(st.sampled_from([1, "H"]))}


def mask_delta(case: dict) -> list[float]:
    """max |Δ| of logits (rows/queries that attend to something real) for one mask form vs transformers."""
    ours = random_model(case["cfg"], case["seed"], case["attn"]).eval()
    ref = hf_copy(ours, case["attn"]).eval()
    ids, mask, pos, _ = batch({**case, "padding": "right" if case["form"] == "2d" else "none"})
    B, T, H = ids.shape[0], ids.shape[1], case["cfg"].num_attention_heads
    keep = torch.ones_like(ids, dtype=torch.bool)
    if case["form"] == "2d":
        mask = torch.ones_like(ids) if mask is None else mask
        keep = mask.bool()
    else:
        g = torch.Generator().manual_seed(case["seed"] + 1)
        shape = (B if case["mask_batch"] == "B" else 1, H if case["mask_heads"] == "H" else 1, T, T)
        allowed = (torch.rand(shape, generator=g) < 0.6) | torch.eye(T, dtype=torch.bool)
        mask = allowed if case["form"] == "4d-bool" else torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask).logits
    return [(a - b)[keep].abs().max().item()]


def dropout_deltas(case: dict) -> list[float]:
    """attention_dropout > 0 in train mode: the same seed before each forward draws the same dropout masks on
    both sides (same calls in the same order), so loss and gradients are equal; in eval mode it is off."""
    cfg = replace(case["cfg"], attention_dropout=0.3)
    attn = "eager" if case["seed"] % 2 else "sdpa"
    ours = random_model(cfg, case["seed"], attn).train()
    ref = hf_copy(ours, attn).train()
    ids, mask, pos, labels = batch(case)
    torch.manual_seed(case["seed"])
    a = ours(ids, attention_mask=mask, position_ids=pos, labels=labels)
    torch.manual_seed(case["seed"])
    b = ref(ids, attention_mask=mask, position_ids=pos, labels=labels)
    d_loss = (a.loss - b.loss).abs().item()
    a.loss.backward()
    b.loss.backward()
    with torch.no_grad():  # dropout is on at all (train != eval), and off in eval mode
        changed = (ours(ids, attention_mask=mask, position_ids=pos, labels=labels).loss - a.loss).abs().item() > 0
        assert changed, "attention_dropout had no effect in train mode"
        d_eval = (ours.eval()(ids, attention_mask=mask, position_ids=pos).logits
                  - ref.eval()(ids, attention_mask=mask, position_ids=pos).logits).abs().max().item()
    return [max(d_loss, d_eval), grad_delta(ours, ref)]


@st.composite
def dynamic_cases(draw) -> dict:
    """Dynamic NTK RoPE over several calls: no-cache calls of drawn lengths (growing past
    max_position_embeddings, shrinking inside the grown range, and below it, which resets), then a cached
    decode that runs past max_position_embeddings token by token."""
    cfg = replace(draw(configs()), rope_scaling={"rope_type": "dynamic", "factor": draw(st.sampled_from([2.0, 4.0]))})
    # drawn lengths, then a fixed tail that grows (20), keeps the grown base (15), resets (5) and grows again (13)
    tail = [20, 15, 5, 13]  # with max_position_embeddings 12 (configs())
    return {"cfg": cfg, "lengths": draw(st.lists(st.integers(2, 30), min_size=1, max_size=4)) + tail,
            "prompt": draw(st.integers(2, 10)), "new": draw(st.integers(4, 16)), "seed": draw(st.integers(0, 2**16))}


def dynamic_delta(case: dict) -> list[float]:
    ours = random_model(case["cfg"], case["seed"]).eval()
    ref = hf_copy(ours).eval()
    total = case["prompt"] + case["new"]
    g = torch.Generator().manual_seed(case["seed"])
    ids = torch.randint(1, case["cfg"].vocab_size, (1, max(30, total)), generator=g)
    d = 0.0
    with torch.no_grad():
        for n in case["lengths"]:
            d = max(d, (ours(ids[:, :n]).logits - ref(ids[:, :n], use_cache=False).logits).abs().max().item())
        cache, past = KVCache(case["cfg"], 1, total, torch.float32, ids.device), transformers.DynamicCache()
        for start, end in [(0, case["prompt"]), *((t, t + 1) for t in range(case["prompt"], total))]:
            pos = torch.arange(start, end)[None]
            a = ours(ids[:, start:end], position_ids=pos, cache=cache).logits
            b = ref(ids[:, start:end], position_ids=pos, cache=past, use_cache=True).logits
            d = max(d, (a - b).abs().max().item())
    return [d]


def rope_delta(cfg: ModelConfig) -> float:
    """RoPE tables straight from the formulas: minillm's `rope_inv_freq` vs the function transformers' rotary
    embedding calls (`ROPE_INIT_FUNCTIONS[rope_type]`, or the default one): max |Δ| over the inverse frequencies
    and the cos/sin scale, at init and, for dynamic, at a grown length. No model is built, so hundreds of draws
    cost a second: rare key combinations (YaRN's mscale with mscale_all_dim) get drawn, which the whole-model rows
    above reach about once in a hundred configs."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from minillm.model import rope_inv_freq
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    kind = (cfg.rope_scaling or {}).get("rope_type", "default")
    init = ROPE_INIT_FUNCTIONS.get(kind)
    if init is None:
        init = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters
    lengths = [None, torch.tensor(3 * cfg.max_position_embeddings)] if kind == "dynamic" else [None]
    worst = 0.0
    for seq_len in lengths:
        ours, our_scale = rope_inv_freq(cfg, seq_len)
        ref, ref_scale = init(hf_cfg, device="cpu", seq_len=seq_len)
        worst = max(worst, (ours.float() - ref.float()).abs().max().item(), abs(float(our_scale) - float(ref_scale)))
    return worst


def rows(budget: float = 1.0) -> Iterator[Row]:
    n = lambda k: max(1, int(round(k * budget)))
    ref = f"transformers {transformers.__version__}"
    yield from property_rows(
        [("logits fp32 (sdpa)", ref + " sdpa", "logits"), ("loss fp32 (sdpa)", ref, "loss"),
         ("grads of every parameter (sdpa)", ref, "grads")],
        cases(), forward_backward_deltas, n(40))
    yield from property_rows([("RoPE tables: every rope_scaling key (no model)", ref + " ROPE_INIT_FUNCTIONS",
                               "logits")], configs(), lambda c: [rope_delta(c)], n(400))
    yield from property_rows(
        [("logits fp32 (eager)", ref + " eager", "logits"), ("loss fp32 (eager)", ref, "loss"),
         ("grads of every parameter (eager)", ref, "grads")],
        cases(), lambda c: forward_backward_deltas(c, "eager"), n(15))
    yield from property_rows(
        [("loss fp32 (fused training path)", ref, "fused_loss"),
         ("grads of every parameter (fused path)", ref, "fused_grads")],
        cases(), lambda c: forward_backward_deltas(c, fused=True)[1:], n(15))
    yield from property_rows([("grads of k * loss, drawn k (exact path)", ref + ", same k", "grads")],
                             _scaled(cases()), lambda c: scaled_deltas(c, fused=False), n(6))
    yield from property_rows([("grads of k * loss, drawn k (fused path)", ref + ", same k", "fused_grads")],
                             _scaled(cases()), lambda c: scaled_deltas(c, fused=True), n(6))
    yield from property_rows([("grads of k * loss, drawn k (packed, fused)", ref + " use_cache=False, same k",
                               "fused_grads")], _scaled(packed_cases()), scaled_packed_deltas, n(4))
    yield from property_rows([("grads of k * loss, drawn k (LoRA, fused)", "peft + " + ref + ", same k",
                               "lora_grads")], scaled_lora_cases(), scaled_lora_deltas, n(4))
    yield from property_rows([("greedy generate, 32 tokens (mismatches)", ref + " generate", "generate")],
                             generation_cases(), lambda c: [generation_delta(c)], n(15))
    yield from property_rows(
        [("save -> transformers load (logits)", ref + " from_pretrained", "checkpoint"),
         ("transformers save (sharded) -> load", ref + " save_pretrained", "checkpoint")],
        cases(), checkpoint_deltas, n(6))
    yield from property_rows(
        [("packed rows: logits (sdpa)", ref + " use_cache=False", "logits"), ("packed rows: loss (sdpa)", ref, "loss"),
         ("packed rows: grads (sdpa)", ref, "grads"),
         ("packed rows = each document alone (rel.)", "minillm, one document per call", "packed_alone"),
         ("packed rows with a KVCache (no packing)", ref + " with its cache", "logits")],
        packed_cases(), packed_deltas, n(8))
    yield from property_rows(
        [("packed rows: logits (eager)", ref + " use_cache=False", "logits"), ("packed rows: loss (eager)", ref, "loss"),
         ("packed rows: grads (eager)", ref, "grads"),
         ("packed rows = each document alone (eager, rel.)", "minillm, one document per call", "packed_alone"),
         ("packed rows with a KVCache (eager)", ref + " with its cache", "logits")],
        packed_cases(), lambda c: packed_deltas(c, "eager"), n(5))
    yield from property_rows([("2-D / 4-D bool / 4-D float masks (logits)", ref + " same mask", "logits")],
                             mask_cases(), mask_delta, n(10))
    yield from property_rows(
        [("attention_dropout: loss, same seed (+eval)", ref + " train mode", "loss"),
         ("attention_dropout: grads, same seed", ref, "grads")], cases(), dropout_deltas, n(3))
    yield from property_rows([("dynamic RoPE over calls + cached decode", ref + " dynamic_rope_update", "logits")],
                             dynamic_cases(), dynamic_delta, n(4))
    # bf16 on CPU is ~200x slower than fp32 here, so only a few tiny cases; on GPU this would be the norm.
    yield from property_rows([("logits bf16 (tiny configs, CPU)", ref + " bf16", "lowp_exact")],
                             cases(), lambda c: [bf16_delta(c)], n(4))

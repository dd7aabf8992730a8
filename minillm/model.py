"""A LLaMA-family decoder (Llama 2/3, Qwen2, Qwen3) written from scratch, equal to transformers' to the bit.

Module and parameter names are transformers' own (`model.layers.0.self_attn.q_proj.weight`, ...), so an HF
checkpoint loads with a strict key check and no renaming table. Where the numerics are delicate (RMSNorm in
fp32, RoPE tables in fp32, the softmax in fp32, which SDPA call is made) we do what transformers 5.x does,
in the same order, so the fp32 logits match exactly rather than "closely"; comments mark those spots.

Shapes: B batch, T new tokens, S = past + T key length, H query heads, K kv heads, D head_dim, C hidden.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minillm.config import ModelConfig
from minillm.generation import KVCache, generate
from minillm.infra.checkpoint import load_pretrained, save_pretrained
from minillm.loss import causal_lm_loss, linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 squares overflow/lose precision), cast back *before* the weight multiply:
        # that order is what transformers does, and it changes bf16 results.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (rotate_half layout: pairs are (i, i + D/2), not Meta's interleaved pairs)
# ---------------------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig, seq_len: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) in fp32 and the cos/sin scale, per `cfg.rope_scaling` (transformers' formulas)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    rs = cfg.rope_scaling or {"rope_type": "default"}
    kind = rs["rope_type"]
    device = None if seq_len is None else seq_len.device
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    if kind == "dynamic":
        # NTK-aware: the base grows once the sequence outgrows max_position_embeddings. Computed with the
        # same tensor dtypes as transformers (seq_len is an int tensor, so `base` becomes fp32).
        max_pos = cfg.max_position_embeddings
        n = max_pos if seq_len is None else torch.maximum(seq_len, torch.tensor(max_pos, dtype=seq_len.dtype,
                                                                                 device=device))
        base = base * ((rs["factor"] * n / max_pos) - (rs["factor"] - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents), 1.0
    inv_freq = 1.0 / (base ** exponents)
    if kind == "default":
        return inv_freq, 1.0
    factor = rs["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old_len = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / rs["low_freq_factor"], old_len / rs["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long waves: interpolate
        smooth = (old_len / wavelen - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(cfg, rs)
    raise ValueError(f"rope type {kind!r} not implemented")


def _yarn_inv_freq(cfg: ModelConfig, rs: dict) -> tuple[torch.Tensor, float]:
    """YaRN: blend interpolated (low-frequency) and extrapolated (high-frequency) dims with a linear ramp."""
    dim, base, factor = cfg.head_dim, cfg.rope_theta, rs.get("factor")
    orig = rs["original_max_position_embeddings"]
    if factor is None:  # as transformers: the ratio of the extended to the pretraining context
        factor = cfg.max_position_embeddings / orig
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        attention_factor = (float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all))
                            if mscale and mscale_all else get_mscale(factor))
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # 1 where the dim keeps its original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.attention_scaling = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        self.dynamic = (cfg.rope_scaling or {}).get("rope_type") == "dynamic"
        self.max_seq_len_cached = self.original_max_seq_len = cfg.max_position_embeddings

    def _dynamic_update(self, position_ids: torch.Tensor) -> None:
        """Dynamic NTK state kept across calls, as transformers' `dynamic_rope_update`: the base grows when a call
        reaches past the longest length seen so far and *stays* grown for later calls (a decode step after a long
        prompt uses the grown frequencies); it resets only when a call is shorter than max_position_embeddings."""
        seq_len = position_ids.max() + 1
        cached = self.max_seq_len_cached
        if seq_len > cached:  # growth
            self.inv_freq = rope_inv_freq(self.cfg, seq_len)[0].to(position_ids.device)
            self.max_seq_len_cached = seq_len
        if seq_len < self.original_max_seq_len and cached > self.original_max_seq_len:  # reset
            self.inv_freq = self.original_inv_freq
            self.max_seq_len_cached = self.original_max_seq_len

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dynamic:
            self._dynamic_update(position_ids)
        # The angle table is built in fp32 even under bf16/autocast: position * freq loses whole turns in
        # bf16 at positions > 256 (transformers PR #29285). Only the final cos/sin are cast down.
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------
def packed_documents(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) position ids -> (B, T) document index of every token, or None when no row holds several documents.

    Packed rows (`DataCollatorWithFlattening`) put several documents in one row with positions restarting at 0
    per document. A document starts wherever the position does not grow by exactly 1 (transformers'
    `find_packed_sequence_indices`, the same rule): [0 1 2 0 1 0] -> [0 0 0 1 1 2].
    """
    starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1  # (B, T)
    docs = starts.cumsum(-1)
    return None if bool((docs[:, -1] == 0).all()) else docs


def build_mask(attention_mask: torch.Tensor | None, docs: torch.Tensor | None, B: int, T: int, past: int,
               dtype: torch.dtype, eager: bool) -> torch.Tensor | None:
    """The attention mask transformers builds (masking_utils.create_causal_mask): None when SDPA's own causal
    flag suffices, else (B, 1, T, S).

    Key s is visible from query t iff s <= past + t, s is not padding (2-D `attention_mask`), and, in a packed
    row (`docs`, see `packed_documents`), s is in t's document. SDPA takes it as bool; the eager path adds
    0 / dtype-min (never -inf: a fully padded row would give NaN). A 4-D mask is the caller's own and is used
    as given (`check_attention_mask` has vetted it).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    S = past + T
    pad = None if attention_mask is None else attention_mask.bool()  # (B, S)
    has_pad = pad is not None and not bool(pad.all())
    if not eager and docs is None and not has_pad and (T == 1 or T == S):
        return None  # SDPA: is_causal=True (T > 1) or nothing to mask (T == 1)
    device = pad.device if pad is not None else (docs.device if docs is not None else None)
    mask = torch.arange(S, device=device)[None, :] <= (torch.arange(T, device=device) + past)[:, None]  # (T, S)
    mask = mask[None, None]  # (1, 1, T, S)
    if docs is not None:  # packed row (no cache, so S == T): attend only within the query's own document
        mask = mask & (docs[:, None, :, None] == docs[:, None, None, :])  # (B, 1, T, T)
    if pad is not None:
        mask = mask & pad[:, None, None, :]
    mask = mask.expand(B, 1, T, S)  # a view: one bool per (row, query, key), shared by every head
    if eager:
        zero = torch.zeros((), device=mask.device, dtype=dtype)
        mask = torch.where(mask, zero, torch.finfo(dtype).min)
    return mask


def check_attention_mask(attention_mask: torch.Tensor, B: int, H: int, T: int, S: int, dtype: torch.dtype,
                         eager: bool) -> None:
    """Refuse, with a sentence, every mask that transformers would misread or crash on.

    Accepted, with transformers' meaning: 2-D (B, S) padding masks of any dtype (nonzero = attend); 4-D
    (B or 1, H or 1, T, S) masks, either bool (True = attend; sdpa only) or additive float in the model's
    dtype (0 = attend, a large negative number = masked), used as given.
    """
    shape = tuple(attention_mask.shape)
    supported = ("supported: a 2-D padding mask (batch, past + new tokens) with 1 = attend, or a 4-D mask "
                 "(batch or 1, heads or 1, new tokens, past + new tokens), bool (True = attend) or additive float "
                 "in the model's dtype")
    if attention_mask.dim() == 2:
        if shape != (B, S):
            raise ValueError(f"attention_mask of shape {shape} for {B} rows of {S} tokens (cache included); {supported}")
        return
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask with {attention_mask.dim()} dims (shape {shape}); {supported}")
    if shape[0] not in (1, B) or shape[1] not in (1, H) or shape[2:] != (T, S):
        raise ValueError(f"4-D attention_mask of shape {shape} does not fit batch {B}, {H} heads, {T} queries, "
                         f"{S} keys; {supported}")
    if attention_mask.dtype == torch.bool:
        if eager:  # transformers' eager attention *adds* the mask: a bool mask would add 1 to attended scores
            raise ValueError("a 4-D bool attention_mask with attn_implementation='eager' is not supported "
                             "(transformers adds it as numbers: True = +1, not a mask); pass an additive float "
                             "mask (0 = attend, torch.finfo(dtype).min = masked) or use sdpa")
    elif attention_mask.dtype != dtype:  # ints would be added as numbers; other floats make SDPA raise
        raise ValueError(f"4-D attention_mask of dtype {attention_mask.dtype} with a {dtype} model; {supported}")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K*n_rep, S, D): query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    B, K, S, D = x.shape
    return x[:, :, None].expand(B, K, n_rep, S, D).reshape(B, K * n_rep, S, D)


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        C, H, K, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.layer_idx, self.n_heads, self.n_kv, self.head_dim, self.n_rep = layer_idx, H, K, D, cfg.n_rep
        self.scaling = D ** -0.5
        # Dropout on the attention probabilities in train mode, as transformers applies `attention_dropout`
        # (F.dropout after the eager softmax, SDPA's dropout_p): the same calls in the same order, so the same
        # seed draws the same masks on both sides.
        self.attention_dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(C, H * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, K * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, K * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's D features of q and k (not v), before RoPE
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, eager: bool, packed: bool = False) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, H, T, D), (B, K, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        if eager:
            # k/v in the memory layout transformers has them in, since matmul rounding depends on it: its
            # DynamicCache (on by default, use_cache=True) hands them over contiguous; packed rows are detected
            # only with use_cache=False, where they stay transposed views of the projections.
            if not packed:
                k, v = k.contiguous(), v.contiguous()
            k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
            att = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # (B, H, T, S)
            if mask is not None:
                att = att + mask
            # softmax in fp32 whatever the activation dtype; cast back before multiplying by v
            att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
            att = F.dropout(att, p=self.attention_dropout if self.training else 0.0, training=self.training)
            y = torch.matmul(att, v)  # (B, H, T, D)
        else:
            y = self._sdpa(q, k, v, mask, T)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.o_proj(y)

    def _sdpa(self, q, k, v, mask, T):
        # The same SDPA call transformers makes (integrations/sdpa_attention.py), so the same CPU kernel runs and
        # fp32 results match bit for bit: GQA natively when there is no mask; with a mask, one decoding query
        # packs its heads per kv head ("pack_gqa"), longer queries repeat the kv heads.
        kw, B, H, D = {}, q.shape[0], q.shape[1], q.shape[3]
        pack_gqa = False
        if self.n_rep > 1:
            if mask is None and self.head_dim <= 256:
                kw["enable_gqa"] = True
            elif T == 1:
                pack_gqa = True
                q = q.reshape(B, H // self.n_rep, self.n_rep, D)  # (B, K, n_rep, D): heads sharing a kv head as queries
                if mask is not None and mask.shape[1] != 1:
                    mask = mask.reshape(mask.shape[0], H // self.n_rep, self.n_rep, mask.shape[-1])
            else:
                k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        is_causal = T > 1 and mask is None
        if is_causal and k.shape[2] > T:
            k, v = k[:, :, :T], v[:, :, :T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, is_causal=is_causal,
                                           dropout_p=self.attention_dropout if self.training else 0.0, **kw)
        return y.reshape(B, H, T, D) if pack_gqa else y


# `hidden_act` names as transformers' ACT2FN spells them, each the same torch call transformers makes
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, I, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, I, bias=b)
        self.up_proj = nn.Linear(C, I, bias=b)
        self.down_proj = nn.Linear(I, C, bias=b)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU with silu


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache=None, eager=False, packed=False):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, eager, packed)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(nn.Module):
    """The trunk, named `model` inside CausalLM as in transformers: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # padding_idx as transformers sets it: the pad row receives no gradient.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class CausalLMOutput(dict):
    """`.loss` / `.logits` as attributes and as keys (the HF Trainer reads `outputs["loss"]`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CausalLM(nn.Module):
    # The HF Trainer reads this to count `num_items_in_batch` over the *shifted* labels, as for its own causal
    # LMs; without it the count includes each row's first label and the loss comes out (T-1)/T too small.
    loss_type = "ForCausalLM"

    def __init__(self, config: ModelConfig, attn_implementation: str = "sdpa", fused: bool = True):
        """fused: the training fast path, taken only in train mode with gradients on and labels given: the loss
        by the fused linear + cross-entropy of minillm/loss.py, which never materialises the logits (`logits`
        is then None). Faster and much smaller; rounding differs by about an ulp (`python -m parity` says how
        much). Inference (eval mode or no_grad) always takes the exact path, op for op transformers';
        fused=False makes training exact too."""
        super().__init__()
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', not {attn_implementation!r}")
        self.config = config
        self.attn_implementation = attn_implementation
        self.fused = fused
        self.gradient_checkpointing = False
        self._ckpt_every, self._ckpt_kwargs = 1, {"use_reentrant": False}
        self.model = Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' init: Linear/Embedding ~ N(0, initializer_range), biases 0, norms 1, pad row 0."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
                if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, num_items_in_batch: int | torch.Tensor | None = None,
                logits_to_keep: int = 0, inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> CausalLMOutput:
        """Logits (B, T, V) and, with `labels`, transformers' causal-LM loss.

        `**kwargs` is accepted on purpose: the HF Trainer passes `num_items_in_batch` (the token count of the
        whole accumulated batch) only to models whose forward takes **kwargs, and without it the loss under
        gradient accumulation differs from transformers'.

        Masks are transformers' (masking_utils): `attention_mask` is a 2-D padding mask or a 4-D mask used as
        given (see `check_attention_mask`). Packed rows: with no `attention_mask` and no `cache` (transformers'
        `use_cache=False`), `position_ids` that restart mark document boundaries and each token attends only
        within its own document (`packed_documents`); with a cache, transformers does not look for packing and
        neither do we.

        `inputs_embeds` (B, T, C) replaces the embedding lookup (prompt tuning prepends trained vectors there).
        `cache` may also be any object with `length` and `update(layer, k, v) -> (k, v)`; one whose
        `recompute_safe` is True (its update does not mutate it, e.g. minillm.peft.prefix.PrefixCache) is passed
        to checkpointed layers too, the others are not (a KVCache would be written twice).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        B, T = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
        device = (input_ids if inputs_embeds is None else inputs_embeds).device
        past = 0 if cache is None else cache.length
        if position_ids is None:  # as transformers: ignores padding; left-padded callers pass cumsum(mask) - 1
            position_ids = torch.arange(past, past + T, device=device)[None]
        elif position_ids.dim() != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != T:
            raise ValueError(f"position_ids of shape {tuple(position_ids.shape)} for input_ids of shape {(B, T)}; "
                             f"expected ({B} or 1, {T})")
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        eager = self.attn_implementation == "eager"
        fuse = self.fused and self.training and torch.is_grad_enabled()
        docs = None
        if attention_mask is not None:
            check_attention_mask(attention_mask, B, self.config.num_attention_heads, T, past + T, h.dtype, eager)
        elif cache is None and T > 1:
            docs = packed_documents(position_ids.expand(B, T))  # (B, T) or None: one document per row
        mask = build_mask(attention_mask, docs, B, T, past, h.dtype, eager)
        cos, sin = self.model.rotary_emb(h, position_ids)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and i % self._ckpt_every == 0:
                # recompute this layer in backward instead of storing its activations
                ckpt_cache = cache if getattr(cache, "recompute_safe", False) else None
                h = checkpoint(layer, h, cos, sin, mask, ckpt_cache, eager, docs is not None, **self._ckpt_kwargs)
            else:
                h = layer(h, cos, sin, mask, cache, eager, docs is not None)
        if cache is not None:
            cache.length += T
        h = self.model.norm(h)
        if labels is not None and fuse and logits_to_keep == 0 and type(self.lm_head) is nn.Linear:
            # training: the loss straight from h, the (B, T, V) logits are never materialised
            return CausalLMOutput(loss=linear_cross_entropy(h, self.lm_head.weight, labels, num_items_in_batch),
                                  logits=None)
        logits = self.lm_head(h[:, -logits_to_keep:])  # (B, T, V); logits_to_keep=0 keeps all
        loss = None if labels is None else causal_lm_loss(logits, labels, num_items_in_batch)
        return CausalLMOutput(loss=loss, logits=logits)

    # -- what the HF Trainer calls for `--gradient_checkpointing` / `--activation_checkpointing` ----------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute every `every_n_layers`-th layer in backward; kwargs go to torch.utils.checkpoint."""
        if offload:
            raise NotImplementedError("activation offload is not implemented in minillm; use offload=False")
        self.gradient_checkpointing = True
        self._ckpt_every = every_n_layers
        self._ckpt_kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        # as transformers: the embedding output requires grad, or re-entrant checkpointing differentiates
        # nothing behind a frozen embedding (LoRA): see enable_input_require_grads below.
        enable_input_require_grads(self)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return True

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count (the Trainer calls this with exclude_embeddings=True for its FLOP estimate)."""
        skip = {id(self.model.embed_tokens.weight), id(self.lm_head.weight)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    # -- checkpoints and generation live in their own files; these are the entry points ------------
    @classmethod
    def from_pretrained(cls, path, dtype: str | torch.dtype | None = None,
                        attn_implementation: str = "sdpa") -> "CausalLM":
        """An HF checkpoint directory (config.json + safetensors). dtype: None = float32, "auto" = as stored."""
        model = load_pretrained(Path(path).expanduser(), lambda cfg: cls(cfg, attn_implementation=attn_implementation),
                                dtype)
        rope = model.model.rotary_emb  # a non-persistent buffer, not in the file: computed on the real device
        rope.inv_freq = rope_inv_freq(model.config)[0]
        rope.original_inv_freq = rope.inv_freq.clone()  # dynamic RoPE resets to it (RotaryEmbedding)
        return model

    def save_pretrained(self, path, **kwargs: Any) -> None:
        save_pretrained(self, path, **kwargs)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs: Any) -> torch.Tensor:
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)


# ---------------------------------------------------------------------------------------------
# Counting parameters and the input-grad hook (for any module: a CausalLM or a PEFT wrapper around one)
# ---------------------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) over model.parameters(), shared tensors counted once (as peft does)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}")


def _make_output_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def enable_input_require_grads(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make the input embedding's output require grad: transformers' `enable_input_require_grads`.

    Re-entrant activation checkpointing (`use_reentrant=True`) differentiates a checkpointed layer only if
    one of its tensor inputs requires grad. With the embedding frozen (LoRA) none does: the loss has no
    grad_fn ("element 0 of tensors does not require grad"), or, with a trainable lm_head, every LoRA
    weight inside the layers silently gets no gradient. transformers installs this hook whenever
    checkpointing is enabled, peft when it wraps a checkpointing model; minillm does both (CausalLM.
    activation_checkpointing_enable and apply_lora). Values are unchanged; backward also computes the
    gradient w.r.t. the embedding output, which nothing uses. Idempotent; returns the hook handle.
    """
    handle = getattr(model, "_require_grads_hook", None)
    if handle is not None:
        return handle
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no input embedding to hook")
    model._require_grads_hook = emb.register_forward_hook(_make_output_require_grad)
    return model._require_grads_hook


def disable_input_require_grads(model: nn.Module) -> None:
    handle = getattr(model, "_require_grads_hook", None)
    if handle is not None:
        handle.remove()
        del model._require_grads_hook

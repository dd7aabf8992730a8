"""Text generation with a KV cache: greedy or sampled, token-identical to transformers' `generate`.

Like transformers, `generate` returns prompt + new tokens; a finished row (it produced eos) is filled
with `pad_token_id` until every row is finished or `max_new_tokens` is reached. Left padding is
supported: positions come from the attention mask (`cumsum - 1`), as in transformers. Sampling applies
transformers' warpers in its order (temperature, top-k, top-p) and draws with `torch.multinomial` once
per step for the whole batch, so with the global RNG (no `generator`) and the same seed it draws what
transformers draws. One difference in defaults: transformers samples with top_k=50 unless told
otherwise; here top_k=None means no top-k filtering.

Decoding for people (`TextStream`) releases text only in whole characters: a byte-level tokenizer can
split one character over several tokens, and a reply must never show half of it as "�".
"""

from __future__ import annotations

import math
import warnings

import torch

from minillm.config import ModelConfig


class KVCache:
    """Keys/values of every layer, preallocated for `max_len` tokens: decoding writes in place."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens stored (all layers); the model advances it after the last layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, K, S, D)

    def grow(self, extra: int) -> None:
        """Add `extra` slots before the first write: generate() sized the cache for the prompt + new tokens, but
        prompt tuning's virtual tokens and prefix tuning's prefix occupy cache slots too."""
        if self.length != 0:
            raise ValueError("KVCache.grow on a cache that already holds tokens")
        L, B, K, S, D = self.k.shape
        self.k = self.k.new_zeros((L, B, K, S + extra, D))
        self.v = self.v.new_zeros((L, B, K, S + extra, D))


def check_generation_args(max_new_tokens: int, do_sample: bool, temperature: float | None, top_k: int | None,
                          top_p: float | None, prefix: str = "") -> None:
    """One-line ValueErrors for arguments transformers would refuse (or that would silently misbehave).

    `prefix` goes before each argument's name ("--" for the command line)."""
    is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
    is_num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"{prefix}max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature is not None:
        if not is_num(temperature) or not math.isfinite(temperature):
            raise ValueError(f"{prefix}temperature must be a finite number, got {temperature!r}")
        if temperature < 0 or (do_sample and temperature == 0):
            # transformers' TemperatureLogitsWarper refuses these when sampling; a negative temperature would
            # sample from the reversed distribution, so it is refused for greedy decoding too
            greedy = "leave out --temperature, --top_k and --top_p" if prefix else "use do_sample=False"
            raise ValueError(f"{prefix}temperature (={temperature}) has to be > 0 for sampling"
                             + (f"; for greedy decoding {greedy}" if temperature == 0 else ""))
    if top_k is not None and (not is_int(top_k) or top_k < 0):
        raise ValueError(f"{prefix}top_k must be an integer >= 0 (0: no top-k filtering), got {top_k!r}")
    if top_p is not None and (not is_num(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"{prefix}top_p must be in (0, 1] (1: no top-p filtering), got {top_p!r}")


def warp_logits(logits: torch.Tensor, temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """transformers' sampling warpers on (B, V) fp32 logits, in generate's order: temperature, top-k, top-p.

    Filtered entries become -inf. Each step is the same tensor op as TemperatureLogitsWarper,
    TopKLogitsWarper and TopPLogitsWarper (min_tokens_to_keep=1), so the kept sets are identical, ties included.
    """
    if temperature is not None and temperature != 1.0:
        logits = logits / temperature
    if top_k:
        # keep every token whose logit is >= the k-th largest (ties with the k-th are kept, as transformers does)
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        # ascending sort: drop the least likely tokens while their cumulative probability stays <= 1 - top_p
        sorted_logits, idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, idx, remove), -float("inf"))
    return logits


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 20, attention_mask: torch.Tensor | None = None,
             do_sample: bool = False, temperature: float | None = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             streamer=None) -> torch.Tensor:
    """Prompt + up to `max_new_tokens` tokens per row, (B, T + n).

    `streamer.put(tokens)` gets each step's (B,) new tokens (unlike transformers, not the prompt), and
    `streamer.end()` is called once at the end.
    """
    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}: "
                         "generation needs at least one prompt token")
    cfg = model.config
    B, T = input_ids.shape
    limit = getattr(cfg, "max_position_embeddings", None)
    # prompt/prefix tuning (PromptTuningLM, PrefixTuningLM): the P virtual tokens take the first P positions
    P = getattr(getattr(model, "peft_config", None), "num_virtual_tokens", 0)
    if limit and P + T + max_new_tokens > limit:
        virtual = f"{P} virtual tokens + " if P else ""
        what = (f"{virtual}the prompt alone ({T} tokens)" if P + T > limit
                else f"{virtual}prompt + max_new_tokens ({T} + {max_new_tokens})")
        warnings.warn(f"{what} is longer than the model's max_position_embeddings ({limit}): positions past "
                      f"{limit} were never trained, expect degraded output", stacklevel=2)
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=input_ids.device,
                       dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if pad is None:
        pad = int(eos[0]) if len(eos) else 0  # transformers' fallback: pad with eos
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # the activations' dtype (the frozen base's), not an adapter's fp32 tensor: on a bf16 model LoRA's
    # lora_embedding_A/B are fp32 and come first in parameters()
    dtype = getattr(model, "base_model", model).model.norm.weight.dtype
    cache = KVCache(cfg, B, T + max_new_tokens, dtype, input_ids.device)
    out, mask = input_ids, attention_mask
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    step_ids = input_ids
    was_training = model.training
    model.eval()
    try:  # the caller's mode comes back even when decoding stops early (Ctrl-C, a streamer that raises)
        for _ in range(max_new_tokens):
            # positions count real tokens only, so left padding does not shift them (transformers does the same)
            position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -step_ids.shape[1]:]
            logits = model(step_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                           logits_to_keep=1).logits[:, -1, :].float()  # (B, V)
            if do_sample:
                probs = warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
                # one draw per row for every row, finished or not: the same RNG use as transformers
                next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                next_tokens = logits.argmax(dim=-1)
            if len(eos):  # transformers pads finished rows only when eos can stop them
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
            out = torch.cat([out, next_tokens[:, None]], dim=-1)
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=-1)
            unfinished &= ~torch.isin(next_tokens, eos)
            if streamer is not None:
                streamer.put(next_tokens)
            if not unfinished.any():
                break
            step_ids = next_tokens[:, None]
        if streamer is not None:
            streamer.end()
    finally:
        model.train(was_training)
    return out


class TextStream:
    """Streams one row's text as it is generated, releasing only whole characters.

    Decodes all tokens so far and releases what is new, minus trailing U+FFFD: a byte-level tokenizer
    spells a character over several tokens, and until its last byte arrives the decoder shows "�".
    At the end, bytes that never formed a character (the model stopped mid-character, or produced an
    invalid byte) are dropped rather than shown as "�".
    """

    def __init__(self, tokenizer, eos: list[int], on_text=None, skip_special_tokens: bool = True):
        self.tok, self.eos, self.on_text, self.skip = tokenizer, set(eos), on_text, skip_special_tokens
        self.ids: list[int] = []
        self.shown = ""  # released text, U+FFFD removed
        self.stable = 0  # characters of the decoded text already accounted for
        self.stopped = False

    def put(self, tokens: torch.Tensor) -> None:
        token = int(tokens.reshape(-1)[0])
        if self.stopped:
            return
        if token in self.eos:
            self.stopped = True
            return
        self.ids.append(token)
        self._release(final=False)

    def end(self) -> None:
        self._release(final=True)

    def _release(self, final: bool) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        ready = text if final else text.rstrip("\ufffd")
        new = ready[self.stable:].replace("\ufffd", "")
        self.stable = max(self.stable, len(ready))
        if new:
            self.shown += new
            if self.on_text is not None:
                self.on_text(new)

    @property
    def text(self) -> str:
        return self.shown

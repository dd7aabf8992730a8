"""Prompt tuning (Lester et al. 2021) by hand, interchangeable with peft 0.21's PROMPT_TUNING.

The model is frozen; P trainable "virtual token" vectors (P, C) are prepended to the input embeddings:

    h0 = [prompt (P, C); embed_tokens(input_ids) (T, C)]   -> the usual decoder over P + T positions

exactly as peft's PeftModelForCausalLM.forward does it: the attention mask gets P leading ones, the labels
P leading -100 (the virtual tokens are never predicted), and the logits come back for all P + T positions.
position_ids are dropped (peft warns "Position ids are not supported" and drops them), so positions are
0 .. P+T-1 whatever the padding; in generation the prompt is fed once, at prefill, and later steps take
positions from the cache length, as transformers does when peft pops them.

Init as peft: nn.Embedding(P, C)'s own N(0, 1) ("RANDOM"); "SAMPLE_VOCAB": rows of the word embedding at
random token ids; "TEXT": rows of the word embedding at the tokenizer ids of a text, cut or repeated to P
(the caller tokenizes: minillm does not import transformers; peft calls `tokenizer(text)["input_ids"]`).
The nn.Embedding is built (and draws its init) first in every case, as peft does, so a seed gives the same
prompt on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from minillm.generation import KVCache
from minillm.peft.base import (VirtualTokensLM, VirtualTokensMethod, check_tensors, check_virtual_tokens_keys,
                               config_of, copy_into, is_positive_int, virtual_tokens_config)

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig:
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    num_virtual_tokens: int = 8
    prompt_tuning_init: str = "RANDOM"  # peft's PromptTuningInit values
    prompt_tuning_init_text: str | None = None  # what the ids came from (saved in adapter_config.json)
    init_token_ids: list[int] | None = field(default=None, repr=False)  # tokenizer(prompt_tuning_init_text) ids
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if not is_positive_int(self.num_virtual_tokens):
            raise ValueError(f"PromptTuningConfig.num_virtual_tokens must be a positive int, "
                             f"got {self.num_virtual_tokens!r}")
        if self.prompt_tuning_init not in INITS:
            raise ValueError(f"PromptTuningConfig.prompt_tuning_init must be one of {INITS}, "
                             f"got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.init_token_ids:
            raise ValueError("PromptTuningConfig: prompt_tuning_init='TEXT' needs init_token_ids (the tokenizer ids "
                             "of prompt_tuning_init_text)")


def text_init_ids(ids: list[int], n: int) -> list[int]:
    """peft's rule: the first n ids, or the ids repeated until there are n."""
    if len(ids) < n:
        ids = ids * math.ceil(n / len(ids))
    return list(ids[:n])


class PromptTuningLM(VirtualTokensLM):
    """A frozen CausalLM behind P trainable input vectors."""

    peft_type = "PROMPT_TUNING"

    def __init__(self, model: nn.Module, config: PromptTuningConfig) -> None:
        super().__init__(model, config)
        emb = model.model.embed_tokens
        emb = getattr(emb, "base_layer", emb)  # a LoRA'd embedding: its frozen table
        P, C = config.num_virtual_tokens, model.config.hidden_size
        self.prompt_encoder = nn.Embedding(P, C)  # draws N(0, 1) first, as peft's PromptEmbedding
        ids = None
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, emb.num_embeddings, (P,), dtype=torch.long)
        elif config.prompt_tuning_init == "TEXT":
            ids = torch.tensor(text_init_ids(config.init_token_ids, P), dtype=torch.long)
        with torch.no_grad():
            if ids is not None:
                self.prompt_encoder.weight.copy_(emb(ids.to(emb.weight.device)).float())
        self.prompt_encoder.to(emb.weight.device)  # fp32 whatever the base dtype (peft casts at use)

    def prompt(self, batch: int) -> torch.Tensor:
        """(B, P, C): peft's get_prompt (an embedding lookup of 0..P-1, so the gradient flows as in peft)."""
        idx = torch.arange(self.peft_config.num_virtual_tokens, device=self.prompt_encoder.weight.device)
        return self.prompt_encoder(idx[None].expand(batch, -1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, **kwargs: Any):
        if self.disabled:
            return self.base_model(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                                   cache=cache, **kwargs)
        B, P = input_ids.shape[0], self.peft_config.num_virtual_tokens
        del position_ids  # as peft: not supported with virtual tokens, positions come from the cache length
        if attention_mask is not None:  # the virtual tokens are always attended
            attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
        if cache is not None and cache.length > 0:  # decode step: the prompt is already in the cache
            return self.base_model(input_ids, attention_mask=attention_mask, cache=cache, **kwargs)
        embeds = self.base_model.model.embed_tokens(input_ids)  # (B, T, C)
        h = torch.cat([self.prompt(B).to(embeds.dtype), embeds], dim=1)  # (B, P + T, C)
        if labels is not None:
            labels = torch.cat([labels.new_full((B, P), -100), labels], dim=1)
        if cache is not None:
            cache.grow(P)
        return self.base_model(inputs_embeds=h, attention_mask=attention_mask, labels=labels, cache=cache, **kwargs)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """peft's adapter_model.safetensors: one tensor, prompt_embeddings (P, C)."""
        return {"prompt_embeddings": self.prompt(1)[0]}


class PromptTuning(VirtualTokensMethod):
    """Prompt tuning behind the one interface of minillm/peft/base.py: a wrapper around the model."""

    peft_type, name, config_class = "PROMPT_TUNING", "prompt", PromptTuningConfig
    title, can_merge = "prompt-tuning adapter", False
    adapter_restores_training = True

    def apply(self, model: nn.Module, config: PromptTuningConfig) -> nn.Module:
        return PromptTuningLM(model, config)

    def config_dict(self, model: PromptTuningLM) -> dict[str, Any]:
        cfg, pc = model.config, model.peft_config
        return virtual_tokens_config(
            "PROMPT_TUNING", model, token_dim=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
            prompt_tuning_init=pc.prompt_tuning_init, prompt_tuning_init_text=pc.prompt_tuning_init_text,
            tokenizer_name_or_path=pc.tokenizer_name_or_path, tokenizer_kwargs=None)

    def config_from_dict(self, d: dict[str, Any], model: nn.Module) -> PromptTuningConfig:
        P = check_virtual_tokens_keys(d, model, token_dim=model.config.hidden_size)
        # the table is loaded as saved: the init it came from does not matter any more
        return PromptTuningConfig(num_virtual_tokens=P,
                                  prompt_tuning_init_text=d.get("prompt_tuning_init_text"),
                                  tokenizer_name_or_path=d.get("tokenizer_name_or_path"))

    def load(self, model: nn.Module, config: PromptTuningConfig, tensors: dict[str, torch.Tensor],
             path: str) -> nn.Module:
        check_tensors({"prompt_embeddings": (config.num_virtual_tokens, model.config.hidden_size)}, tensors, path)
        wrapped = model if config_of(model) is not None else PromptTuningLM(model, config)
        copy_into({"prompt_embeddings": wrapped.prompt_encoder.weight}, tensors)
        return wrapped

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        raise ValueError("prompt tuning has no merge: its virtual tokens are extra inputs, not a change of weights; "
                         "load the adapter with the model instead")


METHOD = PromptTuning()

"""Prefix tuning (Li & Liang 2021) by hand, interchangeable with peft 0.21's PREFIX_TUNING.

The model is frozen; every layer gets P trainable key and value vectors per kv head that every query
attends to, as if P tokens had already been through the layer. peft + transformers do it by handing the
model a KV cache that already holds P entries, and so does minillm:

- the prefix is a table (P, L*2*K*D) (`prefix_projection=False`), or an embedding (P, K*D) through
  Linear(K*D, E) -> tanh -> Linear(E, L*2*K*D) (`prefix_projection=True`, E = encoder_hidden_size);
  viewed as (B, P, 2L, K, D): layer i's keys are slot 2i, its values slot 2i+1 (peft's get_prompt).
  K*D is the kv width (peft sets token_dim = head_dim * num_key_value_heads for GQA models).
- the keys go into the cache as they are: no RoPE (they are not at any position; the cache holds
  post-RoPE keys).
- the model sees a cache of length P: positions of the T new tokens are P .. P+T-1 (transformers'
  cache_position), or the caller's position_ids + P (peft adds P); the 2-D attention mask gets P
  leading ones. With left padding the padded slots are masked, the prefix never is.
- training (no cache): a `PrefixCache` concatenates the prefix in front of each layer's new k/v
  without mutating anything, so autograd reaches the prefix and (non-re-entrant) activation
  checkpointing can recompute layers with it; re-entrant checkpointing is refused with an error. generate(): the prefill step grows generate's KVCache by P slots and
  writes the prefix into it; decoding then proceeds as usual.

Saving as peft does: `prompt_embeddings` is the prefix table (P, L*2*K*D), after the projection when
there is one (peft keeps no MLP in the file; a loaded adapter is the plain table, inference mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from minillm.generation import KVCache
from minillm.peft.base import (VirtualTokensLM, VirtualTokensMethod, check_tensors, check_virtual_tokens_keys,
                               config_of, copy_into, expect_key, is_positive_int, virtual_tokens_config)


@dataclass
class PrefixTuningConfig:
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    num_virtual_tokens: int = 8
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None  # the projection's hidden width; None: the kv width K*D (peft)

    def __post_init__(self) -> None:
        for name in ("num_virtual_tokens", "encoder_hidden_size"):
            v = getattr(self, name)
            if v is not None and not is_positive_int(v):
                raise ValueError(f"PrefixTuningConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"PrefixTuningConfig.prefix_projection must be true or false, "
                             f"got {self.prefix_projection!r}")


class PrefixCache:
    """The prefix as a cache for one training forward: update returns [prefix; new] and stores nothing."""

    recompute_safe = True  # CausalLM may hand it to checkpointed layers (update has no side effect)

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values  # per layer (B, K, P, D)
        self.length = keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)  # (B, K, S, D)


class PrefixTuningLM(VirtualTokensLM):
    """A frozen CausalLM with trainable per-layer key/value prefixes."""

    peft_type = "PREFIX_TUNING"

    def __init__(self, model: nn.Module, config: PrefixTuningConfig, inference_mode: bool = False) -> None:
        """inference_mode: the prefix is a plain table even with prefix_projection (what peft loads)."""
        super().__init__(model, config)
        cfg = model.config
        self.n_layers, self.n_kv, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        P, width = config.num_virtual_tokens, cfg.num_key_value_heads * cfg.head_dim
        out = self.n_layers * 2 * width
        self.project = config.prefix_projection and not inference_mode
        # peft's PrefixEncoder, constructed in its order (the same random draws for the same seed)
        if self.project:
            hidden = config.encoder_hidden_size or width
            self.embedding = nn.Embedding(P, width)
            self.transform = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out))
        else:
            self.embedding = nn.Embedding(P, out)
        self.to(device=next(model.parameters()).device)  # fp32: cast to the model's dtype at use, as peft

    def prefix_table(self) -> torch.Tensor:
        """(P, L*2*K*D): what the encoder makes of the P virtual tokens."""
        idx = torch.arange(self.peft_config.num_virtual_tokens, device=self.embedding.weight.device)
        t = self.embedding(idx)
        return self.transform(t) if self.project else t

    def past_key_values(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer keys and values, each (B, K, P, D), in the model's dtype."""
        P = self.peft_config.num_virtual_tokens
        idx = torch.arange(P, device=self.embedding.weight.device)[None].expand(batch, -1)
        t = self.embedding(idx)  # (B, P, width or out): batched as peft, the same GEMM shapes
        t = self.transform(t) if self.project else t
        dtype = next(self.base_model.parameters()).dtype
        kv = t.to(dtype).view(batch, P, self.n_layers * 2, self.n_kv, self.head_dim).permute(2, 0, 3, 1, 4)
        return list(kv[0::2]), list(kv[1::2])  # (2L, B, K, P, D): even slots keys, odd slots values

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, **kwargs: Any):
        if self.disabled:
            return self.base_model(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                                   cache=cache, **kwargs)
        B, P = input_ids.shape[0], self.peft_config.num_virtual_tokens
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
        if position_ids is not None:  # peft: offset by the prefix length
            position_ids = position_ids + P
        if cache is None:
            m = self.base_model
            if m.gradient_checkpointing and m.training and m._ckpt_kwargs.get("use_reentrant"):
                # re-entrant checkpointing differentiates only its tensor arguments; the prefix rides inside the
                # cache object, so every layer would backpropagate through the shared prefix graph again
                raise NotImplementedError("prefix tuning with re-entrant activation checkpointing: use "
                                          "gradient_checkpointing_kwargs={'use_reentrant': False}")
            cache = PrefixCache(*self.past_key_values(B))
        elif cache.length == 0:  # generate()'s prefill: put the prefix in its cache first
            keys, values = self.past_key_values(B)
            cache.grow(P)
            for i in range(self.n_layers):
                cache.update(i, keys[i], values[i])
            cache.length = P
        return self.base_model(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                               cache=cache, **kwargs)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """peft's adapter_model.safetensors: prompt_embeddings, the (P, L*2*K*D) table after any projection."""
        return {"prompt_embeddings": self.prefix_table()}


class PrefixTuning(VirtualTokensMethod):
    """Prefix tuning behind the one interface of minillm/peft/base.py: a wrapper around the model."""

    peft_type, name, config_class = "PREFIX_TUNING", "prefix", PrefixTuningConfig
    title, can_merge = "prefix-tuning adapter", False
    adapter_restores_training = False  # a projected prefix is saved as its table: the MLP is lost

    def apply(self, model: nn.Module, config: PrefixTuningConfig) -> nn.Module:
        return PrefixTuningLM(model, config)

    def config_dict(self, model: PrefixTuningLM) -> dict[str, Any]:
        cfg, pc = model.config, model.peft_config
        width = cfg.num_key_value_heads * cfg.head_dim  # peft's token_dim for GQA models: the kv width
        return virtual_tokens_config(
            "PREFIX_TUNING", model, token_dim=width, num_attention_heads=cfg.num_key_value_heads,
            encoder_hidden_size=pc.encoder_hidden_size or width, prefix_projection=pc.prefix_projection,
            init_weights=None)

    def config_from_dict(self, d: dict[str, Any], model: nn.Module) -> PrefixTuningConfig:
        cfg = model.config
        P = check_virtual_tokens_keys(d, model, token_dim=cfg.num_key_value_heads * cfg.head_dim)
        expect_key(d, "num_attention_heads", cfg.num_key_value_heads)
        projection = d.get("prefix_projection", False)
        if not isinstance(projection, bool):
            raise ValueError(f"key 'prefix_projection' must be true or false, got {projection!r}")
        return PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection,
                                  encoder_hidden_size=d.get("encoder_hidden_size"))

    def load(self, model: nn.Module, config: PrefixTuningConfig, tensors: dict[str, torch.Tensor],
             path: str) -> nn.Module:
        """A saved prefix is the table after any projection (peft's rule): it loads as a plain table."""
        cfg = model.config
        width = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
        check_tensors({"prompt_embeddings": (config.num_virtual_tokens, width)}, tensors, path)
        wrapped = model if config_of(model) is not None else PrefixTuningLM(model, config, inference_mode=True)
        copy_into({"prompt_embeddings": wrapped.embedding.weight}, tensors)
        return wrapped

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        raise ValueError("prefix tuning has no merge: its prefix is extra keys and values every layer attends to, "
                         "not a change of weights; load the adapter with the model instead")


METHOD = PrefixTuning()

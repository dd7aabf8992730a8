"""Adapter tuning (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"), the chapter's §3.3.1.

Each decoder layer gets two small bottleneck modules, one after the attention block's output projection
and one after the MLP's, both *before* the residual addition (the paper's Figure 2):

    adapter(y) = y + W_up f(W_down y + b_down) + b_up      W_down (m, d), W_up (d, m), m << d

so a layer computes h = h + adapter(o_proj(attn)) and h = h + adapter(down_proj(mlp)). The model stays
frozen; only the adapters are trained (the paper also trains the layer norms: `train_norms=True`).
With W_up = 0 (init="zero", the default) the adapter is the identity and the model's outputs are unchanged
at step 0, as LoRA's B = 0; init="houlsby" is the paper's near-identity init (both projections
~ N(0, 1e-2) truncated at 2 std, biases 0).

Implemented by wrapping `self_attn.o_proj` and `mlp.down_proj` (`AdaptedLinear`), so no model code changes.
peft 0.21 has no such method (and the AdapterHub `adapters` package pins transformers 4.x): the file
format below is minillm's own, in peft's layout so the same tools read it, with
peft_type "MINILLM_HOULSBY_ADAPTER" -- NOT loadable by peft. parity/peft_methods.py checks the
equations written out independently, and the zero-init identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minillm.model import trainable_summary

PEFT_TYPE = "MINILLM_HOULSBY_ADAPTER"  # not a peft type: minillm's own adapter_config.json
ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
PLACES = ("self_attn.o_proj", "mlp.down_proj")  # after attention, after the MLP (Houlsby's Figure 2)


@dataclass
class HoulsbyConfig:
    bottleneck: int = 16  # m
    non_linearity: str = "gelu"
    init: str = "zero"  # "zero": W_up = 0 (exact identity); "houlsby": N(0, 1e-2) truncated, near-identity
    train_norms: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ValueError(f"HoulsbyConfig.bottleneck must be a positive int, got {self.bottleneck!r}")
        if self.non_linearity not in ACTS:
            raise ValueError(f"HoulsbyConfig.non_linearity must be one of {sorted(ACTS)}, got {self.non_linearity!r}")
        if self.init not in ("zero", "houlsby"):
            raise ValueError(f"HoulsbyConfig.init must be 'zero' or 'houlsby', got {self.init!r}")
        if not isinstance(self.train_norms, bool):
            raise ValueError(f"HoulsbyConfig.train_norms must be true or false, got {self.train_norms!r}")


class HoulsbyAdapter(nn.Module):
    def __init__(self, d: int, config: HoulsbyConfig) -> None:
        super().__init__()
        if config.bottleneck >= d:  # the point is m < d (the chapter: "m 会小于 d")
            raise ValueError(f"adapter bottleneck m={config.bottleneck} must be smaller than the hidden size d={d}")
        self.down = nn.Linear(d, config.bottleneck)
        self.up = nn.Linear(config.bottleneck, d)
        self.act = ACTS[config.non_linearity]
        with torch.no_grad():
            if config.init == "zero":
                nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)
            else:
                for lin in (self.down, self.up):
                    nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)
                    nn.init.zeros_(lin.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(self.act(self.down(y)))  # the adapter's own skip connection


class AdaptedLinear(nn.Module):
    """A frozen Linear whose output goes through a HoulsbyAdapter."""

    def __init__(self, base_layer: nn.Linear, config: HoulsbyConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        # fp32 adapters next to a bf16/fp16 base, as LoRA's
        self.adapter = HoulsbyAdapter(base_layer.out_features, config).to(
            device=w.device, dtype=torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return self.adapter(y.to(self.adapter.down.weight.dtype)).to(y.dtype)


def apply_adapters(model: nn.Module, config: HoulsbyConfig, verbose: bool = True) -> nn.Module:
    """Freeze `model` and put a Houlsby adapter after every layer's attention and MLP, in place."""
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has adapters; apply_adapters once per model")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        for place in PLACES:
            parent_name, child = place.split(".")
            parent = getattr(layer, parent_name)
            setattr(parent, child, AdaptedLinear(getattr(parent, child), config))
        if config.train_norms:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.requires_grad_(True)
    if config.train_norms:
        model.model.norm.weight.requires_grad_(True)
    model.adapter_config = config
    if verbose:
        print(trainable_summary(model))
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors by their model names, prefixed with peft's `base_model.model.`."""
    return {f"base_model.model.{n}": p for n, p in model.named_parameters() if p.requires_grad}


def config_dict(config: HoulsbyConfig) -> dict[str, Any]:
    return {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "bottleneck": config.bottleneck,
            "non_linearity": config.non_linearity, "init": config.init, "train_norms": config.train_norms,
            "placement": list(PLACES),
            "note": "minillm's Houlsby adapter (minillm/peft/houlsby.py); not a peft format, peft cannot load it"}

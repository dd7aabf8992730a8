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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from minillm.model import trainable_summary
from minillm.peft.base import PEFT_PREFIX, check_tensors, config_of, copy_into, freeze, is_positive_int

PEFT_TYPE = "MINILLM_HOULSBY_ADAPTER"  # not a peft type: minillm's own adapter_config.json
ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
PLACES = ("self_attn.o_proj", "mlp.down_proj")  # after attention, after the MLP (Houlsby's Figure 2)


@dataclass
class HoulsbyConfig:
    peft_type: ClassVar[str] = PEFT_TYPE
    bottleneck: int = 16  # m
    non_linearity: str = "gelu"
    init: str = "zero"  # "zero": W_up = 0 (exact identity); "houlsby": N(0, 1e-2) truncated, near-identity
    train_norms: bool = False

    def __post_init__(self) -> None:
        if not is_positive_int(self.bottleneck):
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

        self.disabled = False  # switched off (Houlsby.set_enabled): the base layer's output exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        return self.adapter(y.to(self.adapter.down.weight.dtype)).to(y.dtype)


def apply_adapters(model: nn.Module, config: HoulsbyConfig, verbose: bool = True) -> nn.Module:
    """Freeze `model` and put a Houlsby adapter after every layer's attention and MLP, in place."""
    if config_of(model) is not None:
        raise ValueError(f"{type(model).__name__} already has adapters; apply_adapters once per model")
    freeze(model)
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
    model.peft_config = config
    if verbose:
        print(trainable_summary(model))
    return model


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


class Houlsby:
    """Houlsby adapters behind the one interface of minillm/peft/base.py (a file format of minillm's own)."""

    peft_type, name, config_class = PEFT_TYPE, "adapter", HoulsbyConfig
    title, can_merge = "Houlsby adapter", False
    adapter_restores_training = True

    def apply(self, model: nn.Module, config: HoulsbyConfig) -> nn.Module:
        return apply_adapters(model, config, verbose=False)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapters (and, with train_norms, the norms) by their model names, prefixed as peft does."""
        params = {f"{n}.adapter.{k}": p for n, m in adapted_layers(model).items()
                  for k, p in m.adapter.named_parameters()}
        if model.peft_config.train_norms:
            params.update({n: p for n, p in model.named_parameters()  # the norms apply_adapters unfroze
                           if n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight"))
                           or n == "model.norm.weight"})
        return {PEFT_PREFIX + n: p for n, p in params.items()}

    def config_dict(self, model: nn.Module) -> dict[str, Any]:
        c: HoulsbyConfig = model.peft_config
        return {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "bottleneck": c.bottleneck,
                "non_linearity": c.non_linearity, "init": c.init, "train_norms": c.train_norms,
                "placement": list(PLACES),
                "note": "minillm's Houlsby adapter (minillm/peft/houlsby.py); not a peft format, peft cannot load it"}

    def config_from_dict(self, d: dict[str, Any], model: nn.Module) -> HoulsbyConfig:
        return HoulsbyConfig(bottleneck=d.get("bottleneck"), non_linearity=d.get("non_linearity"),
                             init=d.get("init", "zero"), train_norms=d.get("train_norms", False))

    def load(self, model: nn.Module, config: HoulsbyConfig, tensors: dict[str, torch.Tensor], path: str) -> nn.Module:
        if config_of(model) is None:
            d = model.config.hidden_size  # the file's shapes are (m, d) and (d, m): check before allocating
            for key, value in tensors.items():
                if key.endswith("down.weight") and tuple(value.shape) != (config.bottleneck, d):
                    raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, this model needs "
                                     f"{(config.bottleneck, d)}")
            apply_adapters(model, config, verbose=False)
        expected = self.state_dict(model)
        check_tensors(expected, tensors, path)
        copy_into(expected, tensors)
        return model

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        if model.peft_config.train_norms:
            raise ValueError("Houlsby adapters with train_norms cannot be switched off: the norms are trained in "
                             "place and no original copy is kept")
        for layer in adapted_layers(model).values():
            layer.disabled = not enabled

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        raise ValueError("Houlsby adapters have no merge: the adapter is a non-linear bottleneck, not a change of "
                         "weights; load the adapter with the model instead")


METHOD = Houlsby()

"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"), interchangeable with peft 0.21's IA3.

The model is frozen; a few chosen Linear layers get one learned vector l each, initialised to ones:

    attention targets (k_proj, v_proj):   y = (W x + b) * l_out      l (out, 1)   scales the output
    feed-forward targets (down_proj):     y = W (x * l_in) + b       l (1, in)    scales the input

so the keys, the values and the MLP's inner activations are rescaled ("Infused Adapter by Inhibiting and
Amplifying Inner Activations"). That is all: r * d parameters for LoRA become d here. Because l multiplies a
weight's rows or columns, merging is exact: W' = W * l (and b' = b * l for an output scaling).

As peft: `target_modules` and `feedforward_modules` default to peft's table for the model type (llama: k_proj,
v_proj, down_proj; qwen2/qwen3: q_proj, v_proj, down_proj; down_proj the feed-forward one); a list entry names a
target by its last dotted parts, a feed-forward entry by any suffix; `init_ia3_weights=False` keeps the
torch.randn draw that peft makes first for every vector (the same draws in the same order, so the same seed gives
peft's vectors). Vectors live in fp32 next to a bf16/fp16 base (peft's autocast_adapter_dtype). Unmerging divides
by l + 1e-8 as peft does, so it is close to, not exactly, the original weight.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from minillm.peft.base import PEFT_PREFIX, check_tensors, config_of, copy_into, freeze, is_target

# peft 0.21's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING
DEFAULT_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
                   "qwen3": ["q_proj", "v_proj", "down_proj"]}
DEFAULT_FEEDFORWARD = ["down_proj"]


def _names(v: Any) -> bool:
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


@dataclass
class IA3Config:
    peft_type: ClassVar[str] = "IA3"
    target_modules: list[str] | str | None = None  # None: peft's default for the model type
    feedforward_modules: list[str] | str | None = None  # which targets scale their input; None: down_proj
    init_ia3_weights: bool = True  # False: keep peft's random draw (for tests)

    def __post_init__(self) -> None:
        for key in ("target_modules", "feedforward_modules"):
            v = getattr(self, key)
            if isinstance(v, (set, tuple)):
                setattr(self, key, v := sorted(v))
            if not _names(v):
                raise ValueError(f"IA3Config.{key} must be a regex string or a list of module names, got {v!r}")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"IA3Config.init_ia3_weights must be true or false, got {self.init_ia3_weights!r}")
        t, f = self.target_modules, self.feedforward_modules
        if isinstance(t, list) and isinstance(f, list) and not set(f) <= set(t):  # peft's own check
            raise ValueError(f"IA3Config.feedforward_modules {f} must be a subset of target_modules {t}")

    def resolved(self, model_type: str) -> "IA3Config":
        """The config with peft's defaults for `model_type` filled in (what peft saves). Not re-validated: as in
        peft, the subset check applies to the lists a user gives, so target_modules=["k_proj", "v_proj"] with
        the default feedforward_modules (down_proj, then not a target) is valid."""
        c = copy.copy(self)
        if c.target_modules is None:
            c.target_modules = list(DEFAULT_TARGETS[model_type])
        if c.feedforward_modules is None:
            c.feedforward_modules = list(DEFAULT_FEEDFORWARD)
        return c


class IA3Linear(nn.Module):
    """A frozen nn.Linear whose output (or, feed-forward, input) is scaled by a learned vector: peft's ia3.Linear."""

    def __init__(self, base_layer: nn.Linear, is_feedforward: bool, init_ones: bool) -> None:
        super().__init__()
        self.base_layer, self.is_feedforward = base_layer, is_feedforward
        shape = (1, base_layer.in_features) if is_feedforward else (base_layer.out_features, 1)
        w = base_layer.weight
        self.ia3_l = nn.Parameter(torch.randn(shape))  # drawn even when set to ones: peft's RNG use
        if init_ones:
            nn.init.constant_(self.ia3_l, 1.0)
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.ia3_l.data = self.ia3_l.data.to(device=w.device, dtype=dtype)
        self.merged = self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        l = self.ia3_l.flatten()  # noqa: E741
        if self.is_feedforward:  # scale the input, computed in l's dtype, then back to x's (peft's order)
            return self.base_layer((x.to(l.dtype) * l).to(x.dtype))
        y = self.base_layer(x)
        return (y * l).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        base = self.base_layer
        base.weight.data = torch.mul(base.weight.data, self.ia3_l.data).to(base.weight.dtype)  # rows or columns
        if not self.is_feedforward and base.bias is not None:
            base.bias.data = torch.mul(base.bias.data, self.ia3_l.data.reshape(base.bias.shape)).to(base.bias.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.base_layer
        base.weight.data = torch.div(base.weight.data, self.ia3_l.data + 1e-8).to(base.weight.dtype)  # as peft
        if not self.is_feedforward and base.bias is not None:
            scale = self.ia3_l.data.reshape(base.bias.shape) + 1e-8
            base.bias.data = torch.div(base.bias.data, scale).to(base.bias.dtype)
        self.merged = False


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def _is_feedforward(name: str, feedforward_modules: list[str] | str) -> bool:
    if isinstance(feedforward_modules, str):  # peft: a regex over the full name, else a plain suffix
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(f) for f in feedforward_modules)


def _plan(model: nn.Module, config: IA3Config) -> dict[str, bool]:
    """{target module name: is feed-forward} for a resolved config, in named_modules() order (peft's)."""
    names = [n for n, m in model.named_modules() if n and is_target(n, config.target_modules)]
    if not names or any(not isinstance(model.get_submodule(n), nn.Linear) for n in names):
        raise ValueError(f"IA3 target_modules={config.target_modules!r} must match nn.Linear modules of "
                         f"{type(model).__name__}; matched {names[:6]}")
    return {n: _is_feedforward(n, config.feedforward_modules) for n in names}


def _shapes(model: nn.Module, config: IA3Config) -> dict[str, tuple[int, int]]:
    """The vectors applying `config` would make, under peft's keys, with their shapes: nothing allocated."""
    plan = _plan(model, config.resolved(model.config.model_type))
    lin = {n: model.get_submodule(n) for n in plan}
    return {f"{PEFT_PREFIX}{n}.ia3_l": (1, lin[n].in_features) if ff else (lin[n].out_features, 1)
            for n, ff in plan.items()}


def apply_ia3(model: nn.Module, config: IA3Config) -> nn.Module:
    """Freeze `model` and wrap every targeted nn.Linear in IA3Linear, in named_modules() order (peft's)."""
    if config_of(model) is not None:
        raise ValueError(f"{type(model).__name__} already has a fine-tuning method applied")
    config = config.resolved(model.config.model_type)
    plan = _plan(model, config)
    freeze(model)
    for name, is_feedforward in plan.items():
        parent, _, child = name.rpartition(".")
        layer = IA3Linear(model.get_submodule(name), is_feedforward, config.init_ia3_weights)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    model.peft_config = config
    return model


class IA3:
    """(IA)^3 behind the one interface of minillm/peft/base.py."""

    peft_type, name, config_class = "IA3", "ia3", IA3Config
    title, can_merge = "(IA)^3 adapter", True
    adapter_restores_training = True

    def apply(self, model: nn.Module, config: IA3Config) -> nn.Module:
        return apply_ia3(model, config)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{PEFT_PREFIX}{n}.ia3_l": layer.ia3_l for n, layer in ia3_layers(model).items()}

    def config_dict(self, model: nn.Module) -> dict[str, Any]:
        c: IA3Config = model.peft_config
        return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "revision": None, "inference_mode": True,
                "auto_mapping": None, "target_modules": c.target_modules, "exclude_modules": None,
                "feedforward_modules": c.feedforward_modules, "fan_in_fan_out": False, "modules_to_save": None,
                "init_ia3_weights": c.init_ia3_weights}

    def config_from_dict(self, d: dict[str, Any], model: nn.Module) -> IA3Config:
        for key, default in (("fan_in_fan_out", False), ("modules_to_save", None), ("exclude_modules", None)):
            if d.get(key, default) not in (default, None):
                raise ValueError(f"key {key!r}={d[key]!r} is not supported by minillm.peft.ia3 (only {default!r})")
        t, f = d.get("target_modules"), d.get("feedforward_modules")
        if isinstance(t, list) and _names(t) and f == DEFAULT_FEEDFORWARD and not set(f) <= set(t):
            f = None  # the default filled in by save (peft writes these too, and cannot read them back): the same
        return IA3Config(t, f, d.get("init_ia3_weights", True))

    def load(self, model: nn.Module, config: IA3Config, tensors: dict[str, torch.Tensor], path: str) -> nn.Module:
        if config_of(model) is None:  # the file is checked before the model is touched
            check_tensors(_shapes(model, config), tensors, path)
            apply_ia3(model, config)
        expected = self.state_dict(model)
        check_tensors(expected, tensors, path)
        copy_into(expected, tensors)
        return model

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        for layer in ia3_layers(model).values():
            if layer.merged:
                raise ValueError("a merged (IA)^3 model cannot be switched off: unmerge it first")
            layer.disabled = not enabled

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        for name, layer in ia3_layers(model).items():
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
        model.__dict__.pop("peft_config", None)
        return model


METHOD = IA3()

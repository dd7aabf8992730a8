"""The one interface every fine-tuning method implements, and peft's file layout they share.

A method (LoRA, prompt tuning, prefix tuning, Houlsby adapters, (IA)^3) is an object with the attributes and
functions of `PeftMethod` below; `minillm/peft/methods.py` keeps the table of them, keyed on peft's
`peft_type`, and is the only place that picks a method: saving, loading, switching off, merging, the training
scripts and the chat all go through it. Whether a method changes layers in place (LoRA, Houlsby, (IA)^3) or
wraps the model (prompt and prefix tuning feed the model extra inputs) is the method's business: `apply` returns
the model to use from then on, and that model carries the method's config as `model.peft_config`.

An adapter directory is what peft's `save_pretrained` writes:

    adapter_config.json        {"peft_type": ..., the method's settings, "base_model_name_or_path": ...}
    adapter_model.safetensors  the trained tensors, keyed `base_model.model.<module name>.<tensor>` (prompt and
                               prefix tuning: one `prompt_embeddings` table)
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from minillm.generation import generate

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's PeftModelForCausalLM -> its tuner -> the base model


class PeftMethod(Protocol):
    peft_type: ClassVar[str]  # adapter_config.json's "peft_type": the key of the table in methods.py
    name: ClassVar[str]  # finetune.py's --peft value
    config_class: ClassVar[type]  # the method's settings; its __post_init__ validates every value
    title: ClassVar[str]  # what a sentence calls an adapter of this type ("LoRA adapter")
    can_merge: ClassVar[bool]  # whether merge_and_unload folds it into the weights (LoRA, (IA)^3)
    # whether loading the saved adapter into the applied method restores every trainable tensor, so that a resume
    # needs nothing else (not prefix tuning: a projected prefix is saved as its output table, the MLP is lost)
    adapter_restores_training: ClassVar[bool]

    def apply(self, model: nn.Module, config: Any) -> nn.Module:
        """Freeze `model` (a CausalLM) and add the method's new, trainable parameters; the model to use from now
        on (the same object, or a wrapper around it), with `peft_config` set."""

    def config_dict(self, model: nn.Module) -> dict[str, Any]:
        """What adapter_config.json holds for `model` (all but base_model_name_or_path), as peft writes it."""

    def config_from_dict(self, d: dict[str, Any], model: nn.Module) -> Any:
        """The config an adapter_config.json describes, every key checked; ValueError naming the key."""

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors adapter_model.safetensors holds, under peft's keys (the live parameters where they are
        parameters, so that a caller can gather them under ZeRO-3)."""

    def load(self, model: nn.Module, config: Any, tensors: dict[str, torch.Tensor], path: str) -> nn.Module:
        """Apply the method (unless `model` has it already) and copy a file's tensors in; every name and shape
        is checked against `config` before anything is allocated. Returns the model to use."""

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        """Switch the method off (the base model's outputs exactly) and on again, removing nothing: what a
        preference-training reference model and peft's `disable_adapter()` need."""

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        """Fold the method into the base weights and return the plain model; a ValueError for a method that
        has no merge (its effect is not a weight change)."""


def config_of(model: nn.Module) -> Any:
    """The config of the method applied to `model`, or None for a plain model."""
    return getattr(model, "peft_config", None)


def is_target(name: str, target_modules: list[str] | str) -> bool:
    """peft's rule for target_modules: a string is a regex the full module name must match; a list names modules
    by their full name or its last dotted parts."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def is_positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0  # JSON true arrives as bool, an int


def expect_key(d: dict[str, Any], key: str, want: Any) -> None:
    """A saved setting that must equal this model's: an error naming the key otherwise."""
    if d.get(key) != want:
        raise ValueError(f"key {key!r} is {d.get(key)!r}, this model needs {want!r}")


def check_tensors(expected: dict[str, torch.Tensor | tuple[int, ...]], tensors: dict[str, torch.Tensor],
                  path: str, optional: tuple[str, ...] = ()) -> None:
    """A file's tensors against what the model needs: the same names (keys ending in `optional` may be absent),
    the same shapes, floating point and finite. Checked before anything is copied or allocated."""
    missing = sorted(k for k in set(expected) - set(tensors) if not (optional and k.endswith(optional)))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter tensors do not match the model: {len(missing)} missing {missing[:4]}, "
                         f"{len(unexpected)} unexpected {unexpected[:4]}")
    for key, value in tensors.items():
        want = expected[key]
        shape = tuple(want.shape) if isinstance(want, torch.Tensor) else tuple(want)
        if tuple(value.shape) != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, this model needs {shape}")
        if not value.is_floating_point():
            raise ValueError(f"{path}: {key} is {str(value.dtype).removeprefix('torch.')}, adapter tensors must be "
                             "floating point")
        if not torch.isfinite(value).all():
            raise ValueError(f"{path}: {key} holds NaN or infinite values")


def copy_into(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked tensors into the live parameters of the same names (present ones only)."""
    with torch.no_grad():
        for key, param in params.items():
            if key in tensors:
                param.copy_(tensors[key].to(param.dtype))


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


# ---- what prompt and prefix tuning share: a wrapper around the frozen model, and the same file settings ----------

class VirtualTokensLM(nn.Module):
    """A frozen CausalLM behind P virtual tokens (prompt tuning: input vectors; prefix tuning: keys and values).
    `forward` and `generate` take what CausalLM's do; switched off, it is the base model exactly."""

    loss_type = "ForCausalLM"  # the HF Trainer counts shifted labels for num_items_in_batch

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__()
        self.base_model, self.peft_config = model, config
        self.disabled = False  # set_enabled(False): the base model alone, as peft's disable_adapter
        freeze(model)

    @property
    def config(self):
        return self.base_model.config

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs: Any) -> torch.Tensor:
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    # pass-throughs the HF Trainer calls
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kw: Any) -> None:
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs, **kw)

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing_disable()


class VirtualTokensMethod:
    """What the two wrapper methods (prompt and prefix tuning) implement alike: the file's tensors are the wrapper's
    own `adapter_state_dict`, and switching off is the wrapper's flag."""

    def state_dict(self, model: VirtualTokensLM) -> dict[str, torch.Tensor]:
        return model.adapter_state_dict()

    def set_enabled(self, model: VirtualTokensLM, enabled: bool) -> None:
        model.disabled = not enabled


def virtual_tokens_config(peft_type: str, model: nn.Module, **method_keys: Any) -> dict[str, Any]:
    """adapter_config.json of prompt and prefix tuning: peft's shared keys, then the method's own."""
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "revision": None, "inference_mode": True,
            "auto_mapping": None, "modules_to_save": None, "num_virtual_tokens": model.peft_config.num_virtual_tokens,
            "num_layers": model.config.num_hidden_layers, "num_transformer_submodules": 1, **method_keys}


def check_virtual_tokens_keys(d: dict[str, Any], model: nn.Module, token_dim: int) -> int:
    """The shared keys of a saved prompt/prefix config, checked against this model; returns P."""
    if not is_positive_int(d.get("num_virtual_tokens")):
        raise ValueError(f"key 'num_virtual_tokens' must be a positive integer, got {d.get('num_virtual_tokens')!r}")
    expect_key(d, "num_transformer_submodules", 1)
    expect_key(d, "num_layers", model.config.num_hidden_layers)
    expect_key(d, "token_dim", token_dim)
    return d["num_virtual_tokens"]

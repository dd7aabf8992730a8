"""The table of fine-tuning methods, keyed on peft's `peft_type`, and everything that works on any of them.

    LORA                     LoRA, rsLoRA, DoRA; LoRA on embeddings        minillm/peft/lora.py
    PROMPT_TUNING            P trainable input vectors                     minillm/peft/prompt.py
    PREFIX_TUNING            P trainable keys/values per layer             minillm/peft/prefix.py
    IA3                      learned vectors scaling k, v, the MLP input   minillm/peft/ia3.py
    MINILLM_HOULSBY_ADAPTER  bottleneck adapters (minillm's own format)    minillm/peft/houlsby.py

Each is one object implementing `PeftMethod` (minillm/peft/base.py). A model with a method applied carries its
config as `model.peft_config`, whose `peft_type` finds the method here: nothing else in minillm, train/ or parity/
asks which class a model is. The first four save and load exactly what peft 0.21 writes and reads
(`PeftModel.from_pretrained` loads what `save_adapter` writes, and the other way round).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from minillm.infra.checkpoint import read_safetensors_file
from minillm.infra.files import checked_file, read_json_object, staged_dir
from minillm.model import trainable_summary
from minillm.peft import houlsby, ia3, lora, prefix, prompt
from minillm.peft.base import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_PREFIX, PeftMethod, config_of

METHODS: dict[str, PeftMethod] = {m.peft_type: m for m in (
    lora.METHOD, prompt.METHOD, prefix.METHOD, ia3.METHOD, houlsby.METHOD)}
BY_NAME: dict[str, PeftMethod] = {m.name: m for m in METHODS.values()}  # finetune.py's --peft values


def method_of(model: nn.Module) -> PeftMethod | None:
    """The method applied to `model`, None for a plain model (or one of peft's, whose peft_config is a dict)."""
    return METHODS.get(getattr(config_of(model), "peft_type", None))


def _applied(model: nn.Module) -> PeftMethod:
    method = method_of(model)
    if method is None:
        raise ValueError(f"{type(model).__name__} has no fine-tuning method applied (see minillm.peft.apply)")
    return method


def apply(model: nn.Module, config: Any, verbose: bool = False) -> nn.Module:
    """Add the method `config` describes to `model`; always use the returned model (it may be a wrapper)."""
    model = METHODS[config.peft_type].apply(model, config)
    if verbose:
        print(trainable_summary(model))
    return model


def print_trainable_parameters(model: nn.Module) -> None:
    """peft's line: `trainable params: X || all params: Y || trainable%: Z` (parity compares it)."""
    print(trainable_summary(model))


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `model` computes what its base model computes (peft's `disable_adapter()`): the
    reference model of preference training, without a second copy of the weights."""
    method = _applied(model)
    method.set_enabled(model, False)
    try:
        yield model
    finally:
        method.set_enabled(model, True)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """The plain model with the method folded into its weights (LoRA, (IA)^3); a ValueError for methods that
    have no merge (prompt, prefix, Houlsby)."""
    return _applied(model).merge_and_unload(model)


def save_adapter(model: nn.Module, save_dir: str | os.PathLike, base_model_name_or_path: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors as peft's save_pretrained does; atomic.

    `state_dict`: the model's full state dict (minillm names, e.g. one consolidated from ZeRO-3 partitions) to take
    the adapter tensors from instead of the live parameters. An empty tensor (a ZeRO-3 partition that was not
    gathered) is an error, never a silently empty adapter."""
    method = _applied(model)
    config = {**method.config_dict(model), "base_model_name_or_path": base_model_name_or_path}
    state = method.state_dict(model)
    if state_dict is not None:
        names = {k: k.removeprefix(PEFT_PREFIX) for k in state}
        missing = [n for k, n in names.items() if n not in state_dict or n == k]
        if missing:
            raise ValueError(f"save_adapter: state_dict lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
        state = {k: state_dict[n] for k, n in names.items()}
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise ValueError(f"save_adapter: {len(empty)} adapter tensors are empty (partitioned by ZeRO-3 and not "
                         f"gathered?), e.g. {empty[:3]}; gather them or pass a consolidated state_dict")
    with staged_dir(save_dir) as tmp:  # atomic: a failed save leaves an older adapter in save_dir intact
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / ADAPTER_WEIGHTS_NAME,
                  metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))


def read_config(save_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(path, contents) of a directory's adapter_config.json, a regular file inside it whose peft_type is one
    minillm implements. A config without peft_type is LoRA (old peft files and hand-written ones)."""
    path = checked_file(Path(save_dir), ADAPTER_CONFIG_NAME, "adapter")
    d = read_json_object(path)
    kind = d.get("peft_type", "LORA")
    if kind not in METHODS:
        raise ValueError(f"{path}: peft_type {kind!r} is not one minillm implements {tuple(METHODS)}")
    return str(path), d


def method_in(save_dir: str | os.PathLike) -> PeftMethod:
    """The method of an adapter directory (from its adapter_config.json)."""
    return METHODS[read_config(save_dir)[1].get("peft_type", "LORA")]


def load_adapter(model: nn.Module, save_dir: str | os.PathLike, verbose: bool = False) -> nn.Module:
    """Load any adapter directory into `model` (a plain CausalLM, or one with the same method for a resume);
    always use the returned model (prompt and prefix tuning wrap it). Both files must be regular files inside
    `save_dir`; every setting, name, shape, dtype and value is checked before it is used."""
    path, d = read_config(save_dir)
    method = METHODS[d.get("peft_type", "LORA")]
    try:
        config = method.config_from_dict(d, model)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    wpath = checked_file(Path(save_dir), ADAPTER_WEIGHTS_NAME, "adapter")
    try:
        model = method.load(model, config, read_safetensors_file(wpath), str(wpath))
    except ValueError as e:  # e.g. targets that match nothing: the config's doing, so name the config file
        if str(wpath) in str(e):
            raise
        raise ValueError(f"{path}: {e}") from None
    if verbose:
        print(trainable_summary(model))
    return model

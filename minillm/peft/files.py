"""One `save_adapter` / `load_adapter` pair for every fine-tuning method, in peft's own file format.

A directory holds adapter_config.json (its "peft_type" says which method) and adapter_model.safetensors:

    LORA            lora_A/lora_B (+ lora_embedding_A/B, DoRA magnitudes, modules_to_save)  minillm/peft/lora.py
    PROMPT_TUNING   prompt_embeddings (P, C)                                                minillm/peft/prompt.py
    PREFIX_TUNING   prompt_embeddings (P, layers * 2 * kv_heads * head_dim)                 minillm/peft/prefix.py
    MINILLM_HOULSBY_ADAPTER  the adapters' tensors: minillm's own, peft cannot read it       minillm/peft/houlsby.py

The first three are what peft 0.21 writes and reads (`PeftModel.from_pretrained` loads what save_adapter
writes, and the other way round). Prompt and prefix tuning wrap the model: `load_adapter` then returns
the wrapper (PromptTuningLM / PrefixTuningLM), so always use its return value. A saved prefix is the
table after any projection (peft saves it so), so a loaded prefix has no projection MLP: inference, or
further training of the table itself.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from minillm.peft import houlsby
from minillm.peft import lora
from minillm.model import trainable_summary
from minillm.infra.checkpoint import copy_matching, read_safetensors_file, staged_dir
from minillm.peft.prefix import PrefixTuningConfig, PrefixTuningLM
from minillm.peft.prompt import PromptTuningConfig, PromptTuningLM

CONFIG, WEIGHTS = lora.ADAPTER_CONFIG_NAME, lora.ADAPTER_WEIGHTS_NAME
PEFT_TYPES = ("LORA", "PROMPT_TUNING", "PREFIX_TUNING", houlsby.PEFT_TYPE)


def print_trainable_parameters(model: nn.Module) -> None:
    """peft's line: `trainable params: X || all params: Y || trainable%: Z` (parity/peft_methods.py compares it)."""
    print(trainable_summary(model))


def _prompt_learning_config(model: PromptTuningLM | PrefixTuningLM, name: str | None) -> dict[str, Any]:
    cfg, pc = model.config, model.peft_config
    common = {"peft_type": model.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": name,
              "revision": None, "inference_mode": True, "auto_mapping": None, "modules_to_save": None,
              "num_virtual_tokens": pc.num_virtual_tokens, "num_layers": cfg.num_hidden_layers,
              "num_transformer_submodules": 1}
    if isinstance(model, PromptTuningLM):
        return {**common, "token_dim": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
                "prompt_tuning_init": pc.prompt_tuning_init, "prompt_tuning_init_text": pc.prompt_tuning_init_text,
                "tokenizer_name_or_path": pc.tokenizer_name_or_path, "tokenizer_kwargs": None}
    width = cfg.num_key_value_heads * cfg.head_dim  # peft's token_dim for GQA models: the kv width
    return {**common, "token_dim": width, "num_attention_heads": cfg.num_key_value_heads,
            "encoder_hidden_size": pc.encoder_hidden_size or width, "prefix_projection": pc.prefix_projection,
            "init_weights": None}


def save_adapter(model: nn.Module, save_dir: str | os.PathLike, base_model_name_or_path: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter of `model` (whichever method) as peft's save_pretrained does; atomic.

    `state_dict` (LoRA only): take the tensors from a consolidated state dict (see minillm.peft.lora.save_adapter)."""
    if isinstance(model, (PromptTuningLM, PrefixTuningLM)):
        cfg = _prompt_learning_config(model, base_model_name_or_path)
        state = model.adapter_state_dict()
    elif hasattr(model, "adapter_config"):
        cfg = {**houlsby.config_dict(model.adapter_config), "base_model_name_or_path": base_model_name_or_path}
        state = houlsby.adapter_state_dict(model)
    else:
        lora.save_adapter(model, save_dir, base_model_name_or_path, state_dict=state_dict)
        return
    if state_dict is not None:
        raise ValueError("save_adapter(state_dict=...) is for LoRA models only")
    with staged_dir(save_dir) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / WEIGHTS,
                  metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))


def read_config(save_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(path, contents) of the directory's adapter_config.json, its peft_type one minillm implements; errors
    name the file."""
    path, d = lora.read_adapter_json(save_dir)
    if d.get("peft_type", "LORA") not in PEFT_TYPES:  # peft's LoRA configs always carry it; old ones may not
        raise ValueError(f"{path}: peft_type {d.get('peft_type')!r} is not one minillm implements {PEFT_TYPES}")
    return path, d


def _expect(path: str, d: dict[str, Any], key: str, want: Any) -> None:
    """Each saved shape must be this model's: a clear error naming the file and key otherwise."""
    if d.get(key) != want:
        raise ValueError(f"{path}: key {key!r} is {d.get(key)!r}, this model needs {want!r}")


def _positive_int(path: str, d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{path}: key {key!r} must be a positive integer, got {v!r}")
    return v


def _tensor(save_dir: str | os.PathLike, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    wpath = os.path.join(save_dir, WEIGHTS)
    if not os.path.isfile(wpath):
        raise FileNotFoundError(f"{wpath}: no adapter weights")
    saved = read_safetensors_file(wpath)
    if set(saved) != {key}:
        raise ValueError(f"{wpath}: expected exactly one tensor {key!r}, found {sorted(saved)[:4]}")
    if tuple(saved[key].shape) != shape:
        raise ValueError(f"{wpath}: {key} has shape {tuple(saved[key].shape)}, this model needs {shape}")
    return saved[key]


def load_adapter(model: nn.Module, save_dir: str | os.PathLike, verbose: bool = False) -> nn.Module:
    """Load any adapter directory into `model` (a plain CausalLM); returns the adapted model (maybe a wrapper)."""
    path, d = read_config(save_dir)
    kind = d.get("peft_type", "LORA")
    if kind == "LORA":
        return lora.load_adapter(model, save_dir, verbose=verbose)
    cfg = model.config
    if kind == houlsby.PEFT_TYPE:
        try:
            hc = houlsby.HoulsbyConfig(bottleneck=d.get("bottleneck"), non_linearity=d.get("non_linearity"),
                                       init=d.get("init", "zero"), train_norms=d.get("train_norms", False))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        houlsby.apply_adapters(model, hc, verbose=verbose)
        wpath = os.path.join(save_dir, WEIGHTS)
        copy_matching(houlsby.adapter_state_dict(model), read_safetensors_file(wpath), wpath)
        return model
    P = _positive_int(path, d, "num_virtual_tokens")
    _expect(path, d, "num_transformer_submodules", 1)
    _expect(path, d, "num_layers", cfg.num_hidden_layers)
    if kind == "PROMPT_TUNING":
        _expect(path, d, "token_dim", cfg.hidden_size)
        table = _tensor(save_dir, "prompt_embeddings", (P, cfg.hidden_size))
        wrapped = PromptTuningLM(model, PromptTuningConfig(
            num_virtual_tokens=P, prompt_tuning_init_text=d.get("prompt_tuning_init_text"),
            tokenizer_name_or_path=d.get("tokenizer_name_or_path")))
        target = wrapped.prompt_encoder.weight
    else:  # PREFIX_TUNING
        width = cfg.num_key_value_heads * cfg.head_dim
        _expect(path, d, "token_dim", width)
        _expect(path, d, "num_attention_heads", cfg.num_key_value_heads)
        table = _tensor(save_dir, "prompt_embeddings", (P, cfg.num_hidden_layers * 2 * width))
        projection = d.get("prefix_projection", False)
        if not isinstance(projection, bool):
            raise ValueError(f"{path}: key 'prefix_projection' must be true or false, got {projection!r}")
        wrapped = PrefixTuningLM(model, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection,
                                                           encoder_hidden_size=d.get("encoder_hidden_size")),
                                 inference_mode=True)
        target = wrapped.embedding.weight
    with torch.no_grad():
        target.copy_(table.to(target.dtype))
    if verbose:
        print(trainable_summary(wrapped))
    return wrapped

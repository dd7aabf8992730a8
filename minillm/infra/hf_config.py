"""Reading a transformers config.json for ModelConfig (minillm/config.py): the hardened, key-by-key part.

transformers' Llama/Qwen2/Qwen3 configs are read as transformers reads them, their per-family defaults included:
every key that changes the numerics is honoured or refused by name (sliding-window layers, partial RoPE,
longrope, quantization, ...), keys that change nothing are named (the caller warns once), and a malformed file
(not an object, wrong types, unknown dtype) is a ValueError naming the key. ModelConfig itself then checks the
values (sizes <= 0, heads that do not divide, ...).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from minillm.infra.files import checked_file, read_json_object

# The dtype names config.json's "dtype" may hold, and the tensor dtypes they stand for (one table, used by
# checkpoint saving/loading and the training scripts' --dtype).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

MODEL_TYPES = ("llama", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
HIDDEN_ACTS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")  # the MLP activations minillm implements
# rope_parameters keys transformers' formulas read, per type (modeling_rope_utils.py); others change nothing.
ROPE_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_config_json(source: dict | str | Path) -> tuple[str, dict]:
    """(where, object) for a config dict, a config.json file, or a checkpoint directory holding one."""
    if isinstance(source, dict):
        return "config dict", dict(source)
    path = Path(source)
    root, name = (path, "config.json") if path.is_dir() else (path.parent, path.name)
    try:
        path = checked_file(root, name, "config")  # a FIFO or a link out of the directory is refused unread
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json at {root / name}") from None
    return str(path), read_json_object(path)


# What transformers' config classes default to when config.json leaves a key out (they differ by family).
_HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128},
}
# Keys read as they are (besides the required sizes); the expected JSON type of each.
_INT, _NUM, _BOOL = "an integer", "a number", "true or false"
_HF_KEYS = {
    "vocab_size": _INT, "hidden_size": _INT, "intermediate_size": _INT, "num_hidden_layers": _INT,
    "num_attention_heads": _INT, "num_key_value_heads": _INT, "head_dim": _INT, "max_position_embeddings": _INT,
    "rms_norm_eps": _NUM, "initializer_range": _NUM, "attention_dropout": _NUM, "hidden_act": "a string",
    "attention_bias": _BOOL, "mlp_bias": _BOOL, "tie_word_embeddings": _BOOL,
    "bos_token_id": _INT, "eos_token_id": _INT, "pad_token_id": _INT,
}
# Family switches transformers does not read (Qwen2's biases are hard-coded; Qwen2/3 MLPs have none).
_NOT_READ = {"llama": (), "qwen2": ("attention_bias", "mlp_bias"), "qwen3": ("mlp_bias",)}
# Keys checked further down (RoPE, refusals, dtype), and metadata every checkpoint carries that cannot change the
# numerics (use_cache: minillm's cache is an explicit argument, `cache=None` being transformers' use_cache=False).
_QUIET = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache", "_name_or_path",
          "return_dict", "output_attentions", "output_hidden_states", "rope_theta", "rope_scaling", "rope_parameters",
          "pretraining_tp", "partial_rotary_factor", "is_causal", "quantization_config"}
_SLIDING = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")  # read by Qwen2/3 only


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_type(key: str, value: Any, kind: str) -> None:
    if value is None and key in ("num_key_value_heads", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id"):
        return  # null: the family default (kv heads = heads, head_dim = hidden / heads) or no such token
    ok = {_INT: lambda v: type(v) is int, _NUM: is_number, _BOOL: lambda v: type(v) is bool,
          "a string": lambda v: type(v) is str}[kind]
    if key == "eos_token_id" and isinstance(value, list):
        ok_value = all(type(v) is int for v in value)
    else:
        ok_value = ok(value)
    if not ok_value:
        raise ValueError(f"key {key!r} must be {kind}, not {json.dumps(value)}")


def kwargs_from_hf(d: dict) -> tuple[dict[str, Any], list[str]]:
    """config.json dict -> (ModelConfig keyword arguments, names of the keys that change nothing)."""
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"model_type {mt!r} is not supported; minillm reads {MODEL_TYPES}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in d:
            raise ValueError(f"required key {key!r} is missing")
    kw: dict[str, Any] = {"model_type": mt, **_HF_DEFAULTS[mt]}
    for key, kind in _HF_KEYS.items():
        if key in d and key not in _NOT_READ[mt]:
            _check_type(key, d[key], kind)
            kw[key] = d[key]
    if mt == "qwen3" and "head_dim" in d and d["head_dim"] is None:
        raise ValueError("key 'head_dim' is null; Qwen3 needs an integer head_dim (transformers fails on null too)")
    if d.get("is_causal", True) is not True:
        raise ValueError(f"key 'is_causal' = {json.dumps(d['is_causal'])} (bidirectional attention) is not supported")
    if d.get("quantization_config") is not None:
        raise ValueError("key 'quantization_config': quantized checkpoints are not supported; use a dequantized one")
    dtype = d.get("dtype", d.get("torch_dtype"))
    if dtype is not None:
        if dtype not in DTYPES:
            key = "dtype" if "dtype" in d else "torch_dtype"
            raise ValueError(f"key {key!r}: unknown dtype name {json.dumps(dtype)}; minillm knows {sorted(DTYPES)}")
    ignored = [k for k in _NOT_READ[mt] if k in d]
    if mt in ("qwen2", "qwen3"):
        _refuse_sliding_layers(d, kw["num_hidden_layers"])
    if d.get("pretraining_tp", 1) != 1:
        ignored.append("pretraining_tp")  # transformers 4.x split matmuls by it; 5.x no longer reads it
    rope, rope_ignored = _rope_from_hf(d)
    kw.update(rope)
    ignored += rope_ignored
    read = _HF_KEYS.keys() | _QUIET | (set(_SLIDING) if mt in ("qwen2", "qwen3") else set())
    ignored += sorted(k for k in d if k not in read)
    return kw, ignored


def _refuse_sliding_layers(d: dict, n_layers: int) -> None:
    """Qwen2/Qwen3: layer i slides when use_sliding_window and i >= max_window_layers, or as layer_types says."""
    layer_types = d.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise ValueError(f"key 'layer_types' must be a list of strings, not {json.dumps(layer_types)}")
        bad = sorted({t for t in layer_types if t != "full_attention"})
        if bad:
            raise ValueError(f"key 'layer_types' holds {bad}: only 'full_attention' layers are supported by minillm")
        return
    if d.get("use_sliding_window", False) is not False:
        first = d.get("max_window_layers", 28)
        if type(first) is not int:
            raise ValueError(f"key 'max_window_layers' must be an integer, not {json.dumps(first)}")
        if first < n_layers:  # some layer slides: a different mask that minillm does not implement
            raise ValueError(f"use_sliding_window=true with max_window_layers {first} < num_hidden_layers {n_layers}: "
                             "sliding-window attention is not supported by minillm")


def _rope_from_hf(d: dict) -> tuple[dict[str, Any], list[str]]:
    """Legacy top-level `rope_theta` + `rope_scaling` (which wins, as in transformers) or v5 `rope_parameters`
    -> ({rope_theta, rope_scaling}, ignored key names)."""
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ValueError(f"key {key!r} must be a JSON object or null, not {json.dumps(d[key])}")
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    if not is_number(theta) or theta <= 0:
        raise ValueError(f"key 'rope_theta' must be a positive number, not {json.dumps(theta)}")
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; minillm implements {ROPE_TYPES}")
    partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"key 'partial_rotary_factor' = {json.dumps(partial)}: partial RoPE is not supported")
    known = ROPE_KEYS.get(rope_type, ())
    ignored = [f"rope_parameters.{k}" for k in sorted(params) if k not in known]
    scaling = {k: v for k, v in params.items() if k in known}
    return {"rope_theta": float(theta), "rope_scaling": None if rope_type == "default" else {"rope_type": rope_type,
                                                                                             **scaling}}, ignored

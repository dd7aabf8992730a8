"""ModelConfig: one dataclass for Llama 2/3, Qwen2 and Qwen3, read from and written to HF config.json.

The three families differ in only a handful of switches, all derived in `__post_init__`:
  - Llama:  q/k/v/o bias = `attention_bias`, MLP bias = `mlp_bias`.
  - Qwen2:  q/k/v bias always on, o_proj bias always off, no MLP bias (hard-coded in transformers).
  - Qwen3:  q/k/v/o bias = `attention_bias`, plus RMSNorm on each query/key head (`q_norm`, `k_norm`).
RoPE scaling is one dict in transformers' v5 shape: {"rope_type": ..., "factor": ..., ...}.

`from_hf` reads a config.json as transformers' Llama/Qwen2/Qwen3 configs do (their per-family defaults
included): every key that changes the numerics is honoured or refused by name (sliding-window layers, partial
RoPE, longrope, quantization, ...), keys that change nothing are listed in one warning, and a malformed file
(not an object, wrong types, sizes <= 0, heads that do not divide, unknown dtype) is a ValueError naming the
file and the key.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

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
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 4096
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None: = num_attention_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"  # one of HIDDEN_ACTS
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"dynamic"|"yarn"|"llama3", ...}
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attention_dropout: float = 0.0  # on attention probabilities, train mode only (as transformers)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # derived in __post_init__ (not arguments)
    qkv_bias: bool = field(init=False)
    o_bias: bool = field(init=False)
    qk_norm: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; minillm knows {MODEL_TYPES}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; minillm implements {HIDDEN_ACTS}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if value is not None and (type(value) is not int or value <= 0):
                raise ValueError(f"{key} must be a positive integer, not {value!r}")
        for key in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, key)
            if not _is_number(value) or not value > 0:
                raise ValueError(f"{key} must be a positive number, not {value!r}")
        if not _is_number(self.initializer_range) or not self.initializer_range >= 0:
            raise ValueError(f"initializer_range must be a number >= 0, not {self.initializer_range!r}")
        if not _is_number(self.attention_dropout) or not 0 <= self.attention_dropout <= 1:
            raise ValueError(f"attention_dropout must be a probability in [0, 1], not {self.attention_dropout!r}")
        if self.pad_token_id is not None and not -self.vocab_size <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary (vocab_size {self.vocab_size})")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads} (GQA groups)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        self.rope_scaling = _check_rope(self.rope_scaling, self.max_position_embeddings)
        self.qkv_bias = self.attention_bias or self.model_type == "qwen2"
        self.o_bias = self.attention_bias and self.model_type != "qwen2"
        self.qk_norm = self.model_type == "qwen3"

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias + 2 * hd * self.qk_norm
        mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + mlp + 2 * h) + h + emb

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    # ---- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: dict | str | Path) -> "ModelConfig":
        """Read a transformers config.json (a dict, a file, or a checkpoint directory).

        Every key transformers' Llama/Qwen2/Qwen3 read that changes the numerics is honoured (with the family's
        own default when absent: Qwen2/3 default to 32 kv heads, Qwen3 to head_dim 128) or refused by name
        (sliding-window layers, partial RoPE, longrope, ...). Keys that change nothing are listed in one warning.
        Errors name the file and the key.
        """
        where = "config dict"
        if not isinstance(source, dict):
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            where = str(path)
            try:
                source = json.loads(path.read_text())
            except FileNotFoundError:
                raise FileNotFoundError(f"no config.json at {path}") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON ({e})") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e})") from None
            if not isinstance(source, dict):
                raise ValueError(f"{path}: a config.json must hold a JSON object, not {type(source).__name__}")
        try:
            kw, ignored = _kwargs_from_hf(dict(source))
            config = cls(**kw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if ignored:
            warnings.warn(f"{where}: minillm ignores {', '.join(ignored)} (no effect on the model's numerics in "
                          "transformers 5.x either)", stacklevel=2)
        return config

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers loads as the right architecture."""
        d = {k: v for k, v in asdict(self).items() if k not in ("qkv_bias", "o_bias", "qk_norm",
                                                                  "rope_theta", "rope_scaling")}
        d["architectures"] = [_ARCHITECTURES[self.model_type]]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        rope.update(self.rope_scaling or {})
        d["rope_parameters"] = rope
        if self.model_type == "qwen2":
            d.pop("attention_bias")  # always q/k/v bias in Qwen2
            d.pop("mlp_bias")
            d["use_sliding_window"] = False
        if self.model_type == "qwen3":
            d.pop("mlp_bias")
            d["use_sliding_window"] = False
        d["dtype"] = "float32"
        return d


    # what the Trainer's reporting integrations (tensorboard, swanlab, wandb) call on `model.config`
    def to_dict(self) -> dict[str, Any]:
        return self.to_hf()

    def to_json_string(self) -> str:
        return json.dumps(self.to_hf(), indent=2, sort_keys=True) + "\n"


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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_type(key: str, value: Any, kind: str) -> None:
    if value is None and key in ("num_key_value_heads", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id"):
        return  # null: the family default (kv heads = heads, head_dim = hidden / heads) or no such token
    ok = {_INT: lambda v: type(v) is int, _NUM: _is_number, _BOOL: lambda v: type(v) is bool,
          "a string": lambda v: type(v) is str}[kind]
    if key == "eos_token_id" and isinstance(value, list):
        ok_value = all(type(v) is int for v in value)
    else:
        ok_value = ok(value)
    if not ok_value:
        raise ValueError(f"key {key!r} must be {kind}, not {json.dumps(value)}")


def _kwargs_from_hf(d: dict) -> tuple[dict[str, Any], list[str]]:
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
    if not _is_number(theta) or theta <= 0:
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


def _check_rope(rs: dict | None, max_pos: int) -> dict | None:
    if not rs or rs.get("rope_type", rs.get("type", "default")) == "default":
        return None
    rs = dict(rs)
    rt = rs.pop("rope_type", rs.pop("type", None))
    if rt not in ROPE_TYPES:
        raise ValueError(f"rope type {rt!r} is not supported; minillm implements {ROPE_TYPES}")
    # yarn without a factor is allowed: transformers derives it as max_position_embeddings / original.
    need = {"linear": ("factor",), "dynamic": ("factor",), "yarn": (),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rt]
    missing = [k for k in need if rs.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rt!r} needs {missing}")
    for k, v in rs.items():
        if k == "truncate":
            if not isinstance(v, bool) and v is not None:
                raise ValueError(f"rope_scaling key 'truncate' must be true or false, not {json.dumps(v)}")
        elif v is not None and not _is_number(v):
            raise ValueError(f"rope_scaling key {k!r} must be a number, not {json.dumps(v)}")
    if rt in ("yarn", "llama3"):
        rs.setdefault("original_max_position_embeddings", max_pos)  # transformers' default, same place
        if not rs["original_max_position_embeddings"] or rs["original_max_position_embeddings"] <= 0:
            raise ValueError("rope_scaling key 'original_max_position_embeddings' must be a positive integer")
    if rt == "yarn":
        rs.setdefault("factor", None)  # None: derived in the RoPE formula, and written so transformers derives it too
    return {"rope_type": rt, **rs}


PRESETS: dict[str, ModelConfig] = {
    # Tests and the CPU demo: vocab matches the bundled 4096-token tokenizer.
    "tiny": ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "small": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    # Published architectures, as shapes only (no weights ship): for estimates, or to train one from scratch.
    "llama2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                             rope_theta=500000.0, max_position_embeddings=8192),
    "qwen2-0.5b": ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                              num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                              rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen3-0.6b": ModelConfig(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                              num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                              rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True),
}

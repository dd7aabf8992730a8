"""ModelConfig: one dataclass for Llama 2/3, Qwen2 and Qwen3, read from and written to HF config.json.

The three families differ in only a handful of switches, all derived in `__post_init__`:
  - Llama:  q/k/v/o bias = `attention_bias`, MLP bias = `mlp_bias`.
  - Qwen2:  q/k/v bias always on, o_proj bias always off, no MLP bias (hard-coded in transformers).
  - Qwen3:  q/k/v/o bias = `attention_bias`, plus RMSNorm on each query/key head (`q_norm`, `k_norm`).
RoPE scaling is one dict in transformers' v5 shape: {"rope_type": ..., "factor": ..., ...}.

`from_hf` reads a config.json as transformers' Llama/Qwen2/Qwen3 configs do; the key-by-key reading (which keys
change the numerics, which are refused by name, the per-family defaults) is infrastructure, in
minillm/infra/hf_config.py. A malformed file is a ValueError naming the file and the key.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from minillm.infra.hf_config import (DTYPES, HIDDEN_ACTS, MODEL_TYPES, ROPE_TYPES, is_number,  # noqa: F401
                                      kwargs_from_hf, read_config_json)

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
            if not is_number(value) or not value > 0:
                raise ValueError(f"{key} must be a positive number, not {value!r}")
        if not is_number(self.initializer_range) or not self.initializer_range >= 0:
            raise ValueError(f"initializer_range must be a number >= 0, not {self.initializer_range!r}")
        if not is_number(self.attention_dropout) or not 0 <= self.attention_dropout <= 1:
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
        where, d = read_config_json(source)
        try:
            kw, ignored = kwargs_from_hf(d)
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
        elif v is not None and not is_number(v):
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

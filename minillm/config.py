"""ModelConfig: one dataclass for Llama 2/3, Qwen2 and Qwen3, read from and written to HF config.json.

The three families differ in only a handful of switches, all derived in `__post_init__`:
  - Llama:  q/k/v/o bias = `attention_bias`, MLP bias = `mlp_bias`.
  - Qwen2:  q/k/v bias always on, o_proj bias always off, no MLP bias (hard-coded in transformers).
  - Qwen3:  q/k/v/o bias = `attention_bias`, plus RMSNorm on each query/key head (`q_norm`, `k_norm`).
RoPE scaling is one dict in transformers' v5 shape: {"rope_type": ..., "factor": ..., ...}.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

MODEL_TYPES = ("llama", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
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
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"dynamic"|"yarn"|"llama3", ...}
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
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
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu', as Llama/Qwen use)")
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
        """Read a transformers config.json (a dict, a file, or a checkpoint directory)."""
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
        d = dict(source)
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"{where}: model_type {mt!r} is not supported; minillm reads {MODEL_TYPES}")
        if d.get("use_sliding_window"):
            raise ValueError(f"{where}: use_sliding_window=true is not supported by minillm")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if key not in d:
                raise ValueError(f"{where}: required key {key!r} is missing")
        rope = _rope_from_hf(d, where)
        known = {f.name for f in fields(cls) if f.init}
        kw = {k: v for k, v in d.items() if k in known}
        kw.update(rope)
        if mt == "qwen2":
            kw.pop("attention_bias", None)  # Qwen2Config has no such switch: biases are hard-coded
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

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


def _rope_from_hf(d: dict, where: str) -> dict[str, Any]:
    """v5 `rope_parameters` or legacy top-level `rope_theta` + `rope_scaling` -> (rope_theta, rope_scaling)."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported; minillm implements {ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
    params.pop("partial_rotary_factor", None)
    return {"rope_theta": float(theta), "rope_scaling": None if rope_type == "default" else {"rope_type": rope_type, **params}}


def _check_rope(rs: dict | None, max_pos: int) -> dict | None:
    if not rs or rs.get("rope_type", rs.get("type", "default")) == "default":
        return None
    rs = dict(rs)
    rt = rs.pop("rope_type", rs.pop("type", None))
    if rt not in ROPE_TYPES:
        raise ValueError(f"rope type {rt!r} is not supported; minillm implements {ROPE_TYPES}")
    need = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rt]
    missing = [k for k in need if rs.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rt!r} needs {missing}")
    if rt in ("yarn", "llama3"):
        rs.setdefault("original_max_position_embeddings", max_pos)  # transformers' default, same place
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

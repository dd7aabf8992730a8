"""HF-format checkpoints: config.json + model.safetensors (or shards with model.safetensors.index.json).

Only safetensors are read: nothing is unpickled, so a downloaded checkpoint cannot run code. Loading is
strict: every missing, unexpected or mis-shaped tensor is collected and reported in one error.
Tied embeddings are handled as transformers does: the file holds `model.embed_tokens.weight` only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minillm.config import ModelConfig
from minillm.model import CausalLM, rope_inv_freq

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
# Tensors some published checkpoints carry that are recomputed, not learned (old Llama conversions).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or sharded), keyed by name."""
    path = Path(path)
    if (path / INDEX).exists():
        index = json.loads((path / INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (path / WEIGHTS).exists():
        files = [WEIGHTS]
    else:
        found = sorted(p.name for p in path.glob("*")) if path.is_dir() else []
        hint = " (.bin/.pth checkpoints are pickles and are never loaded: convert them to safetensors)" \
            if any(n.endswith((".bin", ".pth", ".pt")) for n in found) else ""
        raise FileNotFoundError(f"{path}: no {WEIGHTS} or {INDEX}{hint}; found {found[:10]}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def load_pretrained(path: str | Path, dtype: str | torch.dtype | None = None,
                    attn_implementation: str = "sdpa") -> CausalLM:
    """Build a CausalLM from an HF checkpoint directory. dtype: None = float32, "auto" = as stored."""
    path = Path(path)
    config = ModelConfig.from_hf(path)
    tensors = {k: v for k, v in read_safetensors(path).items() if not k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # transformers ties it to the embedding whatever the file says
    # Build on the meta device: no memory or time spent on a random init that the weights overwrite.
    with torch.device("meta"):
        model = CausalLM(config, attn_implementation=attn_implementation)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    problems = [f"missing: {k} {tuple(s)}" for k, s in expected.items() if k not in tensors]
    problems += [f"unexpected: {k} {tuple(v.shape)}" for k, v in tensors.items() if k not in expected]
    problems += [f"shape mismatch: {k} checkpoint {tuple(v.shape)} vs model {tuple(expected[k])}"
                 for k, v in tensors.items() if k in expected and v.shape != expected[k]]
    if problems:
        raise ValueError(f"{path}: checkpoint does not match its config.json ({len(problems)} problems):\n  "
                         + "\n  ".join(problems))
    if dtype is None:
        dtype = torch.float32
    elif dtype != "auto":
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype != "auto":
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rope = model.model.rotary_emb  # non-persistent buffer: recompute it on the real device
    rope.inv_freq = rope_inv_freq(config)[0]
    return model


def save_pretrained(model: CausalLM, path: str | Path) -> None:
    """Write config.json + model.safetensors that `transformers.AutoModelForCausalLM` loads as is."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # shared with embed_tokens: stored once, as transformers does
    dtypes = {v.dtype for v in state.values()}
    config["dtype"] = next(k for k, d in DTYPES.items() if d in dtypes) if dtypes else "float32"
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(path / WEIGHTS), metadata={"format": "pt"})

"""HF-format checkpoints: config.json + model.safetensors (or shards with model.safetensors.index.json).

Only safetensors are read: nothing is unpickled, so a downloaded checkpoint cannot run code. Loading is
strict: every missing, unexpected or mis-shaped tensor is collected and reported in one error.
Tied embeddings are handled as transformers does: the file holds `model.embed_tokens.weight` only.

A checkpoint directory is treated as untrusted input:
- every file it names (config.json, model.safetensors, the index, each shard of its `weight_map`) must be a
  regular file inside the directory: no absolute paths, no "..", no symlink leading out of it (except
  a Hugging Face cache snapshot's links into its own `blobs/`), no FIFO or device (opening a FIFO
  would block the loader for ever). Types are checked with stat() before anything is opened.
- each shard must hold exactly the tensors the index assigns to it: a tensor found in a shard the
  index does not assign it to is an error, not a silent win of whichever shard is read last.
- a truncated or corrupt safetensors file, an absurd header length or an unknown dtype is reported as
  one sentence naming the file (safetensors parses; its error is rephrased, never swallowed).

Saving is atomic: `save_pretrained` writes through minillm/infra/files.py's `staged_dir` (stage, fsync, rename).
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from minillm.config import DTYPES, ModelConfig
from minillm.infra.files import checked_file, read_json_object, staged_dir

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
# Tensors some published checkpoints carry that are recomputed, not learned (old Llama conversions).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_MAX_HEADER = 100_000_000  # safetensors refuses larger headers


# ---- reading untrusted files ------------------------------------------------------------------------------

def _safetensors_problem(path: Path, error: Exception) -> str:
    """A sentence for why safetensors could not read `path` (reads at most the header)."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes long, too short to be a safetensors file (empty or truncated)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER:
            return f"its header length field says {n} bytes (limit {_MAX_HEADER}): not a safetensors file, or corrupt"
        if 8 + n > size:
            return (f"its header length field says {n} bytes but only {size - 8} follow: "
                    "truncated, or not a safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"its header is not valid JSON ({e}): corrupt, or not a safetensors file"
    if not isinstance(header, dict):
        return f"its header is a JSON {type(header).__name__}, not an object"
    msg = str(error)
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            return f"tensor {key!r}: header entry is {info!r}, not an object"
        if "unknown variant" in msg and info.get("dtype") not in _SAFETENSORS_DTYPES:
            return (f"tensor {key!r} has unknown dtype {info.get('dtype')!r} "
                    f"(safetensors knows {sorted(_SAFETENSORS_DTYPES)})")
        offsets = info.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
            end = max(end, offsets[1])
    if "incomplete metadata" in msg or "not fully covered" in msg:
        return (f"its header describes {end} bytes of tensor data but the file holds {size - 8 - n}: "
                "truncated, or corrupt")
    return f"not a valid safetensors file ({msg})"


_SAFETENSORS_DTYPES = {"BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                       "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
                       "F64", "I64", "U64"}


def read_safetensors_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of one .safetensors file; a corrupt file raises a ValueError naming it and why."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, MemoryError):
        raise
    except Exception as e:  # safetensors_rust.SafetensorError and friends: rephrase as a sentence
        raise ValueError(f"{path}: {_safetensors_problem(path, e)}") from None


def copy_matching(params: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Copy `saved` (read from `path`) into `params` in place: exactly the same names and shapes, or an error
    naming the file and what differs (adapters and trainable state, which must fit the model they load into)."""
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(f"{path}: tensors do not match the model: {len(missing)} missing {missing[:3]}, "
                         f"{len(extra)} unexpected {extra[:3]}")
    for k, p in params.items():
        if saved[k].shape != p.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(saved[k].shape)}, the model expects {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])


def _read_index(path: Path) -> dict[str, str]:
    """The index's weight_map {tensor name: shard file}, validated as JSON of the right shape."""
    index = checked_file(path, INDEX, "sharded checkpoint")
    wmap = read_json_object(index).get("weight_map")
    if not isinstance(wmap, dict):
        raise ValueError(f"{index}: expected an object with a 'weight_map' object of tensor name -> shard file")
    for key, name in wmap.items():
        if not isinstance(name, str):
            raise ValueError(f"{index}: weight_map[{key!r}] must be a file name string, got {name!r}")
    return wmap


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or sharded), keyed by name.

    Sharded: each shard named by the index is checked (regular file inside `path`) before any is
    opened, and must hold exactly the tensors the index assigns to it.
    """
    path = Path(path)
    if (path / INDEX).exists() or (path / INDEX).is_symlink():
        wmap = _read_index(path)
        shards: dict[str, list[str]] = {}
        for key, name in wmap.items():
            shards.setdefault(name, []).append(key)
        files = {name: checked_file(path, name, f"{path / INDEX}: weight_map[{keys[0]!r}]")
                 for name, keys in sorted(shards.items())}
        tensors: dict[str, torch.Tensor] = {}
        for name, file in files.items():
            found = read_safetensors_file(file)
            stray = sorted(set(found) - set(shards[name]))
            if stray:
                where = wmap.get(stray[0])
                raise ValueError(f"{file}: holds tensor {stray[0]!r} that {INDEX} assigns to "
                                 + (f"{where!r}" if where else "no shard") + _more(stray))
            absent = sorted(set(shards[name]) - set(found))
            if absent:
                raise ValueError(f"{file}: has no tensor {absent[0]!r}, which {INDEX} says it holds"
                                 + _more(absent))
            tensors.update(found)
        return tensors
    if (path / WEIGHTS).exists() or (path / WEIGHTS).is_symlink():
        return read_safetensors_file(checked_file(path, WEIGHTS, "checkpoint"))
    found = sorted(p.name for p in path.glob("*")) if path.is_dir() else []
    hint = " (.bin/.pth checkpoints are pickles and are never loaded: convert them to safetensors)" \
        if any(n.endswith((".bin", ".pth", ".pt")) for n in found) else ""
    raise FileNotFoundError(f"{path}: no {WEIGHTS} or {INDEX}{hint}; found {found[:10]}")


def load_pretrained(path: str | Path, build: Callable[[ModelConfig], nn.Module],
                    dtype: str | torch.dtype | None = None) -> nn.Module:
    """The model `build(config)` makes (called on the meta device), holding an HF checkpoint directory's
    weights, every tensor checked first. dtype: None = float32, "auto" = as stored. Buffers that are not
    saved (RoPE's inverse frequencies) are the caller's to recompute on the real device."""
    path = Path(path)
    if (path / "config.json").exists() or (path / "config.json").is_symlink():
        checked_file(path, "config.json", "checkpoint")  # a FIFO config.json would block the read for ever
    config = ModelConfig.from_hf(path)
    tensors = {k: v for k, v in read_safetensors(path).items() if not k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # transformers ties it to the embedding whatever the file says
    # Build on the meta device: no memory or time spent on a random init that the weights overwrite.
    with torch.device("meta"):
        model = build(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    problems = [f"missing: {k} {tuple(s)}" for k, s in expected.items() if k not in tensors]
    problems += [f"unexpected: {k} {tuple(v.shape)}" for k, v in tensors.items() if k not in expected]
    problems += [f"shape mismatch: {k} checkpoint {tuple(v.shape)} vs model {tuple(expected[k])}"
                 for k, v in tensors.items() if k in expected and v.shape != expected[k]]
    problems += [f"not floating point: {k} is {str(v.dtype).removeprefix('torch.')}"
                 for k, v in tensors.items() if k in expected and not v.is_floating_point()]
    if problems:
        raise ValueError(f"{path}: checkpoint does not match its config.json ({len(problems)} problems):\n  "
                         + "\n  ".join(problems))
    if dtype is None:
        dtype = torch.float32
    elif dtype != "auto":
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)} or 'auto'")
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype != "auto":
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


# ---- saving --------------------------------------------------------------------------------------------------

def _remove_stale_shards(path: Path) -> None:
    """After writing model.safetensors over a sharded checkpoint: drop its index (which the loader would
    prefer) and the shards it names, as transformers' save_pretrained removes stale shards."""
    if not (path / INDEX).exists():
        return
    try:
        names = set(_read_index(path).values())
    except ValueError:
        names = set()  # a corrupt index: remove it, leave unknown files alone
    (path / INDEX).unlink()
    for name in names - {WEIGHTS}:
        with contextlib.suppress(ValueError, FileNotFoundError):
            checked_file(path, name, "stale shard").unlink()


def save_pretrained(model: nn.Module, path: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write config.json + model.safetensors that `transformers.AutoModelForCausalLM` loads as is, atomically.

    `state_dict` (default: the model's) lets a trainer pass weights it gathered itself.
    """
    path = Path(path)
    config = model.config.to_hf()
    state = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with embed_tokens: stored once, as transformers does
    dtypes = {v.dtype for v in state.values()}
    config["dtype"] = next((k for k, d in DTYPES.items() if d in dtypes), "float32")
    with staged_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _remove_stale_shards(path)

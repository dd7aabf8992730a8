"""Weights out of a DeepSpeed ZeRO checkpoint: one HF-format model directory (config.json + model.safetensors).

    python train/consolidate.py out/pretrain/checkpoint-500 --output_dir out/consolidated

A ZeRO-3 checkpoint-N holds each rank's partition of the fp32 master weights (global_stepN/zero_pp_rank_R_*);
DeepSpeed's zero_to_fp32 (get_fp32_state_dict_from_zero_checkpoint) joins them into the full weights. They are
written the way the run's implementation saves a model: minillm's CausalLM.save_pretrained for an --impl minillm
run, transformers' save_pretrained for --impl hf (read from the checkpoint's run.json; --impl overrides), with the
checkpoint's config.json and the run's tokenizer files alongside, so the result loads in transformers and minillm.
The fp32 master weights are what the optimizer holds: with --bf16/--fp16 they are more exact than the 16-bit
model.safetensors the Trainer wrote (stage3_gather_16bit_weights_on_model_save), in an fp32 run they are equal.

    python train/consolidate.py out/pretrain/checkpoint-500 --universal

converts the checkpoint in place into DeepSpeed's universal format (global_stepN_universal/, DeepSpeed's
ds_to_universal, which writes a `latest_universal` file naming it): a resume on another number of ranks loads it with
"checkpoint": {"load_universal": true} in the DeepSpeed config (ds_configs/zero2_universal.json, zero3_universal.json).
Every torch.load here is weights-only (train/safety.py lists what a DeepSpeed file may unpickle).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from deepspeed.checkpoint import ds_to_universal
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM

from minillm.config import ModelConfig
from minillm.model import CausalLM
from train import safety

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def fail(msg: str) -> None:
    raise SystemExit(f"consolidate.py: error: {msg}")


def zero_tag(checkpoint: Path, tag: str | None) -> str:
    """The global_stepN directory to read: --tag, else the checkpoint's `latest` file."""
    if tag is None:
        latest = checkpoint / "latest"
        if not latest.is_file():
            fail(f"{checkpoint} holds no DeepSpeed ZeRO checkpoint (no 'latest' file naming a global_stepN "
                 "directory): was the run started with --deepspeed? A run without DeepSpeed already saved "
                 "model.safetensors there")
        tag = latest.read_text().strip()
    if not (checkpoint / tag).is_dir():
        fail(f"{checkpoint / tag}: no such directory")
    return tag


def run_impl(checkpoint: Path, impl: str | None) -> str:
    """--impl, else the implementation recorded in run.json (the checkpoint's, else its run's output directory)."""
    record = None
    for d in (checkpoint, checkpoint.parent):
        if (d / "run.json").is_file():
            record = json.loads((d / "run.json").read_text())
            break
    if record is not None and (record.get("lora") or record.get("peft")):
        fail(f"{checkpoint} is a fine-tuning run with an adapter ({record.get('peft') or 'lora'}): its trained "
             "weights are already complete in adapter_model.safetensors there (the Trainer gathers them on save)")
    if impl is None:
        if record is None or record.get("impl") not in ("minillm", "hf"):
            fail(f"no run.json with an implementation in {checkpoint} or {checkpoint.parent}: pass --impl minillm|hf")
        impl = record["impl"]
    return impl


def fp32_state_dict(checkpoint: Path, tag: str) -> dict:
    """The full fp32 weights of a ZeRO-1/2/3 checkpoint, every torch.load weights-only."""
    if err := safety.forbid_unpickling_code():
        fail(err)
    with torch.serialization.safe_globals(safety.resume_safe_globals()):
        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
        except Exception as e:  # an unpicklable object, a missing rank's file, a truncated file: name it
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            fail(f"cannot read the ZeRO checkpoint {checkpoint / tag}: {first[:300]}")
    return {k: v.contiguous() for k, v in sd.items()}


def build(checkpoint: Path, impl: str, state_dict: dict):
    """The run's model class from the checkpoint's config.json, holding `state_dict` (strict: every name)."""
    if not (checkpoint / "config.json").is_file():
        fail(f"{checkpoint} has no config.json (the Trainer writes it into every checkpoint of a full model)")
    if impl == "minillm":
        model = CausalLM(ModelConfig.from_hf(checkpoint / "config.json"))
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # a tied lm_head is the embedding itself: DeepSpeed stores the tensor once, under either name
    tied = {"lm_head.weight", "model.embed_tokens.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        fail(f"the ZeRO checkpoint's weights do not fit the model of {checkpoint / 'config.json'}: missing "
             f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model


def consolidate(checkpoint: Path, output_dir: Path, impl: str | None = None, tag: str | None = None) -> Path:
    checkpoint = checkpoint.resolve()
    if output_dir.resolve() == checkpoint:
        fail("--output_dir must not be the checkpoint itself (it holds the Trainer's model.safetensors)")
    tag = zero_tag(checkpoint, tag)
    impl = run_impl(checkpoint, impl)
    sd = fp32_state_dict(checkpoint, tag)
    model = build(checkpoint, impl, sd)
    output_dir.mkdir(parents=True, exist_ok=True)
    if impl == "minillm":
        model.save_pretrained(output_dir)  # config.json + model.safetensors, staged and renamed
    else:
        model.save_pretrained(output_dir, safe_serialization=True)
    source = next((d for d in (checkpoint, checkpoint.parent) if (d / "tokenizer.json").is_file()), None)
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, output_dir / name)
    n = sum(v.numel() for v in sd.values())
    print(f"consolidate.py: {checkpoint / tag} ({impl}, {len(sd)} tensors, {n / 1e6:.2f}M parameters, fp32) -> "
          f"{output_dir}" + ("" if source else " (no tokenizer files found beside the checkpoint: copy them)"))
    return output_dir


def universal(checkpoint: Path, tag: str | None = None, workers: int = 1) -> Path:
    """DeepSpeed's ds_to_universal on checkpoint/<tag> into checkpoint/<tag>_universal (it writes the
    `latest_universal` file naming it). A resume loads it on any number of ranks with "checkpoint":
    {"load_universal": true} in the DeepSpeed config (ds_configs/zero2_universal.json, zero3_universal.json):
    the engine then reads `latest_universal` instead of `latest`."""
    checkpoint = checkpoint.resolve()
    tag = zero_tag(checkpoint, tag)
    if tag.endswith("_universal"):
        print(f"consolidate.py: {checkpoint / tag} is universal already")
        return checkpoint / tag
    out = checkpoint / f"{tag}_universal"
    if err := safety.forbid_unpickling_code():
        fail(err)
    argv = ["ds_to_universal", "--input_folder", str(checkpoint / tag), "--output_folder", str(out),
            "--num_extract_workers", str(workers), "--num_merge_workers", str(workers), "--no_strict",
            "--inject_missing_state"]  # ZeRO-1/2: the HF Trainer writes no universal_checkpoint_info; this adds it
    old = sys.argv
    try:
        sys.argv = argv
        with torch.serialization.safe_globals(safety.resume_safe_globals() + universal_safe_globals()):
            ds_to_universal.main(ds_to_universal.parse_arguments())
    finally:
        sys.argv = old
    print(f"consolidate.py: {checkpoint / tag} -> {out} (universal; {checkpoint / 'latest_universal'} names it). "
          "Resume with a DeepSpeed config holding \"checkpoint\": {\"load_universal\": true}, e.g. "
          "ds_configs/zero2_universal.json or zero3_universal.json")
    return out


def universal_safe_globals() -> list:
    """The extra classes ds_to_universal's own files pickle (besides a ZeRO checkpoint's)."""
    return []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="consolidate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint-N directory of a DeepSpeed ZeRO run")
    p.add_argument("--output_dir", type=Path, help="where to write config.json + model.safetensors + tokenizer")
    p.add_argument("--impl", choices=("minillm", "hf"), help="default: the run's, from run.json")
    p.add_argument("--tag", help="the global_stepN directory (default: the checkpoint's 'latest' file)")
    p.add_argument("--universal", action="store_true",
                   help="instead: convert the checkpoint in place to DeepSpeed's universal format, which a resume "
                        "on another number of ranks loads (with a config holding \"checkpoint\": "
                        "{\"load_universal\": true}, e.g. ds_configs/zero2_universal.json)")
    args = p.parse_args(argv)
    if not args.checkpoint.is_dir():
        fail(f"{args.checkpoint}: no such directory")
    if args.universal:
        universal(args.checkpoint, args.tag)
        return
    if args.output_dir is None:
        fail("--output_dir is required (or --universal)")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    consolidate(args.checkpoint, args.output_dir, args.impl, args.tag)


if __name__ == "__main__":
    main()

"""The tokenizer and the model a run trains: minillm's hand-written CausalLM or transformers' model (--impl).

The hf model is built *from the minillm one* (same seed -> minillm init -> strict copy of the state dict), so
both start from identical weights and their loss curves compare step by step (train/compare.py).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from minillm.config import PRESETS, ModelConfig
from minillm.infra import corpus
from minillm.infra.checkpoint import DTYPES
from minillm.model import CausalLM

from train.args import ModelArguments, fail

logger = logging.getLogger("minillm.train")


def tokenizer_dir(model_args: ModelArguments) -> str:
    """--tokenizer_name, else the model's own tokenizer, else the bundled one."""
    path = model_args.tokenizer_name
    if path is None and model_args.model_name_or_path and \
            os.path.isfile(os.path.join(model_args.model_name_or_path, "tokenizer.json")):
        path = model_args.model_name_or_path
    return path or str(corpus.TOKENIZER_DIR)


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerFast:
    path = tokenizer_dir(model_args)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file) and not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        fail(f"--tokenizer_name: {path} has no tokenizer.json")
    try:
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(path)
        return PreTrainedTokenizerFast(tokenizer_file=file)
    except Exception as e:  # the tokenizers library raises bare Exceptions for a malformed file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"{file if os.path.isfile(file) else path}: not a usable tokenizer ({first})")


def model_config(model_args: ModelArguments, tokenizer) -> ModelConfig:
    name = model_args.config_name or "tiny"
    cfg = ModelConfig.preset(name) if name in PRESETS else ModelConfig.from_hf(name)
    # The config carries the tokenizer's special ids, so generation knows where to stop.
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        # pad becomes the embedding's padding_idx (zero row, no gradient): never do that to EOS
        ids["pad_token_id"] = tokenizer.pad_token_id
    cfg = ModelConfig.from_hf({**cfg.to_hf(), **{k: v for k, v in ids.items() if v is not None}})
    if len(tokenizer) > cfg.vocab_size:
        fail(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {cfg.vocab_size}")
    return cfg


def hf_model_from(model: CausalLM) -> torch.nn.Module:
    """transformers' model of the same architecture holding exactly the weights of `model`."""
    d = model.config.to_hf()
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    # The class itself, not from_config: under a ZeRO-3 config from_config builds inside deepspeed.zero.Init,
    # which partitions the weights before we can copy ours in (the engine partitions them later anyway).
    hf = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    hf.load_state_dict(model.state_dict(), strict=True)  # same names: a strict copy, no renaming
    return hf


def join_deepspeed_comm() -> None:
    """Under ZeRO-3, let DeepSpeed's comm layer adopt the process group before transformers' from_pretrained.

    from_pretrained then builds the model inside deepspeed.zero.Init, whose DeepSpeedConfig takes the world size
    from deepspeed.comm, not torch.distributed. On a GPU the Trainer's setup (accelerate) has initialized deepspeed.comm
    already; on CPU (use_cpu) it only initializes torch.distributed (gloo), so deepspeed.comm reports no group, the
    config assumes world size 1 and its batch check fails ("train_batch_size 8 != 4 * 1 * 1"). init_distributed wraps
    the existing group (no new one); deepspeed.initialize does the same later anyway."""
    if is_deepspeed_zero3_enabled() and dist.is_available() and dist.is_initialized():
        import deepspeed
        deepspeed.init_distributed()


def build_model(model_args: ModelArguments, tokenizer, seed: int) -> torch.nn.Module:
    """A random-init (seeded) or pretrained model of either implementation, in model_args.dtype."""
    dtype = DTYPES[model_args.dtype]
    path = model_args.model_name_or_path
    if path:
        if model_args.impl == "minillm":
            model = CausalLM.from_pretrained(path)
        else:
            join_deepspeed_comm()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)  # (ZeRO-3: see check_args)
        logger.info(f"Loaded {model_args.impl} model from {path}")
    else:
        torch.manual_seed(seed)
        model = CausalLM(model_config(model_args, tokenizer))
        if model_args.impl == "hf":
            model = hf_model_from(model)
        logger.info(f"New {model_args.impl} model from config {model_args.config_name or 'tiny'} (seed {seed})")
    # (under ZeRO-3 from_pretrained leaves each parameter an empty placeholder: its size is ds_numel)
    n_params = sum({id(p): getattr(p, "ds_numel", p.numel()) for p in model.parameters()}.values())
    logger.info(f"Model size: {n_params / 1e6:.2f}M parameters")
    return model.to(dtype)

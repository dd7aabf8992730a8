"""`finetune.py --peft lora|prefix|prompt|adapter`: the chapter's efficient fine-tuning methods (§3.3) for training.

Each method wraps the frozen model on either side: minillm's hand-written one (minillm.peft.lora, .prefix,
.prompt_tuning, .adapter) for --impl minillm, peft's get_peft_model for --impl hf, both seeded the same just
before so they start from the same weights (parity/peft_methods.py checks forward, gradients and files).
Houlsby adapters (--peft adapter) exist only in minillm: peft 0.21 has no such method, so --impl hf is refused.

What this file adds to the training scripts, and why:
- --packing is refused with prefix and prompt tuning: peft drops position_ids under prompt tuning, and a prefix
  is a KV cache, with which transformers does not look for packed documents; both would attend across
  conversations.
- prefix tuning with --gradient_checkpointing uses non-re-entrant checkpointing (re-entrant recomputation
  would differentiate only the layer's tensor arguments; the prefix rides in the cache object).
- checkpoints of a prefix/prompt/adapter run (minillm's, and peft's prefix/prompt) hold, besides the
  peft-format adapter, the trainable tensors by name (`trainable.safetensors`): a prefix with
  --prefix_projection is saved by peft's rule as its projected table, from which the projection MLP cannot be
  recovered, so the stock Trainer's resume without DeepSpeed fails on peft's own checkpoint ("Error(s) in
  loading state_dict for Embedding"); a resume must restore exactly what was being trained. (Under DeepSpeed
  the resume reads DeepSpeed's own copy of the module instead.)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import peft
import torch
from safetensors.torch import save_file
from torch import nn

from minillm.infra.checkpoint import copy_matching, read_safetensors_file
from minillm.model import trainable_summary
from minillm.peft import BY_NAME, apply, method_of

METHODS = ("none", "lora", "prefix", "prompt", "ia3", "adapter")
TRAINABLE_FILE = "trainable.safetensors"  # checkpoints of minillm's prefix/prompt/adapter runs (resume)


@dataclass
class PeftArguments:
    peft: Literal["none", "lora", "prefix", "prompt", "ia3", "adapter"] = field(
        default="none", metadata={"help": "efficient fine-tuning (the chapter's §3.3): lora; prefix (prefix tuning); "
                                          "prompt (prompt tuning); ia3 ((IA)^3: learned vectors scaling keys, values "
                                          "and the MLP's down-projection input); adapter (Houlsby adapters, --impl "
                                          "minillm only: peft has none); none: train all weights"})
    use_lora: bool = field(default=False, metadata={"help": "the course's flag: the same as --peft lora"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch"})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "module names (e.g. q_proj v_proj embed_tokens) or all-linear; default "
                                        "q_proj v_proj"})
    num_virtual_tokens: int = field(default=20, metadata={"help": "prefix/prompt: number of virtual tokens P"})
    prefix_projection: bool = field(
        default=False, metadata={"help": "prefix: learn the prefix through an MLP (Li & Liang's reparametrisation); "
                                         "the saved adapter is its output table"})
    encoder_hidden_size: int | None = field(
        default=None, metadata={"help": "prefix --prefix_projection: the MLP's hidden width (default: the kv width)"})
    prompt_tuning_init_text: str | None = field(
        default=None, metadata={"help": "prompt: start the virtual tokens from this text's token embeddings "
                                        "(peft's PromptTuningInit.TEXT); default random"})
    ia3_target_modules: list[str] | None = field(
        default=None, metadata={"help": "ia3: the modules that get a vector (default peft's: k_proj v_proj down_proj "
                                        "for llama, q_proj v_proj down_proj for qwen2/qwen3)"})
    ia3_feedforward_modules: list[str] | None = field(
        default=None, metadata={"help": "ia3: which of the targets scale their input rather than their output "
                                        "(default down_proj)"})
    adapter_bottleneck: int = field(default=16, metadata={"help": "adapter: bottleneck width m (< hidden_size)"})
    adapter_non_linearity: Literal["gelu", "relu", "silu", "tanh"] = field(
        default="gelu", metadata={"help": "adapter: the non-linearity between the down- and up-projection"})

    def __post_init__(self) -> None:
        if self.use_lora and self.peft not in ("none", "lora"):
            raise ValueError(f"--use_lora means --peft lora; it cannot be combined with --peft {self.peft}")
        if self.use_lora:
            self.peft = "lora"
        self.use_lora = self.peft == "lora"


# flag -> the methods it belongs to: given with another method, it would silently do nothing
_FLAG_METHODS = {"lora_r": ("lora",), "lora_alpha": ("lora",), "lora_dropout": ("lora",),
                 "lora_target_modules": ("lora",), "num_virtual_tokens": ("prefix", "prompt"),
                 "prefix_projection": ("prefix",), "encoder_hidden_size": ("prefix",),
                 "prompt_tuning_init_text": ("prompt",), "ia3_target_modules": ("ia3",),
                 "ia3_feedforward_modules": ("ia3",), "adapter_bottleneck": ("adapter",),
                 "adapter_non_linearity": ("adapter",)}


def settings(peft_args: PeftArguments, tokenizer_path: str) -> dict[str, Any]:
    """The method's settings under peft's keyword names: one set for both sides (minillm's configs take them)."""
    text, targets = peft_args.prompt_tuning_init_text, peft_args.lora_target_modules
    return {
        "lora": dict(r=peft_args.lora_r, lora_alpha=peft_args.lora_alpha, lora_dropout=peft_args.lora_dropout,
                     target_modules="all-linear" if targets == ["all-linear"] else targets),
        "prompt": dict(num_virtual_tokens=peft_args.num_virtual_tokens, prompt_tuning_init="TEXT" if text else "RANDOM",
                       prompt_tuning_init_text=text, tokenizer_name_or_path=tokenizer_path if text else None),
        "prefix": dict(num_virtual_tokens=peft_args.num_virtual_tokens, prefix_projection=peft_args.prefix_projection,
                       encoder_hidden_size=peft_args.encoder_hidden_size),
        "ia3": dict(target_modules=peft_args.ia3_target_modules, feedforward_modules=peft_args.ia3_feedforward_modules),
        "adapter": dict(bottleneck=peft_args.adapter_bottleneck, non_linearity=peft_args.adapter_non_linearity),
    }[peft_args.peft]


def _text_ids(peft_args: PeftArguments, encode) -> dict[str, Any]:
    """minillm's prompt-tuning TEXT init takes the token ids of the text (peft tokenizes it itself)."""
    text = peft_args.prompt_tuning_init_text
    return {"init_token_ids": encode(text)} if peft_args.peft == "prompt" and text else {}


# a config field -> the flag that sets it, so that a config's ValueError becomes the flag's one-line error
_FLAG_OF = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
            "num_virtual_tokens": "num_virtual_tokens", "encoder_hidden_size": "encoder_hidden_size",
            "bottleneck": "adapter_bottleneck", "non_linearity": "adapter_non_linearity",
            "feedforward_modules": "ia3_feedforward_modules"}


def _flag_sentence(peft_args: PeftArguments, error: str) -> str:
    """"LoraConfig.r must be a positive int, got 0" -> "--lora_r 0: must be a positive int, got 0"."""
    m = re.match(r"\w+Config\.(\w+) (.*)", error)
    if not m:
        return f"--peft {peft_args.peft}: {error}"
    field_name, reason = m.groups()
    flag = _FLAG_OF.get(field_name) or f"{'lora' if peft_args.peft == 'lora' else peft_args.peft}_{field_name}"
    value = getattr(peft_args, flag, None)
    return f"--{flag} {value}: {reason}" if value is not None else f"--{flag}: {reason}"


def check_peft_args(peft_args: PeftArguments, impl: str, packing: bool, training_args) -> str | None:
    """The first reason this --peft set-up cannot run, as a sentence; None when it can. May fill
    gradient_checkpointing_kwargs (prefix tuning needs non-re-entrant checkpointing)."""
    method = peft_args.peft
    defaults = PeftArguments()
    for flag, owners in _FLAG_METHODS.items():
        if method not in owners and getattr(peft_args, flag) != getattr(defaults, flag):
            return f"--{flag} is for --peft {'/'.join(owners)}, not --peft {method}"
    if method != "none":  # each value is validated once, by the method's config; here it becomes a flag's sentence
        try:
            BY_NAME[method].config_class(**settings(peft_args, "tokenizer"), **_text_ids(peft_args, lambda _: [0]))
        except ValueError as e:
            return _flag_sentence(peft_args, str(e))
    if method in ("prefix", "prompt"):
        if packing:
            return (f"--packing cannot be used with --peft {method}: peft drops position_ids under prompt tuning and "
                    "transformers does not look for packed documents behind a prefix cache, so conversations would "
                    "attend to each other")
    if method == "adapter" and impl == "hf":
        return ("--peft adapter: peft has no Houlsby adapters (minillm/peft/houlsby.py is minillm's own method, "
                "checked against the paper's equations in parity/peft_methods.py); use --impl minillm")
    if method == "prefix" and training_args.activation_checkpointing:  # (--gradient_checkpointing is its alias)
        if impl == "hf":  # transformers 5.x GradientCheckpointingLayer sets cache=None: the prefix is gone
            return ("--peft prefix --gradient_checkpointing does not work with --impl hf: transformers' checkpointed "
                    "layers drop the KV cache that holds peft's prefix (a shape error at the first step); use --impl "
                    "minillm, or train without --gradient_checkpointing")
        if (training_args.activation_checkpointing_kwargs or {}).get("use_reentrant", False):  # minillm: False
            return ("--peft prefix with re-entrant activation checkpointing would not train the prefix correctly; "
                    "leave gradient_checkpointing_kwargs' use_reentrant unset or false")
    return None


def peft_record(peft_args: PeftArguments) -> dict[str, Any] | None:
    """What a prefix/prompt/adapter run trains, for run.json (LoRA has its own "lora" entry; None otherwise)."""
    if peft_args.peft in ("none", "lora"):
        return None
    return {"method": peft_args.peft,
            **{f: getattr(peft_args, f) for f, owners in _FLAG_METHODS.items() if peft_args.peft in owners}}


def check_fits(config, peft_args: PeftArguments, max_len: int) -> str | None:
    """What must fit the model: P + max_len positions (virtual tokens and prefixes take positions), an adapter
    bottleneck narrower than the hidden size."""
    P = peft_args.num_virtual_tokens
    if peft_args.peft in ("prefix", "prompt") and P + max_len > config.max_position_embeddings:
        return (f"--num_virtual_tokens {P} + --max_len {max_len} exceeds the model's max_position_embeddings "
                f"{config.max_position_embeddings} (the virtual tokens take positions 0..{P - 1})")
    if peft_args.peft == "adapter" and peft_args.adapter_bottleneck >= config.hidden_size:
        return (f"--adapter_bottleneck {peft_args.adapter_bottleneck}: must be smaller than the model's hidden_size "
                f"{config.hidden_size} (the adapter is a bottleneck, m < d)")
    return None


def add_peft(model: nn.Module, impl: str, peft_args: PeftArguments, seed: int, tokenizer,
             tokenizer_path: str) -> nn.Module:
    """Wrap `model` with the chosen method (minillm's for impl minillm, peft's for hf); prints peft's
    trainable-parameter line. Returns the model to train (a wrapper for prefix/prompt tuning)."""
    method = peft_args.peft
    if method == "none":
        return model
    torch.manual_seed(seed)  # both sides draw the new weights in the same order from here
    kwargs = settings(peft_args, tokenizer_path)
    if impl == "hf":
        config_class = {"lora": peft.LoraConfig, "prompt": peft.PromptTuningConfig,
                        "prefix": peft.PrefixTuningConfig, "ia3": peft.IA3Config}[method]
        model = peft.get_peft_model(model, config_class(task_type="CAUSAL_LM", **kwargs))
        model.print_trainable_parameters()
        return model
    model = apply(model, BY_NAME[method].config_class(**kwargs, **_text_ids(peft_args, lambda t: tokenizer(t)["input_ids"])))
    print(trainable_summary(model), flush=True)
    return model


# ---- saving and resuming minillm's prefix/prompt/adapter runs -------------------------------------------------

def minillm_adapted(model: nn.Module) -> bool:
    """A minillm model with a fine-tuning method applied (minillm.peft.save_adapter writes its adapter)."""
    return method_of(model) is not None


def prompt_learning(model: nn.Module) -> bool:
    """A peft model with prompt or prefix tuning (whose Trainer resume reads only the saved table)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def save_trainable(model: nn.Module, directory: str) -> None:
    """Every trainable tensor by name (a checkpoint's resume state for prefix/prompt/adapter runs)."""
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, os.path.join(directory, TRAINABLE_FILE), metadata={"format": "pt"})


def load_trainable(model: nn.Module, checkpoint: str) -> None:
    """Restore what save_trainable wrote into the same set-up; the names and shapes must match exactly."""
    path = os.path.join(checkpoint, TRAINABLE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint}: no {TRAINABLE_FILE}, so the trained prefix/prompt/adapter tensors cannot "
                         "be restored (a checkpoint of another set-up?)")
    copy_matching({n: p for n, p in model.named_parameters() if p.requires_grad}, read_safetensors_file(path), path)

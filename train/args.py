"""The training scripts' arguments: the dataclasses, parsing, the default learning rates, and every check made
before any work starts.

The scripts follow the course's chapter-6 pretrain.py/finetune.py (HfArgumentParser over three dataclasses, the
HF Trainer, DeepSpeed via `--deepspeed`). What is unusual here, and why:
- On a machine without CUDA `use_cpu` defaults to True. Without it a 2-rank DeepSpeed run on CPU
  trains silently wrong: the Trainer thinks world_size=1 and does not split the data (see
  shared/notes/deepspeed-cpu.md). On a GPU machine it stays False.
- Launched on several CPU ranks, the process group is joined with `--ddp_timeout` (start_process_group): transformers
  passes it on GPU only, and gloo's default would keep the other ranks waiting 30 minutes on a rank that hangs.
- `--learning_rate` defaults by mode and model width (DEFAULT_LR, measured), not to the Trainer's 5e-5.
- A stale DeepSpeed op build lock (left by a process killed while loading the op) makes every later
  run hang silently; `check_args` refuses to start and names the file instead.
- Bad numbers, missing files and an output directory that overlaps an input are refused with one sentence
  (train/safety.py), before the model is built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import transformers
from transformers import HfArgumentParser

from minillm.config import PRESETS
from minillm.generate import adapter_instead_of_model

from train import peft_methods, safety
from train.ops import pin_op_build_env
from train.peft_methods import PeftArguments

# DeepSpeed compiles its C++ ops on first use into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
# Keep them next to the venv, as the Makefile does, so a launch outside `make` reuses the same build, and build
# them with the venv's own ninja whatever PATH says (two ninjas recompiled the op at every switch: why in
# train/ops.py pin_op_build_env). At import: every script importing this module is covered, launched any way.
pin_op_build_env()

# --learning_rate when none is given: the Trainer's 5e-5 barely moves a from-scratch or LoRA run. Measured on the
# bundled data, tiny preset, batch 16, cosine (train/lr_curves.py -> lr_curves.json/.png; mean of the last 10 steps):
#   from scratch, 200 steps:  5e-5 8.35 -> 7.73   1e-3 -> 2.84   3e-3 -> 1.46
#   full SFT, 300 steps:      5e-5 5.99 -> 3.44 (0/6 frequent questions right)   1e-3 -> 1.01 (4/6)   3e-3 -> 0.74 (6/6)
#   LoRA r=32, 300 steps:     5e-5 -> 4.15 (0/6)   2e-3 -> 3.01 (1/6)   5e-3 -> 2.99 (1/6)   2e-2 -> 5.08 (0/6)
# The other --peft methods: the best held-out loss of train/compare.py's sweep (50 steps from its 60-step base, the
# figures are in its METHODS comment): prefix (+ projection) 3e-2, prompt 0.3 (Lester et al. use 0.3 too), Houlsby
# adapter 1e-2. The virtual-token methods train a few vectors that reach the output only through attention.
# (IA)^3, the same sweep (one process, the same batches; held-out loss from 7.235): 3e-3 7.232, 1e-2 7.227, 3e-2 7.215,
# 0.1 7.185, 0.3 7.131, 1 7.124, 3 7.221: 1. Its vectors start at 1 and scale activations, so steps of order 1 are
# what moves them; wider models use the paper's 3e-3 (Liu et al. 2022, T0-3B; not measured here).
# For models wider than CPU scale (hidden > 512) the usual published values are used instead (not measured here).
DEFAULT_LR = {"scratch": (3e-3, 3e-4), "full": (3e-3, 2e-5), "lora": (5e-3, 2e-4),  # (hidden <= 512, wider)
              "prefix": (3e-2, 1e-2), "prompt": (3e-1, 3e-2), "ia3": (1.0, 3e-3), "adapter": (1e-2, 1e-4)}

# --report_to value -> the module it needs (transformers' integrations import these lazily).
_REPORTERS = {"tensorboard": ("tensorboard", "tensorboardX"), "swanlab": ("swanlab",), "wandb": ("wandb",),
              "mlflow": ("mlflow",), "trackio": ("trackio",), "comet_ml": ("comet_ml",)}
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---- arguments -------------------------------------------------------------------------------------------

@dataclass
class ModelArguments:
    impl: Literal["minillm", "hf"] = field(
        default="minillm", metadata={"help": "minillm: the hand-written CausalLM; hf: transformers' model"})
    config_name: str | None = field(
        default=None, metadata={"help": f"config.json (or its directory) or a minillm preset {sorted(PRESETS)}; "
                                        "default 'tiny'. Ignored with --model_name_or_path"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "HF-format checkpoint directory to continue from (none: random init)"})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "tokenizer directory (tokenizer.json); default: the bundled tokenizer, "
                                        "or the model's own when --model_name_or_path has one"})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype of the weights; mixed precision is --bf16/--fp16 instead"})


@dataclass
class DataTrainingArguments:
    train_files: list[str] | None = field(default=None, metadata={"help": "jsonl file(s); default: bundled sample"})
    validation_files: list[str] | None = field(default=None, metadata={"help": "jsonl file(s) for evaluation"})
    block_size: int | None = field(
        default=None, metadata={"help": "pretrain: tokens per training sequence (default min(512, model max))"})
    max_len: int = field(default=512, metadata={"help": "SFT: conversations are truncated to this many tokens"})
    max_train_samples: int | None = field(default=None, metadata={"help": "keep only the first N training samples"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for tokenization"})
    streaming: bool = field(
        default=False, metadata={"help": "read and chunk the data lazily (needs --max_steps); no cache"})
    validation_split_percentage: float = field(
        default=0, metadata={"help": "pretrain, without --validation_files: the first N%% of the training blocks "
                                     "are held out for evaluation (as run_clm); 0: none"})
    cache_dir: str | None = field(
        default=None, metadata={"help": "preprocessed-data cache (default $MINILLM_CACHE or ~/.cache/minillm)"})
    packing: bool = field(
        default=False, metadata={"help": "SFT: pack conversations into rows of --max_len tokens (best fit over a "
                                         "shuffled buffer); positions restart per conversation, no attention across "
                                         "conversations; the loss is the unpacked loss (minillm.pack)"})
    packing_buffer: int = field(
        default=1000, metadata={"help": "SFT --packing: conversations packed together (a larger buffer packs "
                                        "tighter; a conversation only shares rows with its buffer)"})
    document_mask: bool = field(
        default=False, metadata={"help": "pretrain: attention stops at each EOS (positions restart per document, "
                                          "as Llama 3 trains); off by default"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    def __post_init__(self):
        # transformers' __post_init__ sets up the device, which joins the process group: join it first, with the timeout
        start_process_group(self)
        super().__post_init__()

    # transformers 5 dropped this flag; the course's resume logic (and run_clm's) uses it.
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start afresh in output_dir: its checkpoint-N directories are removed first"})
    allow_changed_resume: bool = field(
        default=False, metadata={"help": "resume even though the implementation, model, data, sequence length or "
                                         "global batch (ranks x per-device batch x accumulation steps) differ from "
                                         "the run record (run.json) of the checkpoint's run"})


def start_process_group(training_args: TrainingArguments) -> None:
    """Join the ranks' process group with --ddp_timeout on CPU, when a launcher started several ranks.

    transformers gives accelerate the timeout on the GPU and DeepSpeed paths only (TrainingArguments._setup_devices):
    on CPU the gloo group got its default of 30 minutes, so a rank that hangs kept the others waiting that long, and
    so did a node that never arrives. accelerate and DeepSpeed join a group only when none exists: they use this one.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not training_args.use_cpu or dist.is_initialized():
        return
    dist.init_process_group(backend=training_args.ddp_backend or "gloo",
                            timeout=timedelta(seconds=training_args.ddp_timeout))


def fail(msg: str) -> None:
    """Stop with a one-line error (no traceback): for bad arguments and missing files."""
    raise SystemExit(f"{Path(sys.argv[0]).name}: error: {msg}")


def cache_root(data_args: DataTrainingArguments) -> Path:
    """--cache_dir, else $MINILLM_CACHE, else ~/.cache/minillm (train/caches.py keeps the preprocessed data there)."""
    return Path(data_args.cache_dir or os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm")


# ---- parsing, the default learning rate --------------------------------------------------------------------

def parse_args(dataclasses: tuple, default_output_dir: str, argv: list[str] | None = None) -> tuple:
    parser = HfArgumentParser(dataclasses)
    # Defaults that make `python train/pretrain.py` with no arguments do something sensible on any machine.
    parser.set_defaults(output_dir=default_output_dir, use_cpu=not torch.cuda.is_available(), logging_steps=10)
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):  # the course's `pretrain.py args.json` form
            d = json.loads(Path(argv[0]).read_text())
            parsed = parser.parse_dict(d)
            if "learning_rate" not in d:
                parsed = parser.parse_dict({**d, "learning_rate": default_learning_rate(parsed)})
            return parsed
        parsed = parser.parse_args_into_dataclasses(args=argv)
        if not any(a.split("=")[0] in ("--learning_rate", "--learning-rate") for a in argv):
            # re-parsed rather than patched: DeepSpeed's "auto" lr is filled in TrainingArguments.__post_init__
            lr = default_learning_rate(parsed)
            parsed = parser.parse_args_into_dataclasses(args=[*argv, "--learning_rate", str(lr)])
        return parsed
    except ValueError as e:  # TrainingArguments.__post_init__ refusing a combination: a sentence, not a traceback
        fail(str(e).strip().splitlines()[0])


def default_learning_rate(parsed: tuple) -> float:
    """The learning rate for a run given none (DEFAULT_LR): by mode (from scratch, full SFT, a --peft method) and
    width."""
    model_args = next(a for a in parsed if isinstance(a, ModelArguments))
    peft_args = next((a for a in parsed if isinstance(a, PeftArguments)), None)
    mode = peft_args.peft if peft_args is not None and peft_args.peft != "none" else \
        "full" if model_args.model_name_or_path else "scratch"
    hidden = PRESETS["tiny"].hidden_size
    src = model_args.model_name_or_path or model_args.config_name
    if src in PRESETS:
        hidden = PRESETS[src].hidden_size
    elif src:
        cfg = Path(src, "config.json") if os.path.isdir(src) else Path(src)
        try:
            hidden = int(json.loads(cfg.read_text()).get("hidden_size", hidden))
        except (OSError, ValueError, TypeError):
            pass  # a missing/broken config is reported by check_args with its name
    lr = DEFAULT_LR[mode][0 if hidden <= 512 else 1]
    what = {"scratch": "from-scratch pretraining", "full": "full fine-tuning", "lora": "LoRA"}.get(mode,
                                                                                                   f"--peft {mode}")
    if os.environ.get("RANK", "0") == "0":
        print(f"--learning_rate not given: using {lr:g} for {what} of a hidden_size-{hidden} model "
              "(train/args.py DEFAULT_LR says why)", flush=True)
    return lr


# ---- checks before any work ------------------------------------------------------------------------------

def check_args(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments,
               default_train: str, peft_args: PeftArguments | None = None) -> None:
    """Fill the bundled defaults and refuse missing files / missing packages / bad numbers before any work."""
    if err := safety.forbid_unpickling_code():
        fail(err)
    if training_args.deepspeed:
        stage = check_ds_config(training_args.deepspeed)
        if stage == 3 and model_args.impl == "hf" and model_args.model_name_or_path and model_args.dtype != "float32":
            # measured: a --dtype bfloat16 run trained and saved float32 weights
            fail(f"--dtype {model_args.dtype} with --impl hf --model_name_or_path under ZeRO-3: transformers loads the "
                 "weights inside deepspeed.zero.Init, which gives them the DeepSpeed config's dtype (float32 here), so "
                 "--dtype would be silently ignored; use --bf16/--fp16 (mixed precision), or ZeRO-2")
        if stage == 3 and peft_args is not None and peft_args.peft in ("prefix", "prompt", "adapter"):
            # (and peft's save of a prompt encoder under ZeRO-3 runs its forward on the saving rank alone: it hangs)
            fail(f"--peft {peft_args.peft} under ZeRO-3 is not supported (its few trainable tensors gain nothing "
                 "from partitioning): use ZeRO-2, e.g. --deepspeed ds_configs/zero2.json")
    mpi = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"))
    if training_args.deepspeed and not mpi and not all(k in os.environ for k in _LAUNCHER_ENV):
        # DeepSpeed would fall back to MPI discovery and die in an mpi4py import
        fail("--deepspeed needs a launcher: run `deepspeed --num_gpus N train/...` or `torchrun --nproc_per_node N "
             "train/...`, or set " + ", ".join(k for k in _LAUNCHER_ENV) + " for a single process "
             "(e.g. RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500)")
    if err := safety.check_numbers(model_args, data_args, training_args, peft_args):
        fail(err)
    if peft_args is not None and (err := peft_methods.check_peft_args(peft_args, model_args.impl, data_args.packing,
                                                                      training_args)):
        fail(err)
    if not data_args.train_files:
        data_args.train_files = [default_train]
    for flag in ("train_files", "validation_files"):
        for f in getattr(data_args, flag) or []:
            if not os.path.isfile(f):
                fail(f"--{flag}: no such file: {f}")
    for flag in ("model_name_or_path", "tokenizer_name"):
        path = getattr(model_args, flag)
        if path and not os.path.isdir(path):
            fail(f"--{flag}: no such directory: {path} (minillm never downloads from the Hub)")
    if model_args.model_name_or_path and (hint := adapter_instead_of_model(
            model_args.model_name_or_path, flag="--model_name_or_path",
            then="fine-tune from its base model instead: --model_name_or_path {base}")):
        fail(hint)
    name = model_args.config_name
    if name and name not in PRESETS and not os.path.exists(name):
        fail(f"--config_name: {name!r} is neither a config.json path nor a preset {sorted(PRESETS)}")
    if data_args.packing_buffer < 1:
        fail(f"--packing_buffer must be >= 1, got {data_args.packing_buffer}")
    if (data_args.packing or data_args.document_mask) and training_args.use_cache:
        # transformers looks for document boundaries in position_ids only without a cache
        fail("--packing/--document_mask need --use_cache false: with a cache transformers' model would attend "
             "across documents")
    pct = data_args.validation_split_percentage
    if not 0 <= pct < 100:
        fail(f"--validation_split_percentage must be in [0, 100), got {pct}")
    if data_args.streaming and pct > 0:
        fail("--validation_split_percentage needs the token store: a stream cannot hold its first blocks out; "
             "use --validation_files with --streaming")
    if data_args.streaming and training_args.max_steps <= 0:
        fail("--streaming needs --max_steps (a stream has no length to derive the number of steps from)")
    inputs = {"model_name_or_path": model_args.model_name_or_path, "tokenizer_name": model_args.tokenizer_name,
              "config_name": model_args.config_name if name not in PRESETS else None,
              "train_files": data_args.train_files, "validation_files": data_args.validation_files}
    if err := safety.check_paths(training_args.output_dir, inputs):
        fail(err)
    writable = {"--output_dir": training_args.output_dir}
    if not data_args.streaming:
        writable["--cache_dir"] = cache_root(data_args)
    for flag, path in writable.items():
        if err := safety.check_writable(flag, path):
            fail(err)
    if training_args.deepspeed:
        check_stale_op_lock()
        announce_op_build(training_args)
    for r in training_args.report_to or []:
        if r in _REPORTERS and not any(importlib.util.find_spec(m) for m in _REPORTERS[r]):
            how = "pip install -e '.[swanlab]'" if r == "swanlab" else f"pip install {_REPORTERS[r][0]}"
            fail(f"--report_to {r}: the {_REPORTERS[r][0]} package is not installed ({how}, or use --report_to none)")


def check_ds_config(cfg: str | dict) -> int | None:
    """ZeRO-3 must gather the weights for the final save, or the model / adapter written would be empty.
    Returns the ZeRO stage."""
    zero = ds_config(cfg).get("zero_optimization", {})
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        fail(f"--deepspeed {cfg}: ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true in "
             "zero_optimization, otherwise the saved model (or LoRA adapter) would hold no weights")
    return zero.get("stage")


def ds_config(cfg: str | dict) -> dict:
    """The --deepspeed config as a dict (a path is read; the Trainer also accepts the dict itself)."""
    try:
        d = json.loads(Path(cfg).read_text()) if isinstance(cfg, str) else cfg
    except (OSError, ValueError) as e:
        fail(f"--deepspeed {cfg}: not a readable JSON config ({e})")
    if not isinstance(d, dict):
        fail(f"--deepspeed {cfg}: not a JSON object")
    return d


def announce_op_build(training_args: TrainingArguments) -> None:
    """Pin how DeepSpeed's CPU op is built (one ninja per venv: train/ops.py pin_op_build_env says why), then
    say before a silent 1-3 min wait that it is about to be compiled, and why (ninja's own reason)."""
    from train.ops import OP, op_build_reason, op_root, pin_op_build_env

    pin_op_build_env()  # every rank: whichever rank takes the build lock first runs ninja
    if not training_args.use_cpu or os.environ.get("RANK", "0") != "0":
        return
    if (reason := op_build_reason()) is not None:
        print(f"DeepSpeed on CPU compiles its C++ op {OP} (shared-memory collectives between ranks) into "
              f"{op_root()}: 1-3 minutes, once per venv; why: {reason}", flush=True)


def check_stale_op_lock(max_age_s: float = 600) -> None:
    """Refuse to start when a DeepSpeed op's build lock is stale: the run would hang forever.

    Every process's first DeepSpeed op load (the CPU build loads deepspeed_shm_comm) takes
    `<TORCH_EXTENSIONS_DIR>/<op>/lock` while ninja checks the compiled op (~1 s; a real compile takes
    1-3 min). A process killed in that window leaves the file behind, and every later run waits on it
    silently.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        age = now - lock.stat().st_mtime
        if age > max_age_s:
            fail(f"{lock} is {age / 60:.0f} min old: a stale build lock left by a killed process, and DeepSpeed "
                 f"would wait on it forever. Delete it (rm {lock}) if no compile is running.")


"""What train/pretrain.py and train/finetune.py share: arguments, setup, model building, saving, teardown.

The scripts follow the course's chapter-6 pretrain.py/finetune.py (HfArgumentParser over three
dataclasses, the HF Trainer, DeepSpeed via `--deepspeed`, `get_last_checkpoint` resume, Python
logging). What is unusual here, and why:
- `--impl minillm|hf` picks the model: minillm's hand-written CausalLM or transformers' model of the
  same architecture. The hf model is built *from the minillm one* (same seed -> minillm init -> strict
  copy of the state dict), so both start from identical weights and their loss curves compare step by step.
- On a machine without CUDA `use_cpu` defaults to True. Without it a 2-rank DeepSpeed run on CPU
  trains silently wrong: the Trainer thinks world_size=1 and does not split the data (see
  shared/notes/deepspeed-cpu.md). On a GPU machine it stays False.
- `Trainer` below is the HF Trainer taught to save a minillm model the way it saves its own:
  config.json + model.safetensors (or a peft-format adapter), so every checkpoint-N and the final
  output load in transformers/peft as well as in minillm.
- A stale DeepSpeed op build lock (left by a process killed while loading the op) makes every later
  run hang silently; `check_args` refuses to start and names the file instead.
- `teardown()` ends the process group explicitly: gloo's threads torn down at interpreter exit
  occasionally crash a finished run ("terminate called without an active exception").
- What protects the user (train/safety.py): every torch.load is weights-only (DeepSpeed's resume
  included), a non-finite loss or gradient norm stops the run, bad numbers and an output directory that
  overlaps an input are refused, run.json records what a run trains on and a resume is checked against
  it, and checkpoints and the final model are staged and renamed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import save_file
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, PreTrainedTokenizerFast
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import rotate_checkpoints
from transformers import trainer_pt_utils

from minillm.infra import corpus
from minillm.infra.checkpoint import DTYPES, staged_dir
from minillm.config import PRESETS, ModelConfig
from minillm.peft import files as peft_format
from minillm.generate import adapter_instead_of_model
from minillm.peft.lora import load_adapter, lora_layers
from minillm.model import CausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peft_methods  # noqa: E402
import safety  # noqa: E402
from peft_methods import PeftArguments, load_trainable, minillm_adapted, prompt_learning, save_trainable  # noqa: E402
from safety import Diverged  # noqa: E402

logger = logging.getLogger("minillm.train")

# DeepSpeed compiles its C++ ops on first use into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
# Keep them next to the venv, as the Makefile does, so a launch outside `make` reuses the same build.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

# --learning_rate when none is given: the Trainer's 5e-5 barely moves a from-scratch or LoRA run. Measured on the
# bundled data, tiny preset, batch 16, cosine (train/lr_curves.py -> lr_curves.json/.png; mean of the last 10 steps):
#   from scratch, 200 steps:  5e-5 8.35 -> 7.73   1e-3 -> 2.84   3e-3 -> 1.46
#   full SFT, 300 steps:      5e-5 5.99 -> 3.44 (0/6 frequent questions right)   1e-3 -> 1.01 (4/6)   3e-3 -> 0.74 (6/6)
#   LoRA r=32, 300 steps:     5e-5 -> 4.15 (0/6)   2e-3 -> 3.01 (1/6)   5e-3 -> 2.99 (1/6)   2e-2 -> 5.08 (0/6)
# The other --peft methods: the best held-out loss of train/compare.py's sweep (50 steps from its 60-step base, the
# figures are in its METHODS comment): prefix (+ projection) 3e-2, prompt 0.3 (Lester et al. use 0.3 too), Houlsby
# adapter 1e-2. The virtual-token methods train a few vectors that reach the output only through attention.
# For models wider than CPU scale (hidden > 512) the usual published values are used instead (not measured here).
DEFAULT_LR = {"scratch": (3e-3, 3e-4), "full": (3e-3, 2e-5), "lora": (5e-3, 2e-4),  # (hidden <= 512, wider)
              "prefix": (3e-2, 1e-2), "prompt": (3e-1, 3e-2), "adapter": (1e-2, 1e-4)}

_CHECKPOINT = re.compile(r"checkpoint-[0-9]+")  # the Trainer's checkpoint directory names
# --report_to value -> the module it needs (transformers' integrations import these lazily).
_REPORTERS = {"tensorboard": ("tensorboard", "tensorboardX"), "swanlab": ("swanlab",), "wandb": ("wandb",),
              "mlflow": ("mlflow",), "trackio": ("trackio",), "comet_ml": ("comet_ml",)}


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
        default=0, metadata={"help": "pretrain, without --validation_files: the first N% of the training blocks "
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
    # transformers 5 dropped this flag; the course's resume logic (and run_clm's) uses it.
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start afresh in output_dir: its checkpoint-N directories are removed first"})
    allow_changed_resume: bool = field(
        default=False, metadata={"help": "resume even though the implementation, model, data or sequence length "
                                         "differ from the run record (run.json) of the checkpoint's run"})


def fail(msg: str) -> None:
    """Stop with a one-line error (no traceback): for bad arguments and missing files."""
    raise SystemExit(f"{Path(sys.argv[0]).name}: error: {msg}")


def read_or_fail(reader, files: list[str]):
    """Records of every file from a minillm.infra.corpus reader; a malformed line stops the run with its file:line."""
    for path in files:
        try:
            yield from reader(path)
        except ValueError as e:  # "file:line: what is wrong"
            fail(str(e))


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
              "(train/common.py DEFAULT_LR says why)", flush=True)
    return lr


_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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
              "config_name": model_args.config_name if name not in PRESETS else None}
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
    try:
        d = json.loads(Path(cfg).read_text()) if isinstance(cfg, str) else cfg
    except (OSError, ValueError) as e:
        fail(f"--deepspeed {cfg}: not a readable JSON config ({e})")
    zero = d.get("zero_optimization", {}) if isinstance(d, dict) else {}
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        fail(f"--deepspeed {cfg}: ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true in "
             "zero_optimization, otherwise the saved model (or LoRA adapter) would hold no weights")
    return zero.get("stage")


def announce_op_build(training_args: TrainingArguments) -> None:
    """Say before a silent 1-3 min wait that DeepSpeed is about to compile its CPU communication op, and why."""
    if not training_args.use_cpu or os.environ.get("RANK", "0") != "0":
        return
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if not list(root.glob("deepspeed_shm_comm/*.so")):
        print(f"DeepSpeed on CPU first compiles its C++ op deepspeed_shm_comm (shared-memory collectives between "
              f"ranks) into {root}: 1-3 minutes, once; later runs reuse it", flush=True)


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


# ---- setup: logging, resume ------------------------------------------------------------------------------

def setup_logging(training_args: TrainingArguments) -> None:
    """The course's logging setup: one format for our logger, transformers' and datasets'."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(f"Process rank: {training_args.process_index}/{training_args.world_size}, device: "
                   f"{training_args.device}, distributed training: {training_args.parallel_mode.value}, "
                   f"bf16: {training_args.bf16}, fp16: {training_args.fp16}")
    logger.info(f"Training/evaluation parameters {training_args}")


def find_resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """The course's get_last_checkpoint logic: resume from the last checkpoint-N in output_dir.

    A non-empty output_dir without checkpoints is refused (it would be overwritten) unless
    --overwrite_output_dir. An explicit --resume_from_checkpoint wins. Unlike get_last_checkpoint, a
    checkpoint without trainer_state.json (the Trainer writes it last) is skipped: a run killed while
    saving leaves such a half-written directory, and resuming from it would crash.
    """
    out = training_args.output_dir
    # Every rank enters main_process_first (it is a barrier); only the saving process deletes.
    with training_args.main_process_first(desc="cleaning the output directory"):
        if training_args.should_save and os.path.isdir(out):
            for path in safety.clean_staging(out):
                logger.warning(f"Removed {path}: an unfinished save left by a killed run")
            if training_args.overwrite_output_dir and not training_args.resume_from_checkpoint:
                # Start afresh for real: an older run's checkpoint left here would be resumed by the next plain run.
                for d in sorted(os.listdir(out)):
                    if _CHECKPOINT.fullmatch(d) and os.path.isdir(os.path.join(out, d)):
                        shutil.rmtree(os.path.join(out, d))
                        logger.warning(f"--overwrite_output_dir: removed {os.path.join(out, d)} of an earlier run")
                Path(out, safety.RUN_RECORD).unlink(missing_ok=True)
    if training_args.resume_from_checkpoint or not os.path.isdir(out) or training_args.overwrite_output_dir:
        return training_args.resume_from_checkpoint
    ckpts = sorted((d for d in os.listdir(out) if _CHECKPOINT.fullmatch(d) and os.path.isdir(os.path.join(out, d))),
                   key=lambda d: int(d.split("-")[1]), reverse=True)
    for d in ckpts:
        try:
            json.loads(Path(out, d, "trainer_state.json").read_text())
        except (OSError, ValueError):
            logger.warning(f"Skipping {os.path.join(out, d)}: incomplete (the run was killed while saving it)")
            continue
        logger.info(f"Checkpoint found: resuming from {os.path.join(out, d)}. "
                    "Use --overwrite_output_dir to start afresh.")
        return os.path.join(out, d)
    if set(os.listdir(out)) - {safety.RUN_RECORD} and not ckpts:
        fail(f"output directory {out} is not empty and holds no checkpoint-N to resume from; "
             "use --overwrite_output_dir to train into it anyway, or another --output_dir")
    return None


def run_record(script: str, model_args: ModelArguments, data_args: DataTrainingArguments,
               sequence_length: dict[str, int], peft_args: PeftArguments | None = None) -> dict[str, Any]:
    """What this run trains: kept as run.json in the output directory and in every checkpoint."""
    lora = None
    if peft_args is not None and peft_args.use_lora:
        lora = {"r": peft_args.lora_r, "alpha": peft_args.lora_alpha, "dropout": peft_args.lora_dropout,
                "target_modules": peft_args.lora_target_modules}
    source = model_args.model_name_or_path or model_args.config_name or "tiny"
    return {"script": script, "impl": model_args.impl,
            "model": os.path.abspath(source) if os.path.exists(source) else source,
            "tokenizer": os.path.abspath(model_args.tokenizer_name) if model_args.tokenizer_name else None,
            "dtype": model_args.dtype, "data": safety.file_identity(data_args.train_files),
            "validation": safety.file_identity(data_args.validation_files),
            "sequence_length": sequence_length, "lora": lora,
            "peft": peft_methods.peft_record(peft_args) if peft_args is not None else None,
            # None when off, so a record written before these flags existed still matches an unpacked run
            "packing": {"packing": data_args.packing, "buffer": data_args.packing_buffer if data_args.packing else None,
                        "document_mask": data_args.document_mask}
            if data_args.packing or data_args.document_mask else None,
            # the held-out share changes which blocks train; None when unused (records from before the flag match)
            "validation_split": data_args.validation_split_percentage
            if data_args.validation_split_percentage and not data_args.validation_files else None}


def check_resume(training_args: TrainingArguments, checkpoint: str | None, record: dict[str, Any]) -> None:
    """Say loudly what a resume continues from; refuse a changed run unless --allow_changed_resume; write run.json.

    The record compared is the checkpoint's own run.json (written into every checkpoint), else the output
    directory's. A data file counts as changed when its size or modification time differ.
    """
    if checkpoint:
        saved_by_deepspeed = any(Path(checkpoint).glob("global_step*"))
        if saved_by_deepspeed != bool(training_args.deepspeed):
            # the optimizer and schedule live in DeepSpeed's files in one case and in optimizer.pt / scheduler.pt in
            # the other: the Trainer would restart them silently, or fail to find a checkpoint
            fail(f"{checkpoint} was saved by a run {'with' if saved_by_deepspeed else 'without'} DeepSpeed: resume "
                 f"it {'with the same --deepspeed config' if saved_by_deepspeed else 'without --deepspeed'} (its "
                 "optimizer and learning-rate schedule are stored in that form), or --overwrite_output_dir to "
                 "start afresh")
        try:
            old = safety.read_run_record(checkpoint) or safety.read_run_record(os.path.dirname(checkpoint))
        except ValueError as e:
            fail(str(e))
        try:
            state = json.loads(Path(checkpoint, "trainer_state.json").read_text())
            where = f"step {state['global_step']} of {state['max_steps']}"
        except (OSError, ValueError, KeyError):
            where = "an unknown step"
        logger.warning(f"RESUMING from {checkpoint} ({where}); use --overwrite_output_dir to start afresh")
        old_lr = (old or {}).get("learning_rate")
        if old_lr is not None and old_lr != training_args.learning_rate:
            logger.warning(f"--learning_rate {training_args.learning_rate:g} has no effect on this resume: the "
                           f"optimizer and scheduler restored from {checkpoint} keep its run's peak {old_lr:g}. Use "
                           "--overwrite_output_dir to start afresh with the new learning rate")
        changes = safety.compare_run_record(old, record)
        if changes and not training_args.allow_changed_resume:
            fail(f"resuming {checkpoint} would continue a different run: " + "; ".join(changes) +
                 ". Pass --allow_changed_resume to continue it anyway, or --overwrite_output_dir to start afresh")
        for c in changes:
            logger.warning(f"--allow_changed_resume: the resumed run differs from {checkpoint}'s: {c}")
        record = {**record, "resumed_from": os.path.abspath(checkpoint), "changed_on_resume": changes}
        if old_lr is not None:
            record["learning_rate"] = old_lr  # what the resumed optimizer and schedule actually use
    record.setdefault("learning_rate", training_args.learning_rate)
    if training_args.should_save:
        safety.write_run_record(training_args.output_dir, record)


# ---- tokenizer, model --------------------------------------------------------------------------------------

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


# ---- the Trainer, saving minillm models in HF format ---------------------------------------------------------

class Trainer(transformers.Trainer):
    """transformers.Trainer that saves (and, for LoRA, reloads) a minillm CausalLM in HF/peft format, stops a
    diverging run, and writes every checkpoint under a temporary name first.

    For a model that is not a PreTrainedModel the stock Trainer writes only model.safetensors (and fails
    on tied weights); here checkpoints and the final model get config.json + model.safetensors, or a
    peft-format adapter for LoRA, like transformers' own models.
    Divergence: every optimizer step checks that the micro-steps' losses and the gradient norm are finite
    (DeepSpeed reports a non-finite norm as -1), agreed across ranks so all of them stop together, and
    raises Diverged before anything of that step is saved; a save also refuses non-finite weights.
    """

    def __init__(self, *args: Any, base_model_path: str | None = None, run_record: dict | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.base_model_path = base_model_path  # recorded in a saved adapter's config
        self.run_record = run_record  # copied into every checkpoint (what it was trained on)
        self._bad_loss: float | None = None
        self._staging: str | None = None

    # ---- divergence ----
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._bad_loss is None and not torch.isfinite(loss).all():
            self._bad_loss = loss.detach().float().mean().item()
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm)
        value = float(norm) if norm is not None else 0.0
        bad = self._bad_loss is not None or not math.isfinite(value) or value < 0
        flag = torch.tensor([float(bad)], device=self.args.device)
        if self.args.world_size > 1:  # a NaN on one rank must stop every rank, or the others hang
            flag = self.accelerator.gather(flag)
        if flag.max().item() > 0:
            shown = "non-finite" if value < 0 else f"{value:.4g}"  # DeepSpeed's -1 means inf/nan
            loss = f"loss {self._bad_loss}, " if self._bad_loss is not None else ""
            raise Diverged(f"training diverged at step {self.state.global_step + 1}: {loss}gradient norm {shown}")
        return norm

    def check_weights_finite(self) -> None:
        """Before a save, on every rank: the weights are finite (an update can overflow with a finite gradient).
        Under ZeRO-3 a rank sees only its partitions' placeholders here; the save itself checks what it writes."""
        model = self.accelerator.unwrap_model(self.model)
        bad = [n for n, p in model.named_parameters() if p.numel() and not torch.isfinite(p).all()]
        flag = torch.tensor([float(bool(bad))], device=self.args.device)
        if self.args.world_size > 1:
            flag = self.accelerator.gather(flag)
        if flag.max().item() > 0:
            raise Diverged(f"training diverged at step {self.state.global_step}: non-finite weights "
                           f"({', '.join(bad[:3]) if bad else 'on another rank'})")

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        if self.control.should_save:  # set by the step's callbacks just before: a checkpoint is about to be written
            self.check_weights_finite()
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    # ---- saving ----
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        if not isinstance(model, CausalLM) and not minillm_adapted(model):
            bad = safety.non_finite_tensors(state_dict if state_dict is not None else model.state_dict())
            if bad:
                raise Diverged(f"refusing to save non-finite weights ({', '.join(bad[:3])}) at step "
                               f"{self.state.global_step}")
            super()._save(output_dir, state_dict)
            if self._staging and prompt_learning(model):  # peft cannot resume a projected prefix from its file
                save_trainable(model, output_dir)
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info(f"Saving minillm model to {output_dir}")
        if state_dict is None or not zero3(self):
            # ZeRO-0/1/2 and plain runs: every rank holds the full weights in the module itself
            state_dict = model.state_dict()
        if bad := safety.non_finite_tensors(state_dict):
            raise Diverged(f"refusing to save non-finite weights ({', '.join(bad[:3])}) at step "
                           f"{self.state.global_step}")
        if lora_layers(model):
            # Under ZeRO-3 the live adapter parameters are partitions (empty on this rank): take them from the
            # consolidated state dict the Trainer gathered (stage3_gather_16bit_weights_on_model_save).
            peft_format.save_adapter(model, output_dir, base_model_name_or_path=self.base_model_path,
                                     state_dict=state_dict if zero3(self) else None)
        elif minillm_adapted(model):  # prefix, prompt, Houlsby: peft's files (ZeRO-3 is refused for these)
            peft_format.save_adapter(model, output_dir, base_model_name_or_path=self.base_model_path)
            if self._staging:  # a checkpoint: what a resume without DeepSpeed restores (peft_methods says why)
                save_trainable(model, output_dir)
        else:
            config = model.config.to_hf()
            tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
            if model.config.tie_word_embeddings:
                tensors.pop("lm_head.weight", None)  # stored once, as transformers does
            config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
            Path(output_dir, "config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(tensors, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, self._staging) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """checkpoint-N is written as .tmp-checkpoint-N/checkpoint-N and renamed once every rank has finished:
        a killed or failing save never leaves a checkpoint-N that a resume would pick."""
        run_dir = self._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        self._staging = safety.STAGING + name
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        staged, final = os.path.join(run_dir, safety.STAGING + name), os.path.join(run_dir, name)
        if self.args.should_save and self.run_record is not None:
            safety.write_run_record(os.path.join(staged, name), self.run_record)
        self.accelerator.wait_for_everyone()  # DeepSpeed and the RNG files are written by every rank
        if self.args.should_save:
            safety.normalise_modes(os.path.join(staged, name))
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staged, name), final)
            shutil.rmtree(staged)
            best = self.state.best_model_checkpoint
            if best and safety.STAGING in best:  # the Trainer noted the staged path
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(final, "trainer_state.json"))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _load_best_model(self) -> None:
        """--load_best_model_at_end without DeepSpeed: an adapter run reloads the best checkpoint as a resume does
        (the stock Trainer looks for pytorch_model.bin, or for peft a table it cannot load into a projected prefix)."""
        target = self.accelerator.unwrap_model(self.model)
        if self.is_deepspeed_enabled or not (minillm_adapted(target) or prompt_learning(target)):
            return super()._load_best_model()
        logger.info(f"Loading best model from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.accelerator.unwrap_model(model or self.model)
        if isinstance(target, CausalLM) and lora_layers(target):  # stock Trainer only knows peft adapters
            load_adapter(target, resume_from_checkpoint)
            return
        if minillm_adapted(target) or prompt_learning(target):  # prefix, prompt, Houlsby (peft's too)
            try:
                load_trainable(target, resume_from_checkpoint)
            except ValueError as e:
                fail(str(e))
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def zero3(trainer: transformers.Trainer) -> bool:
    return bool(trainer.is_deepspeed_enabled and
                trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)


def save_final(trainer: Trainer, tokenizer, output_dir: str) -> None:
    """The final model in HF format (or the adapter in peft format) with the tokenizer files alongside.

    Written into a staging directory beside output_dir, then each file renamed into it (minillm.infra.checkpoint's
    staged_dir): a save that fails (a full disk, non-finite weights) leaves the previous model loadable.
    """
    if trainer.args.should_save:
        with staged_dir(output_dir) as staged:
            trainer.save_model(str(staged))
            tokenizer.save_pretrained(staged)
        logger.info(f"Saved the final model and tokenizer to {output_dir}")
    else:
        trainer.save_model(output_dir)  # its part of the collectives (ZeRO-3 gathers the weights); writes nothing
    trainer.accelerator.wait_for_everyone()


def last_checkpoint(output_dir: str) -> str | None:
    done = [d for d in os.listdir(output_dir) if _CHECKPOINT.fullmatch(d)
            and os.path.isfile(os.path.join(output_dir, d, "trainer_state.json"))] if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, max(done, key=lambda d: int(d.split("-")[1]))) if done else None


def train_and_save(trainer: Trainer, checkpoint: str | None, tokenizer, train_samples: int | None,
                   eval_extra=None) -> None:
    """The course's ending of both scripts: train (resuming if asked), save the final model with the tokenizer,
    log and save the metrics and state, evaluate when there is a validation set, tear down.
    eval_extra(metrics) may add derived eval metrics (pretraining adds perplexity)."""
    logger.info("Starting training" + (f", resuming from {checkpoint}" if checkpoint else ""))
    safe = safety.resume_safe_globals() if trainer.is_deepspeed_enabled else []
    try:
        with torch.serialization.safe_globals(safe):  # what DeepSpeed's checkpoints may unpickle, nothing more
            result = trainer.train(resume_from_checkpoint=checkpoint)
            trainer.check_weights_finite()
            save_final(trainer, tokenizer, trainer.args.output_dir)
    except pickle.UnpicklingError as e:
        with trainer_pt_utils.safe_globals():  # numpy's RNG state, which the Trainer allow-lists for rng_state_*.pth
            bad = safety.unloadable_files(checkpoint, safe) if checkpoint else []
        fail(f"refusing to load {', '.join(bad) if bad else checkpoint}: it holds pickled objects other than "
             f"tensors and plain data, and loading them could run code ({str(e).splitlines()[0][:200]})")
    except Diverged as e:
        last = last_checkpoint(trainer.args.output_dir)
        teardown()
        fail(f"{e}. Stopped; the final model was not saved"
             + (f"; the last good checkpoint is {last}" if last else "; no checkpoint was saved before it")
             + ". Try a lower --learning_rate")
    metrics = {**result.metrics, "peak_memory_mb": peak_memory_mb()}
    if train_samples is not None:
        metrics["train_samples"] = train_samples
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        if eval_extra is not None:
            eval_extra(metrics)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if trainer.args.should_save:
        save_loss_plot(trainer.state.log_history, Path(trainer.args.output_dir) / "loss.png")
    teardown()


def save_loss_plot(history: list[dict], path: Path, smooth: int = 9) -> None:
    """The run's loss curve as a picture: training loss per logged step, its moving average over `smooth` logged
    steps (one batch's loss is noisy), eval loss where there is one. A missing matplotlib only skips it."""
    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(f"matplotlib is not installed: no {path.name} (pip install -e '.[train]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, loss = zip(*train)
        ax.plot(steps, loss, lw=0.8, alpha=0.5, label="training loss")
        if len(loss) >= smooth:  # centred on its window, so the average does not lag the raw curve
            avg = [sum(loss[i:i + smooth]) / smooth for i in range(len(loss) - smooth + 1)]
            ax.plot(steps[smooth // 2:smooth // 2 + len(avg)], avg, lw=2,
                    label=f"moving average ({smooth} logged steps)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(path.parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    logger.info(f"Loss curve: {path}")


def peak_memory_mb() -> float:
    """This process's peak memory: CUDA allocations on a GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---- preprocessed-data cache ----------------------------------------------------------------------------------

def cache_root(data_args: DataTrainingArguments) -> Path:
    return Path(data_args.cache_dir or os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm")


def cache_path(data_args: DataTrainingArguments, kind: str, files: list[str], tokenizer, **params: Any) -> Path:
    """Where preprocessed data lives, keyed by the files' identity (path, size, mtime), the tokenizer and params.

    A changed file, tokenizer or parameter gives a new key, so a stale cache is never read.
    """
    root = cache_root(data_args)
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    return root / f"{kind}-{h.hexdigest()[:16]}.pt"


def cached(path: Path, build, training_args: TrainingArguments, desc: str):
    """Load `path` or build it (main process first; the others then read the file it wrote)."""
    with training_args.main_process_first(desc=desc):
        if training_args.process_index == 0:
            remove_dead_temporaries(path.parent)
        if path.exists():
            try:
                data = torch.load(path, weights_only=True)
                logger.info(f"{desc}: using cache {path}")
                return data
            except Exception as e:  # truncated or corrupt: the data can be rebuilt, so say so and rebuild
                logger.warning(f"{desc}: the cache file {path} is unreadable ({str(e).splitlines()[0][:120]}); "
                               "rebuilding it")
        data = build()
        if training_args.process_index == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(data, tmp)
            os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache
            logger.info(f"{desc}: cached to {path}")
        return data


def remove_dead_temporaries(cache_dir: Path) -> None:
    """Delete `*.tmp<pid>` cache files whose writer is gone (a run killed while caching); a live one is kept."""
    for tmp in cache_dir.glob("*.tmp*") if cache_dir.is_dir() else []:
        pid = tmp.suffix.removeprefix(".tmp")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            tmp.unlink(missing_ok=True)
            logger.warning(f"Removed {tmp}: a partial cache file left by a killed run")

"""A run's place on disk: its logging, its output directory, its record (run.json), and resuming it.

- `find_resume_checkpoint` is the course's get_last_checkpoint logic, except that a checkpoint the Trainer did
  not finish (no trainer_state.json: the run was killed while saving) is skipped, and unfinished saves are removed.
- `run_record` is what a run trains on (implementation, model, data files by size and mtime, sequence length, PEFT
  method, packing); it is written as run.json into the output directory and every checkpoint, and `check_resume`
  refuses to continue a checkpoint with a different one unless --allow_changed_resume (train/safety.py compares).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import transformers

from train import peft_methods, safety
from train.args import DataTrainingArguments, ModelArguments, TrainingArguments, fail
from train.peft_methods import PeftArguments

logger = logging.getLogger("minillm.train")

_CHECKPOINT = re.compile(r"checkpoint-[0-9]+")  # the Trainer's checkpoint directory names


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
    if set(os.listdir(out)) - {safety.RUN_RECORD, safety.STAGING + safety.RUN_RECORD} and not ckpts:
        fail(f"output directory {out} is not empty and holds no checkpoint-N to resume from; "
             "use --overwrite_output_dir to train into it anyway, or another --output_dir")
    return None


def last_checkpoint(output_dir: str) -> str | None:
    done = [d for d in os.listdir(output_dir) if _CHECKPOINT.fullmatch(d)
            and os.path.isfile(os.path.join(output_dir, d, "trainer_state.json"))] if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, max(done, key=lambda d: int(d.split("-")[1]))) if done else None


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

"""A run's place on disk: its logging, its output directory, its record (run.json), and resuming it.

- `find_resume_checkpoint` is the course's get_last_checkpoint logic, except that a checkpoint the Trainer did
  not finish (no trainer_state.json) is skipped, a damaged one is named, and nothing is deleted but what minillm
  demonstrably wrote (its staging names, its checkpoints and run record), after the directory was accepted.
- `run_record` is what a run trains on (implementation, model, data files by size and mtime, sequence length, PEFT
  method, packing); it is written as run.json into the output directory and every checkpoint, and `check_resume`
  refuses to continue a checkpoint with a different one unless --allow_changed_resume (train/safety.py compares).
  The record holds the global batch too (ranks x per-device batch x accumulation steps, `batch_record`): a resume
  on another number of ranks must keep the product, and a ZeRO checkpoint there needs its universal form.
- A lost rank: `ProcessGroupTimeout` gives --ddp_timeout to the process groups DeepSpeed creates (train/args.py
  start_process_group to the world's), so a hung rank is given up on; `reporting_lost_ranks` then says in one
  sentence that another rank died or hung, and which checkpoint a restart resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import transformers

from minillm.infra import files
from minillm.infra.checkpoint import read_safetensors_file

from train import peft_methods, safety
from train.args import DataTrainingArguments, ModelArguments, TrainingArguments, ds_config, fail
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


def _checkpoints(out: str) -> list[str]:
    """The checkpoint-N directories in `out`, newest (highest N) first."""
    names = [d for d in os.listdir(out) if _CHECKPOINT.fullmatch(d) and os.path.isdir(os.path.join(out, d))]
    return [os.path.join(out, d) for d in sorted(names, key=lambda d: int(d.split("-")[1]), reverse=True)]


def _finished(out: str) -> list[str]:
    """The checkpoint-N directories in `out` whose save finished (the Trainer writes trainer_state.json last),
    newest first."""
    if not os.path.isdir(out):
        return []
    return [c for c in _checkpoints(out) if os.path.isfile(os.path.join(c, safety.TRAINER_STATE))]


def _in_the_way(out: str) -> list[str]:
    """What in `out` is not a run's own: neither minillm's run record nor a staging entry."""
    return [name for name in sorted(os.listdir(out)) if not (
        files.is_staging(name) or (name == safety.RUN_RECORD and safety.is_run_record(out)))]


def find_resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """The course's get_last_checkpoint logic: resume from the last checkpoint-N in output_dir.

    Decided first, with nothing changed on disk: a checkpoint-N there that minillm did not write is refused (a run
    would resume, replace, rotate or, with --overwrite_output_dir, delete it), and so is a non-empty output_dir
    without checkpoints (it would be overwritten) unless --overwrite_output_dir. An explicit
    --resume_from_checkpoint wins. Unlike get_last_checkpoint, a checkpoint without trainer_state.json (the Trainer
    writes it last) is skipped, and a damaged one is refused with its name.
    Then, on the saving process only, clean-ups of what minillm demonstrably wrote: staging entries of dead
    processes of this host, and with --overwrite_output_dir the earlier run's checkpoints and run record.
    """
    out = training_args.output_dir
    afresh = training_args.overwrite_output_dir and not training_args.resume_from_checkpoint
    resume = training_args.resume_from_checkpoint
    foreign = [c for c in _checkpoints(out) if not safety.is_minillm_checkpoint(c)] if os.path.isdir(out) else []
    if foreign:
        fail(f"{foreign[0]} is not a checkpoint minillm wrote (it holds no run record or trainer state of a run), "
             f"and a run in {out} would {'delete' if afresh else 'resume, replace or rotate'} checkpoint-N "
             "directories: move it out of the way, or choose another --output_dir")
    if os.path.isdir(out) and not afresh and not resume:
        for c in _checkpoints(out):
            if not os.path.lexists(os.path.join(c, safety.TRAINER_STATE)):
                logger.warning(f"Skipping {c}: incomplete (no trainer_state.json: the run was killed while saving it)")
                continue
            try:
                safety.read_trainer_state(c)
            except (OSError, ValueError) as e:
                fail(f"cannot resume from {c}: {e}. Pass --resume_from_checkpoint with an earlier checkpoint, or "
                     "--overwrite_output_dir to start afresh")
            resume = c
            logger.info(f"Checkpoint found: resuming from {c}. Use --overwrite_output_dir to start afresh.")
            break
        if resume is None and (extra := _in_the_way(out)):
            fail(f"output directory {out} is not empty and holds no checkpoint-N to resume from (it holds "
                 f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}); use --overwrite_output_dir to train into "
                 "it anyway, or another --output_dir")
    # The directory is accepted: now, and only now, clean up (every rank enters main_process_first: a barrier).
    with training_args.main_process_first(desc="cleaning the output directory"):
        if training_args.should_save and os.path.isdir(out):
            for path in files.remove_stale_staging(out):
                logger.warning(f"Removed {path}: an unfinished save of minillm's, left by a killed run")
            if afresh:
                # Start afresh for real: an older run's checkpoint left here would be resumed by the next plain run.
                for c in _checkpoints(out):
                    shutil.rmtree(c)
                    logger.warning(f"--overwrite_output_dir: removed {c} of an earlier run")
                if safety.is_run_record(out):
                    Path(out, safety.RUN_RECORD).unlink()
    return resume


class ProcessGroupTimeout(transformers.TrainerCallback):
    """--ddp_timeout on every process group, once the Trainer has set DeepSpeed up (before the first step).

    DeepSpeed makes groups of its own (its data-parallel group is a clone of the world, torch.distributed.new_group),
    and a new group gets torch's default timeout (gloo: 30 minutes), not the default group's: under ZeRO a hung rank
    was waited for that long whatever --ddp_timeout said. torch's _set_pg_timeout is the one way to change the timeout
    of a group that exists; pg_map lists them all.
    """

    def on_epoch_begin(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            for group in list(dist.distributed_c10d._world.pg_map):
                dist.distributed_c10d._set_pg_timeout(timedelta(seconds=args.ddp_timeout), group)


# The first line of gloo's error when the rank at the other end of a collective is gone: its sockets closed (killed,
# crashed) or it never answered within --ddp_timeout (hung, stopped). The text is gloo's (torch 2.13); anything else
# is not about a lost rank and keeps its traceback.
_GLOO_LOST = re.compile(r"(?:\[[^\]]*\] )?(?P<what>.*?(?P<died>Connection reset by peer|Connection closed by peer"
                        r"|Broken pipe)|(?P<silent>Timed out waiting [0-9]+ms for \w+ operation to complete))")


@contextlib.contextmanager
def reporting_lost_ranks(training_args: TrainingArguments):
    """Turn a collective that failed because another rank is gone into one sentence: which rank (in a 2-rank run the
    other one; gloo does not say which of several), what gloo saw, and the checkpoint the same command resumes from.
    The launcher then stops the remaining ranks and names each one's exit."""
    try:
        yield
    except RuntimeError as e:
        found = _GLOO_LOST.match(str(e).strip())
        if training_args.world_size < 2 or found is None:
            raise
        me, ranks = training_args.process_index, training_args.world_size
        who = f"rank {1 - me}" if ranks == 2 else "another rank"
        what = ("stopped (its connection was reset: killed or crashed)" if found["died"] else
                f"did not answer within --ddp_timeout {training_args.ddp_timeout} s (hung or stopped)")
        done = next(iter(_finished(training_args.output_dir)), None)
        fail(f"rank {me} of {ranks}: {who} {what}; gloo: {found['what']}. "
             + (f"The same command resumes from {done}, the last complete checkpoint" if done else
                "No checkpoint was completed: the same command starts afresh"))


def last_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N whose save finished (trainer_state.json) and whose weights are all finite: the one
    a diverged run may call "the last good checkpoint"."""
    for c in _finished(output_dir):
        try:
            weights = [read_safetensors_file(f) for f in sorted(Path(c).glob("*.safetensors"))]
        except (OSError, ValueError):
            continue
        if weights and not any(safety.non_finite_tensors(w) for w in weights):
            return c
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


def batch_record(training_args: TrainingArguments) -> dict[str, int]:
    """This start's global batch and its factors: ranks (the launcher's world size) x per-device batch x
    accumulation steps. A resume must keep the product, not the factors (safety.compare_run_record)."""
    ranks, per_device = training_args.world_size, training_args.per_device_train_batch_size
    steps = training_args.gradient_accumulation_steps
    return {"world_size": ranks, "per_device_train_batch_size": per_device, "gradient_accumulation_steps": steps,
            "global_batch_size": ranks * per_device * steps}


_ZERO_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_([0-9]+)_mp_rank_[0-9]+_optim_states\.pt")  # one per ZeRO rank


def zero_ranks(checkpoint: str) -> int | None:
    """The number of data-parallel ranks a DeepSpeed ZeRO checkpoint is partitioned over (one optimizer-state file
    each in the global_stepN directory its `latest` file names); None when it holds no ZeRO checkpoint."""
    latest = Path(checkpoint, "latest")
    tag = Path(checkpoint, latest.read_text().strip()) if latest.is_file() else None
    if tag is None or not tag.is_dir():
        return None
    names = os.listdir(tag)
    return len({m.group(1) for n in names if (m := _ZERO_OPTIM.fullmatch(n))}) or None


def check_zero_world_size(training_args: TrainingArguments, checkpoint: str) -> None:
    """DeepSpeed loads a ZeRO checkpoint only on the number of ranks that saved it, and says so deep in its load
    ("used a DP world size of 2 but the current world size is 1"); its universal form loads on any number, with
    "checkpoint": {"load_universal": true} in the config. Refuse, before any work, what DeepSpeed would refuse."""
    universal = (ds_config(training_args.deepspeed).get("checkpoint") or {}).get("load_universal") is True
    convert = f"python train/consolidate.py {checkpoint} --universal"
    if universal and not Path(checkpoint, "latest_universal").is_file():
        fail(f"{checkpoint} has no universal form yet, and --deepspeed {training_args.deepspeed} loads only that "
             f"(\"load_universal\": true): convert it first with `{convert}`")
    saved = zero_ranks(checkpoint)
    if not universal and saved is not None and saved != training_args.world_size:
        fail(f"{checkpoint} holds DeepSpeed ZeRO partitions of {saved} rank{'s' * (saved != 1)} and this start has "
             f"{training_args.world_size}: DeepSpeed loads them only on {saved}. Convert it once with `{convert}`, "
             "then resume with a --deepspeed config holding \"checkpoint\": {\"load_universal\": true} "
             "(ds_configs/zero2_universal.json or zero3_universal.json)")


def check_resume(training_args: TrainingArguments, checkpoint: str | None, record: dict[str, Any]) -> None:
    """Say loudly what a resume continues from; refuse a changed run unless --allow_changed_resume; write run.json.

    `record` gains this start's batch (batch_record) in place: the Trainer copies the same dict into every
    checkpoint, which is what the next resume compares. The record compared is the checkpoint's own run.json,
    else the output directory's. A data file counts as changed when its size or modification time differ.
    """
    record.update(batch_record(training_args))
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
            state = safety.read_trainer_state(checkpoint)
        except (OSError, ValueError) as e:  # an explicit --resume_from_checkpoint: the Trainer would crash on it
            fail(f"cannot resume from {checkpoint}: {e}")
        where = f"step {state['global_step']} of {state['max_steps']}"
        logger.warning(f"RESUMING from {checkpoint} ({where}); use --overwrite_output_dir to start afresh")
        old_lr = (old or {}).get("learning_rate")
        if old_lr is not None and old_lr != training_args.learning_rate:
            logger.warning(f"--learning_rate {training_args.learning_rate:g} has no effect on this resume: the "
                           f"optimizer and scheduler restored from {checkpoint} keep its run's peak {old_lr:g}. Use "
                           "--overwrite_output_dir to start afresh with the new learning rate")
        changes = safety.compare_run_record(old, record)
        if old and old.get("world_size", record["world_size"]) != record["world_size"] and not changes:
            logger.warning(f"{checkpoint} was saved on {old['world_size']} rank(s), this start has "
                           f"{record['world_size']}: the global batch is unchanged ({safety.describe_batch(record)})")
        if changes and not training_args.allow_changed_resume:
            fail(f"resuming {checkpoint} would continue a different run: " + "; ".join(changes) +
                 ". Pass --allow_changed_resume to continue it anyway, or --overwrite_output_dir to start afresh")
        if saved_by_deepspeed:  # after the run's own changes: a different run is the first thing to say
            check_zero_world_size(training_args, checkpoint)
        for c in changes:
            logger.warning(f"--allow_changed_resume: the resumed run differs from {checkpoint}'s: {c}")
        record = {**record, "resumed_from": os.path.abspath(checkpoint), "changed_on_resume": changes}
        if old_lr is not None:
            record["learning_rate"] = old_lr  # what the resumed optimizer and schedule actually use
    record.setdefault("learning_rate", training_args.learning_rate)
    if training_args.should_save:
        safety.write_run_record(training_args.output_dir, record)

"""What keeps a training run from hurting the user: no code from files, no silent divergence, no lost files.

- Unpickling. DeepSpeed resumes with `torch.load(..., weights_only=False)`, so a planted
  `global_stepN/*.pt` would run code. `forbid_unpickling_code()` sets torch's documented switch
  TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 for this process: every torch.load (DeepSpeed's, the Trainer's, our
  cache's) then uses the weights-only unpickler, whatever its caller passed. That unpickler accepts
  tensors, containers and primitive values, plus exactly the classes in `resume_safe_globals()`: the
  ones DeepSpeed's ZeRO checkpoints store (measured by listing the GLOBAL opcodes of every .pt file a
  ZeRO-2/ZeRO-3 checkpoint holds) and numpy's RNG state, which the Trainer allow-lists itself.
- Numbers. `check_numbers()` refuses nan/inf/negative values and sizes that cannot train, naming the flag.
- Paths. `check_paths()` refuses an output directory that is, contains or lies inside an input.
- The run record. `run.json` in the output directory says what a run trains on; a resume compares it
  (`compare_run_record()`) and refuses a changed implementation, data set, model, sequence length or global
  batch (ranks x per-device batch x accumulation steps) unless --allow_changed_resume.
- Staging and clean-ups. Every save is staged under minillm's own name (minillm/infra/files.py:
  `.{target}.minillm-staging-{host}-{pid}-{random}`) and renamed; a clean-up removes only entries carrying that
  name, this host and a dead pid (`files.remove_stale_staging`), and only once the directory has been accepted
  (train/run.py). `is_minillm_checkpoint` tells a checkpoint-N minillm wrote from a user's directory of that name.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from minillm.infra import files


class Diverged(RuntimeError):
    """A non-finite loss, gradient norm or weight: the run stops, nothing more is saved."""


# ---- unpickling ------------------------------------------------------------------------------------------

def forbid_unpickling_code() -> str | None:
    """Make every torch.load in this process weights-only. Returns an error sentence, or None."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        return ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: it would let a checkpoint run code when it is loaded; "
                "unset it (minillm loads tensors only)")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    return None


def resume_safe_globals() -> list:
    """The non-tensor classes a DeepSpeed ZeRO checkpoint pickles (its optimizer-state files).

    Listed from the GLOBAL opcodes of the files a ZeRO-2 and a ZeRO-3 run wrote: the loss scaler
    (pickled even in fp32), the ZeRO stage enum, and the fragment addresses of the flat partitions.
    Each is rebuilt from plain data; none runs code of the file's choosing.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def unloadable_files(checkpoint: str, safe: list) -> list[str]:
    """The pickle files in `checkpoint` that the weights-only unpickler refuses, with its reason (to name them).

    training_args.bin is skipped: the Trainer writes it for the user and never loads it.
    """
    bad = []
    for path in sorted(Path(checkpoint).rglob("*")):
        if path.suffix not in (".pt", ".pth", ".bin") or path.name == "training_args.bin" or not path.is_file():
            continue
        try:
            with torch.serialization.safe_globals(safe):
                torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            reason = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln),
                          str(e).splitlines()[0] if str(e) else type(e).__name__)
            bad.append(f"{path} ({reason[:160]})")
    return bad


# ---- numbers ---------------------------------------------------------------------------------------------

def check_numbers(model_args, data_args, training_args, peft_args=None) -> str | None:
    """The first numeric argument that cannot train, as a sentence naming the flag; None when all are fine."""
    def finite(flag: str, v: float, lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False):
        if v is None:
            return None
        if not math.isfinite(v):
            return f"--{flag} {v}: must be a finite number"
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return f"--{flag} {v}: must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return f"--{flag} {v}: must be {'<' if hi_open else '<='} {hi}"
        return None

    t = training_args
    checks = [
        finite("learning_rate", t.learning_rate, 0),
        finite("weight_decay", t.weight_decay, 0),
        finite("adam_beta1", t.adam_beta1, 0, 1, hi_open=True),
        finite("adam_beta2", t.adam_beta2, 0, 1, hi_open=True),
        finite("adam_epsilon", t.adam_epsilon, 0, lo_open=True),
        finite("max_grad_norm", t.max_grad_norm, 0),
        finite("num_train_epochs", t.num_train_epochs, 0, lo_open=True),
        finite("warmup_steps", t.warmup_steps, 0),
        finite("label_smoothing_factor", t.label_smoothing_factor, 0, 1, hi_open=True),
        finite("per_device_train_batch_size", t.per_device_train_batch_size, 1),
        finite("gradient_accumulation_steps", t.gradient_accumulation_steps, 1),
        # below 1 the Trainer reads these as a fraction of the run; 0 or less would log/save never or crash
        finite("logging_steps", t.logging_steps, 0, lo_open=True),
        finite("save_steps", t.save_steps, 0, lo_open=True),
        finite("eval_steps", t.eval_steps, 0, lo_open=True),
        None if t.max_steps == -1 or t.max_steps >= 1 else
        f"--max_steps {t.max_steps}: must be >= 1, or -1 to train for --num_train_epochs",
        None if str(t.eval_strategy.value if hasattr(t.eval_strategy, "value") else t.eval_strategy) == "no"
        or data_args.validation_files or data_args.validation_split_percentage else
        f"--eval_strategy {t.eval_strategy.value}: needs --validation_files or --validation_split_percentage",
        # one token has no next token to predict: the loss is 0 and nothing trains
        None if data_args.block_size is None or data_args.block_size >= 2 else
        f"--block_size {data_args.block_size}: cannot train (a block needs at least 2 tokens: an input and "
        "the next token to predict)",
        None if data_args.max_len >= 2 else
        f"--max_len {data_args.max_len}: cannot train (a sample needs at least 2 tokens)",
        finite("max_train_samples", data_args.max_train_samples, 1),
        finite("preprocessing_num_workers", data_args.preprocessing_num_workers, 1),
    ]
    # --peft values are checked once, by the method's config (train/peft_methods.check_peft_args)
    return next((c for c in checks if c), None)


# ---- paths -----------------------------------------------------------------------------------------------

def check_paths(output_dir: str, inputs: dict[str, str | list[str] | None]) -> str | None:
    """Refuse an output directory that would overwrite or mix with an input, and nothing more: one that is, contains
    or lies inside an input directory, or that is (or contains) the directory an input file lies in. A
    subdirectory beside an input file (`--config_name ./config.json --output_dir ./out`) is fine."""
    out = Path(output_dir).resolve()
    for flag, paths in inputs.items():
        for path in [paths] if isinstance(paths, str) else paths or []:
            if not path or not os.path.exists(path):
                continue
            p = Path(path).resolve()
            home = p if p.is_dir() else p.parent  # an input file: its directory receives the run's files
            if out == home:
                return (f"--output_dir {output_dir} is {'the same directory as' if p.is_dir() else 'the directory of'}"
                        f" --{flag} {path}: training would overwrite or mix with its files; choose another "
                        "--output_dir")
            if p.is_dir() and out.is_relative_to(p):
                return (f"--output_dir {output_dir} is inside --{flag} {path}: training would mix its files with "
                        "the input's; choose another --output_dir")
            if p.is_relative_to(out):
                return (f"--output_dir {output_dir} contains --{flag} {path}: training (or --overwrite_output_dir) "
                        "could overwrite it; choose another --output_dir")
    return None


def check_writable(flag: str, path: str | os.PathLike) -> str | None:
    """Create `path` if needed and write a file in it: a read-only or full directory fails now, not hours later.
    The probe carries minillm's staging name (removed at once; a killed run's is removed as stale later)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = files.staging_path(Path(path, "probe"))
        probe.write_bytes(b"x")
        probe.unlink(missing_ok=True)
    except OSError as e:
        return f"{flag} {path} is not writable: {e.strerror or e}"
    return None


# ---- the run record ----------------------------------------------------------------------------------------

RUN_RECORD = "run.json"
# Keys of the record whose change makes a resume train a different thing than the checkpoint did.
MUST_MATCH = ("script", "impl", "model", "data", "sequence_length", "lora", "peft", "packing", "validation_split",
              "dpo")  # dpo.py's objective: beta, loss types, label smoothing, truncation, precomputed reference
# The batch of a run (train/run.py batch_record): the last must match on resume, the others may trade against it.
BATCH = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps", "global_batch_size")


def file_identity(paths: list[str] | None) -> list[dict] | None:
    return [files.file_identity(p) for p in paths] if paths else None


class BadRunFile(ValueError):
    """A run file (run.json, trainer_state.json) that minillm did not write as it is: one sentence naming it."""


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_run_record(directory: str) -> dict | None:
    """The run record (run.json) in `directory`; None when there is none; BadRunFile naming the file when it is
    not one minillm wrote (not a JSON object, NaN/Infinity, a value of the wrong type)."""
    path = Path(directory, RUN_RECORD)
    if not os.path.lexists(path):
        return None
    try:
        d = files.read_json_object(files.checked_file(Path(directory), RUN_RECORD, "run record"))
    except (OSError, ValueError) as e:
        raise BadRunFile(f"{e}: not a run record minillm wrote; move it away (or delete it) to continue") from None
    problems = [f"{k!r} is {d[k]!r}, not a string" for k in ("script", "impl") if not isinstance(d.get(k, ""), str)]
    if "learning_rate" in d and not (_real(d["learning_rate"]) and d["learning_rate"] >= 0):
        problems.append(f"'learning_rate' is {d['learning_rate']!r}, not a learning rate")
    problems += [f"{k!r} is {d[k]!r}, not a count" for k in BATCH
                 if k in d and not (isinstance(d[k], int) and not isinstance(d[k], bool) and d[k] >= 1)]
    if all(k in d for k in BATCH) and not problems and d[BATCH[3]] != d[BATCH[0]] * d[BATCH[1]] * d[BATCH[2]]:
        problems.append(f"'global_batch_size' {d[BATCH[3]]} is not {' x '.join(str(d[k]) for k in BATCH[:3])}")
    if not isinstance(d.get("sequence_length", {}), (dict, type(None))):
        problems.append(f"'sequence_length' is {d['sequence_length']!r}, not an object")
    if problems:
        raise BadRunFile(f"{path}: {problems[0]}: not a run record minillm wrote; move it away (or delete it) to "
                         "continue")
    return d


def is_run_record(directory: str) -> bool:
    """Whether `directory` holds a run.json minillm wrote (what makes it, or a checkpoint, demonstrably minillm's)."""
    try:
        d = read_run_record(directory)
    except BadRunFile:
        return False
    return d is not None and isinstance(d.get("script"), str) and "impl" in d


def write_run_record(output_dir: str, record: dict[str, Any]) -> None:
    # allow_nan=False: a non-finite value is a bug here, never written as Infinity for the next run to choke on
    files.write_atomic(Path(output_dir, RUN_RECORD), json.dumps(record, indent=2, allow_nan=False) + "\n")


TRAINER_STATE = "trainer_state.json"


def read_trainer_state(checkpoint: str) -> dict[str, Any]:
    """A checkpoint's trainer_state.json as transformers' TrainerState will load it: a JSON object of TrainerState's
    own keys, step counts that are counts (0 <= global_step <= max_steps). BadRunFile naming the file otherwise."""
    from dataclasses import fields

    from transformers import TrainerState

    path = files.checked_file(Path(checkpoint), TRAINER_STATE, "checkpoint")
    d = files.read_json_object(path)
    unknown = sorted(set(d) - {f.name for f in fields(TrainerState)})
    if unknown:
        raise BadRunFile(f"{path}: unknown keys {unknown[:3]}: not a trainer state transformers wrote")
    step, total = d.get("global_step"), d.get("max_steps")
    for key, v in (("global_step", step), ("max_steps", total)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise BadRunFile(f"{path}: {key} is {v!r}, not a step count")
    if total and step > total:
        raise BadRunFile(f"{path}: global_step {step} is past its own max_steps {total}: the file was edited or is "
                         "corrupt")
    if not isinstance(d.get("log_history", []), list):
        raise BadRunFile(f"{path}: log_history is {type(d['log_history']).__name__}, not a list")
    return d


def is_minillm_checkpoint(checkpoint: str) -> bool:
    """A checkpoint-N directory minillm's Trainer wrote: it holds minillm's run record or a trainer state of
    transformers' shape. A user's directory that only happens to be called checkpoint-N holds neither."""
    if is_run_record(checkpoint):
        return True
    try:
        read_trainer_state(checkpoint)
        return True
    except (OSError, ValueError):
        return False


def compare_run_record(old: dict | None, new: dict) -> list[str]:
    """Lines naming what differs between the record a checkpoint was trained under and this run's.

    The global batch must match, not the world size: 2 ranks x 2 continue exactly as 1 rank x 4 (or x 2 x 2
    accumulation steps). A record written before the batch was recorded has nothing to compare."""
    if old is None:
        return ["no run record (run.json) in the output directory: what the checkpoint was trained on is unknown"]
    changes = []
    for key in MUST_MATCH:
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}")
    if all(k in old and k in new for k in BATCH) and old["global_batch_size"] != new["global_batch_size"]:
        changes.append(f"the global batch would change from {describe_batch(old)} to {describe_batch(new)}; "
                       "keep ranks x per device x accumulation steps equal with --per_device_train_batch_size or "
                       "--gradient_accumulation_steps")
    return changes


def describe_batch(record: dict) -> str:
    """'4 (2 ranks x 2 per device x 1 accumulation step)': a record's global batch and its arithmetic."""
    w, b, a = (record[k] for k in BATCH[:3])
    return (f"{record['global_batch_size']} ({w} rank{'s' * (w != 1)} x {b} per device x {a} accumulation "
            f"step{'s' * (a != 1)})")


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if v.is_floating_point() and v.numel() and not torch.isfinite(v).all()]

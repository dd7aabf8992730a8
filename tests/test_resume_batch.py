"""A resume keeps the global batch (issue 23): run.json records it, a changed one is refused with the arithmetic.

The global batch is ranks x --per_device_train_batch_size x --gradient_accumulation_steps; the number of ranks is
the launcher's. 2 ranks x 2 continue exactly as 1 rank x 4 or 1 x 2 x 2 (tests/test_resume_world_size.py trains
that, in the slow lane); another product would continue a different run. Nothing here trains: train/run.py's
check_resume is called on a checkpoint-3 made by hand, and each script is started once against such a checkpoint
to show it stops before any work (plain python: 1 rank).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from minillm.data import SAMPLE_PRETRAIN, SAMPLE_SFT
from tests.test_train import ROOT, TRAIN, _env
from train import run, safety
from train.args import DataTrainingArguments, ModelArguments
from train.dpo import SAMPLE_DPO, DPOArguments
from train.peft_methods import PeftArguments

RECORD = {"script": "pretrain.py", "impl": "minillm", "model": "tiny", "tokenizer": None, "dtype": "float32",
          "data": None, "validation": None, "sequence_length": {"block_size": 32}, "lora": None, "peft": None,
          "packing": None, "validation_split": None}


def args(out: Path, world_size: int = 1, per_device: int = 2, accumulation: int = 1, allow: bool = False,
         deepspeed: str | None = None) -> SimpleNamespace:
    """What check_resume reads of TrainingArguments (world_size is the launcher's, not a flag)."""
    return SimpleNamespace(output_dir=str(out), world_size=world_size, per_device_train_batch_size=per_device,
                           gradient_accumulation_steps=accumulation, allow_changed_resume=allow, deepspeed=deepspeed,
                           learning_rate=3e-3, should_save=True)


def checkpoint(out: Path, world_size: int, per_device: int, accumulation: int = 1, zero: bool = False,
               record: dict | None = None) -> Path:
    """A checkpoint-3 as a run on `world_size` ranks leaves it (run.json with the batch record, trainer_state)."""
    ckpt = out / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3, "max_steps": 6}))
    batch = {"world_size": world_size, "per_device_train_batch_size": per_device,
             "gradient_accumulation_steps": accumulation, "global_batch_size": world_size * per_device * accumulation}
    (ckpt / "run.json").write_text(json.dumps({**(record or RECORD), **batch, "learning_rate": 3e-3}))
    if zero:
        (ckpt / "latest").write_text("global_step3")
        (ckpt / "global_step3").mkdir()
        for r in range(world_size):
            (ckpt / "global_step3" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    return ckpt


def test_run_json_records_the_world_size_and_global_batch(tmp_path):
    record = dict(RECORD)
    run.check_resume(args(tmp_path, world_size=2, per_device=2, accumulation=3), None, record)
    rec = json.loads((tmp_path / "run.json").read_text())
    assert (rec["world_size"], rec["per_device_train_batch_size"], rec["gradient_accumulation_steps"],
            rec["global_batch_size"]) == (2, 2, 3, 12)
    # the script's record gains it too: the Trainer copies that dict into every checkpoint-N
    assert record["global_batch_size"] == 12


def test_resume_with_the_same_global_batch_on_another_world_size_is_accepted(tmp_path):
    ckpt = checkpoint(tmp_path, world_size=2, per_device=2)
    run.check_resume(args(tmp_path, world_size=1, per_device=4), str(ckpt), dict(RECORD))
    run.check_resume(args(tmp_path, world_size=1, per_device=2, accumulation=2), str(ckpt), dict(RECORD))
    rec = json.loads((tmp_path / "run.json").read_text())
    assert rec["world_size"] == 1 and rec["global_batch_size"] == 4 and rec["changed_on_resume"] == []


def test_resume_with_another_global_batch_is_refused_with_the_arithmetic(tmp_path):
    ckpt = checkpoint(tmp_path, world_size=2, per_device=2)
    with pytest.raises(SystemExit) as e:
        run.check_resume(args(tmp_path, world_size=1, per_device=2), str(ckpt), dict(RECORD))
    msg = str(e.value)
    assert ("the global batch would change from 4 (2 ranks x 2 per device x 1 accumulation step) to "
            "2 (1 rank x 2 per device x 1 accumulation step)") in msg, msg
    assert "--per_device_train_batch_size or --gradient_accumulation_steps" in msg and "--allow_changed_resume" in msg
    run.check_resume(args(tmp_path, world_size=1, per_device=2, allow=True), str(ckpt), dict(RECORD))
    rec = json.loads((tmp_path / "run.json").read_text())
    assert rec["global_batch_size"] == 2 and any("global batch" in c for c in rec["changed_on_resume"])


def test_more_ranks_with_the_same_per_device_batch_is_refused_too(tmp_path):
    ckpt = checkpoint(tmp_path, world_size=1, per_device=2, accumulation=2)
    with pytest.raises(SystemExit, match=r"from 4 \(1 rank x 2 per device x 2 accumulation steps\) to 8 \(2 ranks x 2 "
                                         r"per device x 2 accumulation steps\)"):
        run.check_resume(args(tmp_path, world_size=2, per_device=2, accumulation=2), str(ckpt), dict(RECORD))


def test_a_record_without_the_batch_is_not_refused(tmp_path):
    """Checkpoints written before the record had the batch: nothing to compare, the resume goes on."""
    ckpt = checkpoint(tmp_path, world_size=2, per_device=2)
    rec = json.loads((ckpt / "run.json").read_text())
    for k in safety.BATCH:
        del rec[k]
    (ckpt / "run.json").write_text(json.dumps(rec))
    run.check_resume(args(tmp_path, world_size=1, per_device=2), str(ckpt), dict(RECORD))


@pytest.mark.parametrize("bad", [{"world_size": 0}, {"global_batch_size": "4"}, {"global_batch_size": 5}])
def test_a_batch_record_minillm_did_not_write_is_named(tmp_path, bad):
    ckpt = checkpoint(tmp_path, world_size=2, per_device=2)
    rec = json.loads((ckpt / "run.json").read_text())
    (ckpt / "run.json").write_text(json.dumps({**rec, **bad}))
    with pytest.raises(SystemExit, match="not a run record minillm wrote"):
        run.check_resume(args(tmp_path, world_size=2, per_device=2), str(ckpt), dict(RECORD))


def test_a_zero_checkpoint_on_another_world_size_needs_the_universal_form(tmp_path):
    """DeepSpeed would stop deep in its load ("used a DP world size of 2 but the current world size is 1"): refused
    before any work, naming the conversion and the config key; a converted checkpoint with that config goes on."""
    ckpt = checkpoint(tmp_path, world_size=2, per_device=2, zero=True)
    plain, universal = (str(ROOT / "ds_configs" / f"zero2{s}.json") for s in ("", "_universal"))
    with pytest.raises(SystemExit) as e:
        run.check_resume(args(tmp_path, world_size=1, per_device=4, deepspeed=plain), str(ckpt), dict(RECORD))
    msg = str(e.value)
    assert f"python train/consolidate.py {ckpt} --universal" in msg and '"load_universal": true' in msg, msg
    with pytest.raises(SystemExit, match="has no universal form yet"):
        run.check_resume(args(tmp_path, world_size=1, per_device=4, deepspeed=universal), str(ckpt), dict(RECORD))
    (ckpt / "latest_universal").write_text("global_step3_universal")
    run.check_resume(args(tmp_path, world_size=1, per_device=4, deepspeed=universal), str(ckpt), dict(RECORD))
    run.check_resume(args(tmp_path, world_size=2, per_device=2, deepspeed=plain), str(ckpt), dict(RECORD))


# ---- each script stops before any work --------------------------------------------------------------------------

def script_record(script: str) -> dict:
    """The run record `script` writes with the flags below (the same helpers build it), so that only the batch
    differs from the hand-made checkpoint's."""
    model = ModelArguments(config_name="tiny" if script != "dpo.py" else None)
    if script == "pretrain.py":
        return run.run_record(script, model, DataTrainingArguments(train_files=[str(SAMPLE_PRETRAIN)]),
                              {"block_size": 32})
    if script == "finetune.py":
        return run.run_record(script, model, DataTrainingArguments(train_files=[str(SAMPLE_SFT)]), {"max_len": 64},
                              PeftArguments())
    dpo = DPOArguments()
    return {**run.run_record(script, model, DataTrainingArguments(train_files=[str(SAMPLE_DPO)]),
                             {"max_length": dpo.max_length}, PeftArguments()),
            "dpo": {k: v for k, v in asdict(dpo).items() if k != "max_length"}}


FLAGS = {"pretrain.py": ["--config_name", "tiny", "--block_size", "32"],
         "finetune.py": ["--config_name", "tiny", "--max_len", "64"], "dpo.py": []}


@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py", "dpo.py"])
def test_each_script_refuses_a_changed_global_batch(script, tmp_path):
    out = tmp_path / "out"
    checkpoint(out, world_size=2, per_device=2, record=script_record(script))
    cmd = [sys.executable, str(TRAIN / script), *FLAGS[script], "--per_device_train_batch_size", "2",
           "--learning_rate", "3e-3", "--report_to", "none", "--output_dir", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path / "cache"), cwd=ROOT, timeout=300)
    assert p.returncode != 0, p.stdout[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last == (f"{script}: error: resuming {out / 'checkpoint-3'} would continue a different run: the global "
                    "batch would change from 4 (2 ranks x 2 per device x 1 accumulation step) to 2 (1 rank x 2 per "
                    "device x 1 accumulation step); keep ranks x per device x accumulation steps equal with "
                    "--per_device_train_batch_size or --gradient_accumulation_steps. Pass --allow_changed_resume to "
                    "continue it anyway, or --overwrite_output_dir to start afresh"), p.stderr[-3000:]

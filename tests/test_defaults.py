"""train/args.py: the learning rate chosen when none is given (mode and width), kept when given, and the
DeepSpeed config's "auto" lr follows it; TORCH_EXTENSIONS_DIR defaults next to the venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
from train import args as common
from train.peft_methods import PeftArguments

PRE = (common.ModelArguments, common.DataTrainingArguments, common.TrainingArguments)
SFT = (common.ModelArguments, common.DataTrainingArguments, PeftArguments, common.TrainingArguments)


def lr(dataclasses, argv, tmp_path) -> float:
    return common.parse_args(dataclasses, str(tmp_path / "o"), argv)[-1].learning_rate


@pytest.mark.parametrize("argv,sft,want", [
    ([], False, 3e-3),                                   # from scratch, tiny preset
    (["--config_name", "small"], False, 3e-3),
    (["--config_name", "qwen3-0.6b"], False, 3e-4),      # wider than CPU scale: the published value
    (["--model_name_or_path", "WIDE"], True, 2e-5),      # full fine-tuning of a wide checkpoint
    (["--model_name_or_path", "NARROW"], True, 3e-3),
    (["--model_name_or_path", "NARROW", "--use_lora"], True, 5e-3),
    (["--model_name_or_path", "WIDE", "--use_lora", "true"], True, 2e-4),
    (["--model_name_or_path", "NARROW", "--peft", "prompt"], True, 3e-1),  # the other methods: their own
    (["--model_name_or_path", "NARROW", "--peft", "prefix"], True, 3e-2),
    (["--model_name_or_path", "WIDE", "--peft", "adapter"], True, 1e-4),
    (["--learning_rate", "1e-4"], False, 1e-4),          # given: kept
    (["--learning_rate=7e-4", "--use_lora"], True, 7e-4),
])
def test_default_learning_rate(argv, sft, want, tmp_path, capsys):
    for name, hidden in (("WIDE", 1024), ("NARROW", 64)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    argv = [str(tmp_path / a) if a in ("WIDE", "NARROW") else a for a in argv]
    assert lr(SFT if sft else PRE, argv, tmp_path) == pytest.approx(want)
    said = "--learning_rate not given" in capsys.readouterr().out
    assert said == (not any(a.startswith("--learning_rate") for a in argv))


def test_default_lr_reaches_deepspeed_auto(tmp_path):
    """DeepSpeed's "auto" optimizer lr is filled in TrainingArguments.__post_init__: it must see the default."""
    args = common.parse_args(PRE, str(tmp_path / "o"), ["--deepspeed", str(ROOT / "ds_configs" / "zero2.json")])[-1]
    assert args.hf_deepspeed_config.config["optimizer"]["params"]["lr"] == pytest.approx(3e-3)


def test_json_args_file_gets_the_default_too(tmp_path):
    f = tmp_path / "args.json"
    f.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "use_lora": True}))
    assert common.parse_args(SFT, "x", [str(f)])[-1].learning_rate == pytest.approx(5e-3)


def test_extensions_dir_defaults_next_to_the_venv():
    """Unset, the scripts use <venv>/torch_extensions (as the Makefile): a launch outside make reuses the build."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    code = "import os, train.args; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == os.path.join(sys.prefix, "torch_extensions")


def test_resume_with_a_changed_learning_rate_warns_that_it_has_no_effect(tmp_path, monkeypatch, caplog):
    """The resumed optimizer and scheduler keep the checkpoint's lr: a new --learning_rate is named as ineffective,
    and the lr the run actually continues with is what the log shows."""
    import importlib
    import logging

    out = tmp_path / "o"
    args = ["--max_steps", "2", "--save_steps", "2", "--output_dir", str(out), "--cache_dir", str(tmp_path / "c"),
            "--block_size", "32", "--per_device_train_batch_size", "2", "--disable_tqdm", "true",
            "--logging_steps", "1", "--report_to", "none", "--lr_scheduler_type", "constant"]

    def main(argv):
        monkeypatch.setattr(sys, "argv", ["pretrain.py", *argv])
        monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")  # undo the script's process-wide switch afterwards
        importlib.import_module("train.pretrain").main()

    main(args)
    assert json.loads((out / "run.json").read_text())["learning_rate"] == pytest.approx(3e-3)  # the default
    caplog.set_level(logging.WARNING, logger="minillm.train")
    main([*args[:1], "4", *args[2:], "--learning_rate", "1e-4"])
    assert "RESUMING from" in caplog.text and "--overwrite_output_dir" in caplog.text
    assert "--learning_rate 0.0001 has no effect on this resume" in caplog.text and "peak 0.003" in caplog.text
    lrs = [e["learning_rate"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
           if "learning_rate" in e and e["step"] > 2]
    assert lrs and all(x == pytest.approx(3e-3) for x in lrs), lrs  # the warning is true: 1e-4 was not used


def test_parity_says_which_area_runs():
    """issue 20: `make parity` printed nothing for minutes; now a line per area as it starts and finishes."""
    p = subprocess.run([sys.executable, "-m", "parity", "--only", "data", "--rows", "no-such-check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("parity: 1 area(s)"), lines[:3]
    assert lines[1].startswith("== area 1/1 data: started") and "finished, 0 rows in" in lines[2], lines[:3]


def test_bench_quick_gives_no_verdicts():
    """issue 20: `python -m parity.bench --quick` printed a wall of NO against the full-size targets."""
    from parity.bench.report import format_table, table_rows

    case = {"train_tiny": {"same_output": True, "tokens_s": {"minillm": 10.0, "reference": 20.0},
                           "peak_mb": {"minillm": 100.0, "reference": 120.0}, "grads_adam_mb": 10.0,
                           "flop_rate_fraction": {"minillm": 0.1, "reference": 0.2}}}
    full = table_rows(case)
    assert any(r["met"] is False for r in full) and "NO" in format_table(full)
    quick = table_rows(case, verdicts=False)
    assert all(r["met"] is None and r["target"] is None for r in quick) and "NO" not in format_table(quick)

"""Hostile input to the training scripts (issue 10): each case gets a sentence naming the flag or file, a
non-zero exit, and the user's files intact.

Table-driven and in-process (one import of transformers for all cases); the few cases that train use a
tiny model for 1-3 steps. The DeepSpeed resume of a planted pickle is in test_train.py (it reuses that
module's 2-rank checkpoints).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minillm.infra.store import is_complete

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "train"
TINY = ["--block_size", "32", "--per_device_train_batch_size", "2", "--disable_tqdm", "true", "--logging_steps", "1",
        "--report_to", "none"]
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _main(script: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    # the scripts make every torch.load in the process weights-only: undo that for the rest of the session
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    importlib.import_module("train." + script.removesuffix(".py")).main()


def _digest(directory: Path) -> dict[str, str]:
    """Every file under `directory` with its content hash: 'files intact' means this is unchanged."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small saved model (config.json + model.safetensors + tokenizer) to use as --model_name_or_path."""
    from minillm.config import ModelConfig
    from minillm.model import CausalLM
    from minillm.infra import corpus
    import shutil

    d = tmp_path_factory.mktemp("model") / "base"
    torch.manual_seed(0)
    CausalLM(ModelConfig.preset("tiny")).save_pretrained(d)
    for f in Path(corpus.TOKENIZER_DIR).iterdir():
        if f.is_file():
            shutil.copy(f, d / f.name)
    return d


# ---- refused before any work: (case, script, argv, expected message) -------------------------------------
# {out}, {model}, {tmp} are filled per test. Every case must exit with the message and leave {model} unchanged.
REFUSED = [
    ("lr nan", "pretrain.py", ["--learning_rate", "nan"], "--learning_rate nan: must be a finite number"),
    ("lr inf", "pretrain.py", ["--learning_rate", "inf"], "--learning_rate inf: must be a finite number"),
    ("lr negative", "pretrain.py", ["--learning_rate=-1e-3"], "--learning_rate -0.001: must be >= 0"),
    ("max_grad_norm nan", "pretrain.py", ["--max_grad_norm", "nan"], "--max_grad_norm nan: must be a finite"),
    ("adam_beta2 1", "pretrain.py", ["--adam_beta2", "1"], "--adam_beta2 1.0: must be < 1"),
    ("block_size 1", "pretrain.py", ["--block_size", "1"], "--block_size 1: cannot train"),
    ("block_size 0", "pretrain.py", ["--block_size", "0"], "--block_size 0: cannot train"),
    ("max_len 1", "finetune.py", ["--max_len", "1"], "--max_len 1: cannot train"),
    ("save_steps 0", "pretrain.py", ["--save_steps", "0"], "--save_steps 0.0: must be > 0"),
    ("logging_steps -1", "pretrain.py", ["--logging_steps=-1"], "--logging_steps -1.0: must be > 0"),
    ("max_steps 0", "pretrain.py", ["--max_steps", "0"], "--max_steps 0: must be >= 1, or -1"),
    ("eval without data", "pretrain.py", ["--eval_strategy", "steps", "--eval_steps", "5"],
     "--eval_strategy steps: needs --validation_files or --validation_split_percentage"),
    ("batch size 0", "pretrain.py", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0"),
    ("lora_alpha nan", "finetune.py", ["--use_lora", "--lora_alpha", "nan"], "--lora_alpha nan: must be a finite"),
    ("lora_alpha 0", "finetune.py", ["--use_lora", "--lora_alpha", "0"], "--lora_alpha 0.0: must be a finite number > 0"),
    ("lora_r 0", "finetune.py", ["--use_lora", "--lora_r", "0"], "--lora_r 0: must be a positive int"),
    ("lora_r -4", "finetune.py", ["--use_lora", "--lora_r=-4"], "--lora_r -4: must be a positive int"),
    ("lora_dropout 1", "finetune.py", ["--use_lora", "--lora_dropout", "1"], "--lora_dropout 1.0: must be a number in [0, 1)"),
    ("output is the model", "finetune.py", ["--model_name_or_path", "{model}", "--output_dir", "{model}"],
     "is the same directory as --model_name_or_path"),
    ("output inside the model", "finetune.py", ["--model_name_or_path", "{model}", "--output_dir", "{model}/sft"],
     "is inside --model_name_or_path"),
    ("output contains the model", "finetune.py", ["--model_name_or_path", "{model}", "--output_dir", "{model}/.."],
     "contains --model_name_or_path"),
    ("output is the tokenizer", "pretrain.py", ["--tokenizer_name", "{model}", "--output_dir", "{model}"],
     "is the same directory as --tokenizer_name"),
    ("output not writable", "pretrain.py", ["--output_dir", "{model}/config.json/out"], "--output_dir"),
    ("cache not writable", "pretrain.py", ["--cache_dir", "{model}/config.json/cache"], "--cache_dir"),
    ("deepspeed without a launcher", "pretrain.py", ["--deepspeed", str(ROOT / "ds_configs" / "zero2.json")],
     "--deepspeed needs a launcher"),
]


@pytest.mark.parametrize("case,script,argv,message", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_a_sentence(case, script, argv, message, model_dir, tmp_path, monkeypatch):
    for k in LAUNCHER_ENV:
        monkeypatch.delenv(k, raising=False)
    before = _digest(model_dir)
    fill = {"out": str(tmp_path / "out"), "model": str(model_dir), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    if "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "out")]
    if "--cache_dir" not in argv:
        argv += ["--cache_dir", str(tmp_path / "cache")]
    if "--max_steps" not in argv:
        argv += ["--max_steps", "1"]
    with pytest.raises(SystemExit) as e:
        _main(script, argv, monkeypatch)
    assert message in str(e.value), f"{case}: {e.value}"
    assert str(e.value).count("\n") == 0, "one line"
    assert _digest(model_dir) == before, f"{case}: the model directory changed"


def test_zero3_config_that_would_save_no_weights_is_refused(tmp_path, monkeypatch):
    # Called directly: parsing a ZeRO-3 config in-process would leave transformers' global ZeRO-3 flag set
    # for the rest of the test session.
    from train.args import check_ds_config

    cfg = tmp_path / "z3.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(SystemExit, match='ZeRO-3 needs "stage3_gather_16bit_weights_on_model_save": true'):
        check_ds_config(str(cfg))
    check_ds_config(str(ROOT / "ds_configs" / "zero3.json"))  # the bundled one is fine


def test_unpickling_code_cannot_be_switched_back_on(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SystemExit, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set"):
        _main("pretrain.py", ["--output_dir", str(tmp_path / "o")], monkeypatch)


def test_corrupt_tokenizer_json_is_named(model_dir, tmp_path, monkeypatch):
    import shutil

    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(model_dir / "tokenizer.json", tok / "tokenizer.json")
    (tok / "tokenizer.json").write_text((tok / "tokenizer.json").read_text()[:5000])  # truncated
    with pytest.raises(SystemExit, match=f"{tok / 'tokenizer.json'}: not a usable tokenizer"):
        _main("pretrain.py", ["--tokenizer_name", str(tok), "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
                              "--cache_dir", str(tmp_path / "cache")], monkeypatch)


# ---- runs that train: divergence, resume record, overwrite, atomic saves --------------------------------------

def test_divergence_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """--learning_rate 1e9: the first step is finite, the second is not. Exit non-zero naming the step; no final
    model; checkpoint-1 (finite) kept; no checkpoint of a non-finite step."""
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        _main("pretrain.py", ["--learning_rate", "1e9", "--max_steps", "6", "--save_steps", "1", "--output_dir",
                              str(out), "--cache_dir", str(tmp_path / "cache"), *TINY], monkeypatch)
    msg = str(e.value)
    assert "training diverged at step 2" in msg and f"last good checkpoint is {out / 'checkpoint-1'}" in msg, msg
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_an_update_that_overflows_the_weights_is_never_saved(tmp_path, monkeypatch):
    """--learning_rate 1e39: loss and gradient norm of step 1 are finite, the update makes the weights inf.
    The checkpoint of step 1 must not be written."""
    out = tmp_path / "o"
    with pytest.raises(SystemExit, match="training diverged at step 1: non-finite weights .*no checkpoint was saved"):
        _main("pretrain.py", ["--learning_rate", "1e39", "--max_steps", "3", "--save_steps", "1", "--output_dir",
                              str(out), "--cache_dir", str(tmp_path / "cache"), *TINY], monkeypatch)
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_resume_record_refuses_a_changed_run_and_says_what_it_continues(tmp_path, monkeypatch, caplog):
    out, cache = tmp_path / "o", tmp_path / "cache"
    common = ["--max_steps", "2", "--save_steps", "1", "--output_dir", str(out), "--cache_dir", str(cache),
              "--seed", "1", "--disable_tqdm", "true", "--logging_steps", "1", "--report_to", "none",
              "--per_device_train_batch_size", "2"]
    _main("pretrain.py", [*common, "--block_size", "32"], monkeypatch)
    record = json.loads((out / "run.json").read_text())
    assert record["impl"] == "minillm" and record["sequence_length"] == {"block_size": 32}
    assert record["data"][0]["size"] > 0
    assert json.loads((out / "checkpoint-2" / "run.json").read_text())["sequence_length"] == {"block_size": 32}
    modes = {oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()}
    assert len(modes) == 1, f"weights and other files get different modes: {modes}"
    before = _digest(out)
    for change, msg in ([["--block_size", "16"], 'sequence_length: {"block_size": 32} -> {"block_size": 16}'],
                        [["--block_size", "32", "--impl", "hf"], 'impl: "minillm" -> "hf"']):
        with pytest.raises(SystemExit) as e:
            _main("pretrain.py", [*common, *change, "--max_steps", "3"], monkeypatch)
        assert msg in str(e.value) and "--allow_changed_resume" in str(e.value), str(e.value)
        assert f"resuming {out / 'checkpoint-2'}" in str(e.value)
    assert _digest(out) == before, "a refused resume changed the output directory"
    # the explicit flag continues, loudly, and records what changed
    caplog.set_level(logging.WARNING, logger="minillm.train")
    _main("pretrain.py", [*common, "--block_size", "16", "--max_steps", "3", "--allow_changed_resume"], monkeypatch)
    assert f"RESUMING from {out / 'checkpoint-2'} (step 2 of 2)" in caplog.text
    assert "--allow_changed_resume: the resumed run differs" in caplog.text
    assert json.loads((out / "run.json").read_text())["changed_on_resume"]


def test_overwrite_removes_old_checkpoints_temporaries_and_a_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, caplog):
    out, cache = tmp_path / "o", tmp_path / "cache"
    args = ["--max_steps", "1", "--output_dir", str(out), "--cache_dir", str(cache), "--save_strategy", "no", *TINY]
    _main("pretrain.py", args, monkeypatch)
    # an older run's checkpoint, an unfinished save and a half-written cache file of a dead process
    old = out / "checkpoint-6"
    old.mkdir()
    (old / "trainer_state.json").write_text("{}")
    (out / ".tmp-checkpoint-9").mkdir()
    (out / ".tmp-checkpoint-9" / "big.bin").write_bytes(b"\0" * 1000)
    [store] = list(cache.glob("pretrain-*.store"))  # the token store (minillm.infra.store)
    tokens = store / "tokens.bin"
    size = tokens.stat().st_size
    tokens.write_bytes(tokens.read_bytes()[:100])  # truncated
    dead = cache / f"{store.stem}.tmp999999999"
    dead.write_bytes(b"partial")
    caplog.set_level(logging.WARNING, logger="minillm.train")
    _main("pretrain.py", [*args, "--overwrite_output_dir"], monkeypatch)
    assert not old.exists() and not (out / ".tmp-checkpoint-9").exists() and not dead.exists()
    assert "is unreadable" in caplog.text and "rebuilding it" in caplog.text
    assert is_complete(store) and tokens.stat().st_size == size  # rebuilt
    assert json.loads((store / "index.json").read_text())["block_size"] == 32


def test_a_failing_final_save_leaves_the_previous_model_loadable(tmp_path, monkeypatch):
    """A save that dies while writing the weights (as on a full disk) must not touch the previous model."""
    out, cache = tmp_path / "o", tmp_path / "cache"
    args = ["--max_steps", "1", "--output_dir", str(out), "--cache_dir", str(cache), "--save_strategy", "no", *TINY]
    _main("pretrain.py", args, monkeypatch)
    before = _digest(out)
    from minillm.infra import checkpoint

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)  # under CausalLM.save_pretrained
    with pytest.raises(OSError, match="No space left"):
        _main("pretrain.py", [*args, "--overwrite_output_dir", "--seed", "5"], monkeypatch)
    after = _digest(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert after[name] == before[name], f"{name} changed by a failed save"
    monkeypatch.undo()
    from minillm.model import CausalLM
    CausalLM.from_pretrained(out)

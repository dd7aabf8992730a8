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

from minillm.config import ModelConfig
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
    assert not [p for p in out.iterdir() if ".minillm-staging-" in p.name]


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


def _staging(directory: Path, target: str, pid: int, host: str | None = None) -> Path:
    """A staging entry named as minillm names its own (minillm/infra/files.py)."""
    return directory / f".{target}.minillm-staging-{host or os.uname().nodename}-{pid}-deadbeef"


DEAD = 2**22 + 12345  # above pid_max's default: no such process


def test_overwrite_removes_only_what_minillm_wrote_and_a_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, caplog):
    out, cache = tmp_path / "o", tmp_path / "cache"
    args = ["--max_steps", "1", "--output_dir", str(out), "--cache_dir", str(cache), "--save_steps", "1", *TINY]
    _main("pretrain.py", args, monkeypatch)
    assert (out / "checkpoint-1" / "run.json").is_file()
    # minillm's own leftovers: a killed checkpoint save, a killed cache write (this host, a dead pid) ...
    mine = [_staging(out, "checkpoint-9", DEAD), _staging(cache, "sft-0123.pt", DEAD)]
    mine[0].mkdir()
    (mine[0] / "big.bin").write_bytes(b"\0" * 1000)
    mine[1].write_bytes(b"partial")
    # ... and what is not minillm's to delete: a live process's save, another host's, the user's look-alikes
    kept = [_staging(out, "checkpoint-8", os.getppid()), _staging(out, "checkpoint-7", DEAD, host="elsewhere"),
            out / ".tmp-backup", out / ".tmp-checkpoint-9", out / ".tmp-draft.md", cache / "notes.tmp123",
            cache / "pretrain-0123.store.tmp999999999"]
    for k in kept:
        k.mkdir() if "checkpoint" in k.name or k.name == ".tmp-backup" else k.write_text("the user's")
    (out / ".tmp-backup" / "thesis.tex").write_text("the user's")
    user_before = {str(k): _digest(k) if k.is_dir() else k.read_bytes() for k in kept}
    [store] = list(cache.glob("pretrain-*.store"))  # the token store (minillm.infra.store)
    tokens = store / "tokens.bin"
    size = tokens.stat().st_size
    tokens.write_bytes(tokens.read_bytes()[:100])  # truncated
    caplog.set_level(logging.WARNING, logger="minillm.train")
    _main("pretrain.py", [*args, "--overwrite_output_dir", "--save_strategy", "no"], monkeypatch)
    assert not (out / "checkpoint-1").exists() and not any(m.exists() for m in mine)
    assert {str(k): _digest(k) if k.is_dir() else k.read_bytes() for k in kept} == user_before
    assert "is unreadable" in caplog.text and "rebuilding it" in caplog.text
    assert is_complete(store) and tokens.stat().st_size == size  # rebuilt
    assert json.loads((store / "index.json").read_text())["block_size"] == 32


# ---- issue 19 class 1: a refusal changes nothing on disk; nothing but minillm's own files is deleted ------------
# (case, {relative path: content} planted in the output directory, extra flags, expected message)
def _files(d: Path, planted: dict[str, str]) -> None:
    for rel, text in planted.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)


NOT_MINE = [
    ("a non-empty directory with .tmp-* entries of the user's",
     {".tmp-backup/thesis.tex": "x", ".tmp-draft.md": "y", "notes.txt": "z"}, [],
     "is not empty and holds no checkpoint-N to resume from (it holds .tmp-backup, "),
    ("--overwrite_output_dir and a checkpoint-N of the user's", {"checkpoint-3/results.csv": "a,b\n1,2\n"},
     ["--overwrite_output_dir"], "checkpoint-3 is not a checkpoint minillm wrote"),
    ("a plain run and a checkpoint-N of the user's", {"checkpoint-3/results.csv": "a,b\n1,2\n"}, [],
     "checkpoint-3 is not a checkpoint minillm wrote"),
    ("a run.json of the user's", {"run.json": "[1]"}, [], "no checkpoint-N to resume from (it holds run.json)"),
]


@pytest.mark.parametrize("case,planted,flags,message", NOT_MINE, ids=[c[0] for c in NOT_MINE])
def test_a_refused_output_directory_is_left_byte_identical(case, planted, flags, message, tmp_path, monkeypatch):
    out = tmp_path / "o"
    _files(out, planted)
    staging = _staging(out, "checkpoint-9", DEAD)  # even minillm's own leftovers wait until the directory is accepted
    staging.mkdir()
    before = _digest(out)
    with pytest.raises(SystemExit) as e:
        _main("pretrain.py", ["--max_steps", "1", "--output_dir", str(out), "--cache_dir", str(tmp_path / "c"),
                              *flags, *TINY], monkeypatch)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert _digest(out) == before and staging.is_dir(), f"{case}: a refusal changed the output directory"


def test_cache_files_of_the_users_are_left_alone(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _files(cache, {"notes.tmp123": "x", "sft-0123.pt.tmp999999999": "y", ".tmp-mine/a": "z"})
    before = _digest(cache)
    _main("pretrain.py", ["--max_steps", "1", "--output_dir", str(tmp_path / "o"), "--cache_dir", str(cache),
                          "--save_strategy", "no", *TINY], monkeypatch)
    after = _digest(cache)
    assert {k: after[k] for k in before} == before
    assert not [p for p in cache.iterdir() if ".minillm-staging-" in p.name], "a staging file left behind"


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


# ---- issue 19 class 4: damaged run files get one sentence naming the file, never a traceback -----------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished pretraining run (2 steps, checkpoint-1 and checkpoint-2) and a LoRA fine-tune of 2 steps."""
    root = tmp_path_factory.mktemp("finished")
    mp = pytest.MonkeyPatch()
    try:
        _main("pretrain.py", ["--max_steps", "2", "--save_steps", "1", "--output_dir", str(root / "pre"),
                              "--cache_dir", str(root / "cache"), "--seed", "1", *TINY], mp)
        _main("finetune.py", ["--max_steps", "2", "--save_steps", "1", "--output_dir", str(root / "lora"),
                              "--cache_dir", str(root / "cache"), "--use_lora", "--lora_r", "4", "--max_len", "64",
                              *TINY], mp)
    finally:
        mp.undo()
    return root


def _json_edit(rel: str, change):
    def setup(d: Path) -> None:
        (d / rel).write_text(json.dumps(change(json.loads((d / rel).read_text()))))
    return setup


def _text(rel: str, text: str):
    return lambda d: (d / rel).write_text(text)


def _tensors(rel: str, change):
    def setup(d: Path) -> None:
        from safetensors.torch import save_file
        t = load_file(d / rel)
        change(t)
        save_file(t, d / rel, metadata={"format": "pt"})
    return setup


def _first(t: dict, fn) -> None:
    key = sorted(t)[0]
    t[key] = fn(t[key])


CK = "checkpoint-2"
# (case, run, setup(run directory), flags, message); every case resumes checkpoint-2 with --max_steps 3
DAMAGED = [
    ("trainer_state.json []", "pre", _text(f"{CK}/trainer_state.json", "[]"), [],
     f"{CK}/trainer_state.json: expected a JSON object, got list"),
    ("trainer_state.json unknown keys", "pre", _json_edit(f"{CK}/trainer_state.json", lambda d: {**d, "eta": 1}), [],
     f"{CK}/trainer_state.json: unknown keys ['eta']"),
    ("global_step 1e15", "pre", _json_edit(f"{CK}/trainer_state.json", lambda d: {**d, "global_step": 1e15}), [],
     f"{CK}/trainer_state.json: global_step is 1000000000000000.0, not a step count"),
    ("global_step past max_steps", "pre",
     _json_edit(f"{CK}/trainer_state.json", lambda d: {**d, "global_step": 10**15}), [],
     f"{CK}/trainer_state.json: global_step 1000000000000000 is past its own max_steps 2"),
    ("model.safetensors missing a tensor", "pre", _tensors(f"{CK}/model.safetensors", lambda t: t.pop(sorted(t)[0])),
     [], f"{CK}/model.safetensors: tensors do not match the model: 1 missing"),
    ("model.safetensors wrong shape", "pre",
     _tensors(f"{CK}/model.safetensors", lambda t: _first(t, lambda v: v[:1].clone())), [],
     f"{CK}/model.safetensors: lm_head.weight has shape (1, 64)"),
    ("model.safetensors NaN", "pre",
     _tensors(f"{CK}/model.safetensors", lambda t: _first(t, lambda v: v * float("nan"))), [],
     f"{CK}/model.safetensors: lm_head.weight holds NaN or infinite values"),
    ("run.json [1]", "pre", _text(f"{CK}/run.json", "[1]"), [], f"{CK}/run.json: expected a JSON object, got list"),
    ("run.json learning_rate 'fast'", "pre", _json_edit(f"{CK}/run.json", lambda d: {**d, "learning_rate": "fast"}),
     [], f"{CK}/run.json: 'learning_rate' is 'fast', not a learning rate"),
    ("run.json 1e999", "pre",
     _text(f"{CK}/run.json", '{"script": "pretrain.py", "impl": "minillm", "learning_rate": 1e999}'), [],
     f"{CK}/run.json: 1e999 (beyond a float's range) is not a number JSON allows"),
    ("LoRA checkpoint of the wrong shape", "lora",
     _tensors(f"{CK}/adapter_model.safetensors", lambda t: _first(t, lambda v: torch.cat([v, v]))), [],
     f"{CK}/adapter_model.safetensors: "),
    ("truncated all_results.json of a complete run", "pre", _text("all_results.json", '{"epoch": 1.0, "train_lo'),
     ["--max_steps", "2"], "all_results.json:1: not valid JSON"),
    ("a complete run whose final model was never saved", "pre", lambda d: (d / "model.safetensors").unlink() or
     (d / "config.json").unlink(), ["--max_steps", "2"], f"its final model was never saved"),
]


@pytest.mark.parametrize("case,run,setup,flags,message", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_a_damaged_run_file_is_named(case, run, setup, flags, message, finished, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / run
    shutil.copytree(finished / run, out)
    setup(out)
    damaged = _digest(out)
    script = "pretrain.py" if run == "pre" else "finetune.py"
    extra = ["--use_lora", "--lora_r", "4", "--max_len", "64"] if run == "lora" else []
    with pytest.raises(SystemExit) as e:
        _main(script, ["--max_steps", "3", "--save_steps", "1", "--output_dir", str(out), "--cache_dir",
                       str(finished / "cache"), *extra, *TINY, *flags], monkeypatch)
    msg = str(e.value)
    assert message in msg and str(out) in msg and "\n" not in msg, f"{case}: {msg}"
    after = _digest(out)
    assert {k: v for k, v in after.items() if k != "run.json"} == \
        {k: v for k, v in damaged.items() if k != "run.json"}, f"{case}: files changed, or something was trained"


def test_a_finished_run_started_again_says_so_and_exits_0(finished, tmp_path, monkeypatch, capsys):
    import shutil

    out = tmp_path / "pre"
    shutil.copytree(finished / "pre", out)
    before = _digest(out)
    _main("pretrain.py", ["--max_steps", "2", "--save_steps", "1", "--output_dir", str(out), "--cache_dir",
                          str(finished / "cache"), *TINY], monkeypatch)
    printed = capsys.readouterr().out
    assert f"{out}: this run is already complete ({out / 'checkpoint-2'}, step 2 of 2)" in printed
    assert "train_loss" not in printed
    after = _digest(out)
    assert {k: v for k, v in after.items() if k != "run.json"} == {k: v for k, v in before.items() if k != "run.json"}


def test_the_last_good_checkpoint_has_finite_weights(finished, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from train.run import last_checkpoint

    out = tmp_path / "pre"
    shutil.copytree(finished / "pre", out)
    assert last_checkpoint(str(out)) == str(out / "checkpoint-2")
    t = load_file(out / "checkpoint-2" / "model.safetensors")
    _first(t, lambda v: v * float("inf"))
    save_file(t, out / "checkpoint-2" / "model.safetensors")
    assert last_checkpoint(str(out)) == str(out / "checkpoint-1")


# ---- issue 19 classes 7 and 8: no misleading figure; a refusal exactly as broad as the overlap ---------------------

def test_gradient_accumulation_beyond_the_data_is_refused(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        _main("pretrain.py", ["--max_steps", "1", "--gradient_accumulation_steps", "1000000000", "--output_dir",
                              str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c"), *TINY], monkeypatch)
    assert "--gradient_accumulation_steps 1000000000: one optimizer step would accumulate that many batches, but the " \
        "training data (" in str(e.value) and "use at most" in str(e.value), str(e.value)
    assert not (tmp_path / "o" / "all_results.json").exists() and not list((tmp_path / "o").glob("checkpoint-*"))


# (case, output_dir, inputs, expected refusal or None) in a working directory holding config.json, data.jsonl,
# model/ and tok/: the everyday layouts pass, exactly the overlapping ones are refused.
LAYOUTS = [
    ("config file here, output in a subdirectory", "out", {"config_name": "config.json"}, None),
    ("data file here, output in a subdirectory", "out", {"train_files": ["data.jsonl"]}, None),
    ("config and data here, output two levels down", "runs/a", {"config_name": "./config.json",
                                                               "train_files": ["./data.jsonl"]}, None),
    ("model directory beside the output", "sft", {"model_name_or_path": "model", "tokenizer_name": "tok"}, None),
    ("output is the directory of the config file", ".", {"config_name": "config.json"},
     "--output_dir . is the directory of --config_name config.json"),
    ("output is the directory of a data file", ".", {"train_files": ["data.jsonl"]},
     "--output_dir . is the directory of --train_files data.jsonl"),
    ("output is the model", "model", {"model_name_or_path": "model"}, "is the same directory as --model_name_or_path"),
    ("output inside the model", "model/sft", {"model_name_or_path": "model"}, "is inside --model_name_or_path"),
    ("output contains the model", ".", {"model_name_or_path": "model"}, "contains --model_name_or_path"),
    ("output is the config file itself", "config.json", {"config_name": "config.json"}, "contains --config_name"),
]


@pytest.mark.parametrize("case,output,inputs,refusal", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_output_directory_overlap(case, output, inputs, refusal, tmp_path, monkeypatch):
    from train.safety import check_paths

    monkeypatch.chdir(tmp_path)
    _files(tmp_path, {"config.json": "{}", "data.jsonl": "", "model/config.json": "{}", "tok/tokenizer.json": "{}"})
    err = check_paths(output, inputs)
    assert (err is None) if refusal is None else (refusal in err), f"{case}: {err}"


def test_config_file_in_the_working_directory_output_in_a_subdirectory_trains(tmp_path, monkeypatch):
    """The issue's own command: --config_name ./config.json --output_dir ./out."""

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf()))
    before = (tmp_path / "config.json").read_bytes()
    _main("pretrain.py", ["--config_name", "./config.json", "--output_dir", "./out", "--max_steps", "1",
                          "--save_strategy", "no", "--cache_dir", str(tmp_path / "c"), *TINY], monkeypatch)
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "config.json").read_bytes() == before


def test_token_ids_past_the_models_vocabulary_are_refused_before_training(tmp_path, monkeypatch):
    """The bundled tokenizer's ids go up to 4095; a model with 64 embedding rows would crash mid-run in the
    embedding. pretrain.py refuses it before training."""
    for k in LAUNCHER_ENV:
        monkeypatch.delenv(k, raising=False)
    cfg = tmp_path / "small-vocab.json"
    cfg.write_text(json.dumps({**ModelConfig.preset("tiny", vocab_size=64).to_hf()}))
    argv = ["--config_name", str(cfg), "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
            "--max_steps", "1", "--block_size", "32"]
    with pytest.raises(SystemExit) as e:
        _main("pretrain.py", argv, monkeypatch)
    # the tokenizer's size is checked first; a store whose ids pass it (added tokens, gapped vocabularies) meets
    # check_ids_fit on the same path (its cases: tests/test_hostile_store.py)
    assert "the tokenizer has 4096 tokens but the model's vocab_size is 64" in str(e.value), e.value
    assert not (tmp_path / "out" / "model.safetensors").exists()

"""Training scripts end to end: 2-rank DeepSpeed ZeRO-2 on CPU, both impls, resume after SIGKILL, bad input.

The multi-rank runs are real `torchrun --nproc_per_node 2` launches (torchrun starts ~5 s faster than
the deepspeed launcher; the engine and ZeRO-2 collectives are the same). Each costs ~25 s of start-up
(imports, gloo, DeepSpeed) for well under a second of training, so one run serves several assertions:
the uninterrupted minillm pretrain run is both the loss-agreement run and the resume reference.
Bad-argument checks run in-process (one import of transformers instead of one per case).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "train"
LOSS_TOL = 1e-5  # fp32, same weights and batches; observed differences are ~1e-7 (float summation order)
PRETRAIN = ["--config_name", "tiny", "--block_size", "32", "--per_device_train_batch_size", "2",
            "--max_steps", "24", "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "7",
            "--save_strategy", "steps", "--save_steps", "4", "--disable_tqdm", "true", "--report_to", "none",
            "--deepspeed", str(ROOT / "ds_configs" / "zero2.json")]


def _env(cache: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MINILLM_CACHE": str(cache),
           "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    return env


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _cmd(script: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(),
            str(TRAIN / script), *args]


def _run(script: str, args: list[str], cache: Path, log: Path) -> None:
    with open(log, "w") as f:
        rc = subprocess.call(_cmd(script, args), stdout=f, stderr=subprocess.STDOUT, env=_env(cache), cwd=ROOT)
    assert rc == 0, f"{script} failed (exit {rc}):\n" + "".join(log.read_text().splitlines(True)[-40:])


def _losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def _assert_same_curve(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= LOSS_TOL, f"loss curves differ by {worst:.3g}: {a} vs {b}"
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2-rank ZeRO-2 pretrain with each impl (minillm's also writes checkpoints every 4 steps)."""
    tmp = tmp_path_factory.mktemp("train")
    cache = tmp / "cache"
    for impl in ("minillm", "hf"):
        _run("pretrain.py", ["--impl", impl, "--output_dir", str(tmp / f"pre-{impl}"), *PRETRAIN], cache,
             tmp / f"pre-{impl}.log")
    return tmp


def test_pretrain_two_ranks_both_impls_agree(runs):
    a, b = _losses(runs / "pre-minillm"), _losses(runs / "pre-hf")
    assert len(a) == 24
    _assert_same_curve(a, b)
    assert a[24] < a[1] - 0.5, f"the loss did not go down: {a[1]} -> {a[24]}"
    # 2 ranks x batch 2 = 4 blocks per step: the data was split between the ranks, not duplicated
    state = json.loads((runs / "pre-minillm" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 2 and state["log_history"][-1]["step"] == 24
    log = (runs / "pre-minillm.log").read_text()
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in log


def test_outputs_load_across_impls(runs):
    """minillm's output loads in transformers and hf's in minillm, with the same logits as their own."""
    from transformers import AutoModelForCausalLM

    from minillm.model import CausalLM

    x = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    for d in ("pre-minillm", "pre-hf"):
        out = runs / d
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
        ours = CausalLM.from_pretrained(out).eval()
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            diff = (ours(x).logits - theirs(input_ids=x).logits).abs().max().item()
        assert diff < 1e-5, f"{d}: minillm vs transformers logits differ by {diff}"
    wa = load_file(runs / "pre-minillm" / "model.safetensors")
    wb = load_file(runs / "pre-hf" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4  # 24 AdamW steps from equal weights


def test_resume_after_sigkill_matches_uninterrupted_run(runs):
    """Kill all ranks (SIGKILL) once a checkpoint exists, rerun the same command: same final loss and weights."""
    out, cache = runs / "killed", runs / "cache"
    cmd = _cmd("pretrain.py", ["--impl", "minillm", "--output_dir", str(out), *PRETRAIN])
    with open(runs / "killed-1.log", "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(cache), cwd=ROOT)
        deadline = time.time() + 240
        while not (out / "checkpoint-4" / "trainer_state.json").exists():
            assert proc.poll() is None, "the run ended before writing checkpoint-4:\n" + (runs / "killed-1.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint-4 after 240 s"
            time.sleep(0.05)
        # torchrun starts each rank in its own session: kill the launcher and every rank, by pid
        victims = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        for pid in victims[1:]:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).wait(timeout=30)
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed: nothing tested"
    done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert done and done[-1] < 24
    _run("pretrain.py", ["--impl", "minillm", "--output_dir", str(out), *PRETRAIN], cache, runs / "killed-2.log")
    assert "resuming from" in (runs / "killed-2.log").read_text()
    ref, got = _losses(runs / "pre-minillm"), _losses(out)
    assert abs(ref[24] - got[24]) < 1e-6, f"final loss {got[24]} after resume vs {ref[24]} uninterrupted"
    wa, wb = load_file(runs / "pre-minillm" / "model.safetensors"), load_file(out / "model.safetensors")
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-6, f"final weights differ by {worst} after resume"


class _Payload:
    """Unpickling this runs a shell command (what a planted checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_code_from_a_deepspeed_checkpoint(runs):
    """A pickle payload planted in global_stepN/mp_rank_00_model_states.pt (which DeepSpeed loads with
    weights_only=False) must not run: the resume stops with a sentence naming the file."""
    import shutil

    out, marker = runs / "planted", runs / "PAYLOAD-RAN"
    out.mkdir()
    shutil.copytree(runs / "pre-minillm" / "checkpoint-4", out / "checkpoint-4")
    states = out / "checkpoint-4" / "global_step4" / "mp_rank_00_model_states.pt"
    sd = torch.load(states, weights_only=True)
    sd["extra"] = _Payload(marker)
    torch.save(sd, states)
    log = runs / "planted.log"
    with open(log, "w") as f:
        rc = subprocess.call(_cmd("pretrain.py", ["--impl", "minillm", "--output_dir", str(out), *PRETRAIN]),
                             stdout=f, stderr=subprocess.STDOUT, env=_env(runs / "cache"), cwd=ROOT, timeout=600)
    text = log.read_text()
    assert not marker.exists(), "the planted pickle ran"
    assert rc != 0
    assert f"pretrain.py: error: refusing to load {states} (" in text and "could run code" in text, text[-3000:]
    assert not (out / "model.safetensors").exists()


def test_divergence_stops_every_rank(runs):
    """2 ranks, --learning_rate 1e9: both ranks stop at the first non-finite step (no hang), exit non-zero, keep the
    last good checkpoint and write no final model."""
    out, log = runs / "diverged", runs / "diverged.log"
    args = [a if a != "3e-3" else "1e9" for a in PRETRAIN]
    args[args.index("--save_steps") + 1] = "1"
    with open(log, "w") as f:
        rc = subprocess.call(_cmd("pretrain.py", ["--output_dir", str(out), *args]), stdout=f,
                             stderr=subprocess.STDOUT, env=_env(runs / "cache"), cwd=ROOT, timeout=600)
    text = log.read_text()
    assert rc != 0
    # one line per rank (the ranks share the log, so a line may be interleaved with the other rank's output)
    steps = re.findall(r"pretrain\.py: error: training diverged at step (\d+): ", text)
    assert len(steps) == 2 and steps[0] == steps[1], text[-3000:]
    step = int(steps[0])
    assert f"the last good checkpoint is {out / f'checkpoint-{step - 1}'}" in text
    assert not (out / "model.safetensors").exists() and not (out / f"checkpoint-{step}").exists()
    weights = load_file(out / f"checkpoint-{step - 1}" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


SFT_ARGS = ["--use_lora", "--lora_target_modules", "all-linear", "--max_len", "64", "--per_device_train_batch_size",
            "2", "--max_steps", "6", "--learning_rate", "5e-3", "--logging_steps", "1", "--seed", "7",
            "--disable_tqdm", "true", "--report_to", "none"]


def test_finetune_lora_two_ranks_both_impls_agree(runs):
    base = runs / "pre-minillm"
    args = ["--model_name_or_path", str(base), *SFT_ARGS, "--deepspeed", str(ROOT / "ds_configs" / "zero2.json")]
    for impl in ("minillm", "hf"):
        _run("finetune.py", ["--impl", impl, "--output_dir", str(runs / f"sft-{impl}"), *args], runs / "cache",
             runs / f"sft-{impl}.log")
    _assert_same_curve(_losses(runs / "sft-minillm"), _losses(runs / "sft-hf"))
    for impl in ("minillm", "hf"):  # peft-format adapters, with the tokenizer alongside
        files = set(os.listdir(runs / f"sft-{impl}"))
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    a = load_file(runs / "sft-minillm" / "adapter_model.safetensors")
    b = load_file(runs / "sft-hf" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_finetune_lora_minillm_under_zero3_saves_a_complete_adapter(runs):
    """ZeRO-3 partitions the adapter too: the saved adapter must hold the gathered tensors (not empty ones),
    train like the ZeRO-2 run, and load in peft."""
    import peft
    from transformers import AutoModelForCausalLM

    out = runs / "sft-minillm-z3"
    assert (runs / "sft-minillm").is_dir(), "runs after test_finetune_lora_two_ranks_both_impls_agree (its reference)"
    _run("finetune.py", ["--impl", "minillm", "--output_dir", str(out), "--model_name_or_path", str(runs / "pre-minillm"),
                         *SFT_ARGS,
                         "--deepspeed", str(ROOT / "ds_configs" / "zero3.json")], runs / "cache", runs / "sft-z3.log")
    z3 = load_file(out / "adapter_model.safetensors")
    z2 = load_file(runs / "sft-minillm" / "adapter_model.safetensors")
    assert z3.keys() == z2.keys() and all(z3[k].shape == z2[k].shape and z3[k].numel() > 0 for k in z3)
    assert max((z3[k] - z2[k]).abs().max().item() for k in z3) < 1e-4
    _assert_same_curve(_losses(out), _losses(runs / "sft-minillm"))
    base = AutoModelForCausalLM.from_pretrained(runs / "pre-minillm")
    model = peft.PeftModel.from_pretrained(base, out)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(z3) and all(v.abs().sum() > 0 for k, v in loaded.items() if "lora_B" in k)


# ---- bad input: clear errors, in-process -----------------------------------------------------------------

def _main(script: str, argv: list[str], monkeypatch) -> None:
    import importlib

    monkeypatch.setattr(sys, "argv", [script, *argv])
    # the scripts make every torch.load in the process weights-only: undo that for the rest of the session
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    importlib.import_module("train." + script.removesuffix(".py")).main()


@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py"])
def test_unknown_impl_is_refused(script, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _main(script, ["--impl", "jax"], monkeypatch)
    err = capsys.readouterr().err
    assert "--impl" in err and "jax" in err and "minillm" in err


def test_missing_file_is_named(tmp_path, monkeypatch):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SystemExit, match=re.escape(f"--train_files: no such file: {missing}")):
        _main("pretrain.py", ["--train_files", str(missing), "--output_dir", str(tmp_path / "o")], monkeypatch)


@pytest.mark.parametrize("script,good", [("pretrain.py", {"text": "hello world"}),
                                         ("finetune.py", {"conversations": [{"from": "human", "value": "hi"},
                                                                            {"from": "assistant", "value": "yo"}]})])
def test_malformed_jsonl_line_is_named(script, good, tmp_path, monkeypatch):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    with pytest.raises(SystemExit, match=re.escape(f"{data}:3: malformed JSON")):
        _main(script, ["--train_files", str(data), "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
                       "--cache_dir", str(tmp_path / "cache")], monkeypatch)


def test_non_empty_output_dir_without_checkpoint_is_refused(tmp_path, monkeypatch):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty and holds no checkpoint"):
        _main("pretrain.py", ["--output_dir", str(tmp_path / "o")], monkeypatch)


@pytest.mark.parametrize("impl", ["minillm", "hf"])
def test_gradient_checkpointing_gives_the_same_losses(impl, tmp_path, monkeypatch):
    """--gradient_checkpointing (the Trainer calls the model's enable method) changes memory, not the numbers."""
    curves = []
    for gc in ([], ["--gradient_checkpointing"]):
        out = tmp_path / f"gc{len(gc)}"
        _main("pretrain.py", ["--impl", impl, "--output_dir", str(out), "--max_steps", "3", "--block_size", "32",
                              "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--seed", "3",
                              "--disable_tqdm", "true", "--logging_steps", "1", "--cache_dir", str(tmp_path / "cache"),
                              *gc], monkeypatch)
        curves.append(_losses(out))
    _assert_same_curve(*curves)


@pytest.mark.skipif(importlib.util.find_spec("swanlab") is not None, reason="swanlab is installed here")
def test_report_to_missing_package_is_named(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="--report_to swanlab: the swanlab package is not installed"):
        _main("pretrain.py", ["--report_to", "swanlab", "--output_dir", str(tmp_path / "o")], monkeypatch)


def test_streaming_pretrain_runs(tmp_path, monkeypatch):
    """--streaming reads and chunks lazily (no cache) and needs --max_steps."""
    with pytest.raises(SystemExit, match="--streaming needs --max_steps"):
        _main("pretrain.py", ["--streaming", "--output_dir", str(tmp_path / "a")], monkeypatch)
    _main("pretrain.py", ["--streaming", "--max_steps", "2", "--block_size", "32", "--per_device_train_batch_size", "2",
                          "--output_dir", str(tmp_path / "b"), "--cache_dir", str(tmp_path / "cache"),
                          "--disable_tqdm", "true", "--logging_steps", "1"], monkeypatch)
    assert len(_losses(tmp_path / "b")) == 2 and (tmp_path / "b" / "model.safetensors").exists()
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_report_to_tensorboard_with_minillm_writes_events(tmp_path, monkeypatch):
    """The tensorboard callback reads model.config.to_json_string(): a minillm model must provide it."""
    _main("pretrain.py", ["--report_to", "tensorboard", "--max_steps", "2", "--block_size", "32",
                          "--per_device_train_batch_size", "2", "--max_train_samples", "50", "--logging_steps", "1",
                          "--output_dir", str(tmp_path / "o"), "--cache_dir", str(tmp_path / "cache"),
                          "--disable_tqdm", "true"], monkeypatch)
    assert list((tmp_path / "o").rglob("events.out.tfevents*"))  # transformers 5 writes them under output_dir/runs


def test_finetune_validation_split_holds_out_the_first_conversations(tmp_path, monkeypatch, caplog):
    """--validation_split_percentage in finetune.py (it was silently ignored): the first N% of the conversations
    validate (run_clm's train[:N%]), the rest train, and the run evaluates on them."""
    import logging

    caplog.set_level(logging.INFO, logger="minillm.train")
    out = tmp_path / "o"
    _main("finetune.py", ["--validation_split_percentage", "10", "--max_steps", "2", "--max_len", "64",
                          "--logging_steps", "1",
                          "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--disable_tqdm", "true",
                          "--report_to", "none"], monkeypatch)
    n = sum(1 for line in open(ROOT / "minillm" / "data" / "sft.jsonl") if line.strip())
    assert f"conversations [0, {round(n / 10)}) of" in caplog.text
    assert f"Training on {n - round(n / 10)} conversations" in caplog.text
    assert "eval_loss" in json.loads((out / "all_results.json").read_text())
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the run's loss curve, as a picture


def test_loss_plot_needs_a_logged_loss(tmp_path):
    from train.plots import save_loss_plot

    save_loss_plot([{"train_runtime": 1.0}], tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()
    save_loss_plot([{"step": s, "loss": 5.0 - 0.1 * s} for s in range(1, 30)] + [{"step": 29, "eval_loss": 2.5}],
                          tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_finetune_hf_from_a_checkpoint_under_zero3_matches_minillm(runs):
    """--impl hf --model_name_or_path under 2-rank ZeRO-3: transformers' from_pretrained builds the model inside
    deepspeed.zero.Init, whose config read world size 1 on CPU and died ("train_batch_size 8 != 4 * 1 * 1").
    Full SFT with each impl: same loss curve, and the hf run's saved model loads with the weights minillm reached."""
    from transformers import AutoModelForCausalLM

    from minillm.model import CausalLM

    args = ["--model_name_or_path", str(runs / "pre-minillm"), "--max_len", "64", "--per_device_train_batch_size", "4",
            "--max_steps", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "7", "--disable_tqdm",
            "true", "--report_to", "none", "--deepspeed", str(ROOT / "ds_configs" / "zero3.json")]
    for impl in ("minillm", "hf"):
        _run("finetune.py", ["--impl", impl, "--output_dir", str(runs / f"full-z3-{impl}"), *args], runs / "cache",
             runs / f"full-z3-{impl}.log")
    log = (runs / "full-z3-hf.log").read_text()
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in log  # 2 ranks x 4
    a, b = _losses(runs / "full-z3-minillm"), _losses(runs / "full-z3-hf")
    assert len(a) == 4
    _assert_same_curve(a, b)
    wa = load_file(runs / "full-z3-minillm" / "model.safetensors")
    wb = load_file(runs / "full-z3-hf" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(wb[k].shape == wa[k].shape for k in wa)  # gathered, not empty partitions
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4  # 4 AdamW steps from equal weights
    x = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(runs / "full-z3-hf").eval()(input_ids=x).logits
        ours = CausalLM.from_pretrained(runs / "full-z3-hf").eval()(x).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_hf_from_a_checkpoint_under_zero3_refuses_a_dtype_it_would_ignore(tmp_path, monkeypatch):
    """--impl hf --model_name_or_path under ZeRO-3: transformers loads inside deepspeed.zero.Init, which sets the
    weights' dtype from the DeepSpeed config (measured: a --dtype bfloat16 run trained and saved float32)."""
    (tmp_path / "m").mkdir()
    with pytest.raises(SystemExit, match="--dtype bfloat16 with --impl hf --model_name_or_path under ZeRO-3"):
        _main("finetune.py", ["--impl", "hf", "--model_name_or_path", str(tmp_path / "m"), "--dtype", "bfloat16",
                              "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"), "--output_dir",
                              str(tmp_path / "o")], monkeypatch)

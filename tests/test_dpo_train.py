"""train/dpo.py end to end: the trajectory check (2 ranks, DeepSpeed ZeRO-2, 20 steps, --impl minillm vs --impl hf =
TRL 1.16's DPOTrainer, full fine-tuning and LoRA: per-step loss and reward margin within 1e-5), run.json, loss.png
with the reward margin, resume from checkpoint-N continuing the uninterrupted curve, --packing equal to padding.

The base is a tiny model SFT'd in-process for a few dozen steps on the bundled conversations (so the DPO pairs are
not scored by a random model). Each 2-rank launch costs ~25 s of start-up for ~3 s of training.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train import ROOT, _run

TOL = 1e-5  # per step, |delta loss| and |delta rewards/margins|; measured ~2e-7 (fp32 summation order)
DPO = ["--max_steps", "20", "--per_device_train_batch_size", "4", "--max_length", "128", "--logging_steps", "1",
       "--seed", "7", "--disable_tqdm", "true", "--report_to", "none",
       "--deepspeed", str(ROOT / "ds_configs" / "zero2.json")]
FULL = ["--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "10"]
LORA = ["--peft", "lora", "--lora_target_modules", "all-linear", "--learning_rate", "5e-3", "--save_strategy", "no"]
METRICS = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def sft_base(out: Path, steps: int = 40) -> Path:
    """A tiny model taught the bundled conversations for `steps` AdamW steps (batch 16), saved with the tokenizer."""
    from transformers import AutoTokenizer

    from minillm.config import ModelConfig
    from minillm.infra import corpus
    from minillm.model import CausalLM
    from minillm.sft import mask_batch

    tok = AutoTokenizer.from_pretrained(str(corpus.TOKENIZER_DIR))
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = CausalLM(ModelConfig.from_hf({**cfg.to_hf(), "bos_token_id": tok.bos_token_id,
                                          "eos_token_id": tok.eos_token_id}))
    samples = mask_batch(list(corpus.iter_sft_conversations()), tok, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(samples["input_ids"]), (16,), generator=g).tolist()
        T = max(len(samples["input_ids"][i]) for i in idx)
        x = torch.tensor([samples["input_ids"][i] + [0] * (T - len(samples["input_ids"][i])) for i in idx])
        y = torch.tensor([samples["labels"][i] + [-100] * (T - len(samples["labels"][i])) for i in idx])
        model(x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def curves(out: Path) -> dict[int, dict[str, float]]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: e for e in state["log_history"] if "loss" in e}


def worst(a: dict, b: dict, key: str, steps=None) -> float:
    steps = sorted(a) if steps is None else steps
    assert set(steps) <= a.keys() and set(steps) <= b.keys()
    return max(abs(a[s][key] - b[s][key]) for s in steps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    sft_base(tmp / "base")
    return tmp


def launch(runs: Path, name: str, impl: str, extra: list[str]) -> Path:
    out = runs / name
    _run("dpo.py", ["--impl", impl, "--model_name_or_path", str(runs / "base"), "--output_dir", str(out), *DPO,
                    *extra], runs / "cache", runs / f"{name}.log")
    return out


def agree(a: Path, b: Path) -> dict[str, float]:
    ca, cb = curves(a), curves(b)
    assert sorted(ca) == sorted(cb) == list(range(1, 21))
    figures = {k: worst(ca, cb, k) for k in METRICS}
    print(f"\n{a.name} vs {b.name}: " + ", ".join(f"max |d {k}| {v:.3g}" for k, v in figures.items()))
    assert figures["loss"] <= TOL and figures["rewards/margins"] <= TOL, figures
    # the other metrics: rewards as the margin; logps (~ -40) to a few fp32 ulps of their size
    assert max(figures[k] for k in METRICS[2:5]) <= TOL, figures
    assert max(figures[k] for k in METRICS[5:]) <= 1e-5 * max(abs(e["logps/chosen"]) for e in ca.values()), figures
    return figures


def test_full_two_ranks_minillm_equals_trl(runs):
    a = launch(runs, "full-minillm", "minillm", FULL)
    b = launch(runs, "full-hf", "hf", FULL)
    agree(a, b)
    c = curves(a)
    assert c[20]["rewards/margins"] != 0 and any(e["rewards/margins"] != 0 for e in c.values())
    for out in (a, b):  # run.json with the DPO settings, loss.png, the final model
        record = json.loads((out / "run.json").read_text())
        assert record["script"] == "dpo.py" and record["dpo"]["beta"] == 0.1
        assert record["sequence_length"] == {"max_length": 128}
        assert (out / "loss.png").is_file() and (out / "model.safetensors").is_file()
        assert (out / "checkpoint-10" / "run.json").is_file()


def test_lora_two_ranks_minillm_equals_trl_with_the_adapter_off_as_reference(runs):
    a = launch(runs, "lora-minillm", "minillm", LORA)
    b = launch(runs, "lora-hf", "hf", LORA)
    agree(a, b)
    for out in (a, b):
        assert (out / "adapter_config.json").is_file()


def test_resume_from_a_checkpoint_continues_the_uninterrupted_curve(runs, monkeypatch):
    full = runs / "full-minillm"
    assert full.is_dir(), "runs after test_full_two_ranks_minillm_equals_trl (its uninterrupted run)"
    out = runs / "resumed"
    out.mkdir()
    shutil.copytree(full / "checkpoint-10", out / "checkpoint-10")
    shutil.copy(full / "run.json", out / "run.json")
    # a changed DPO objective is refused before anything is built
    monkeypatch.setattr(sys, "argv", ["dpo.py", "--model_name_or_path", str(runs / "base"), "--output_dir", str(out),
                                      *DPO, *FULL, "--beta", "0.2"])
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    from train import dpo as script
    with pytest.raises(SystemExit, match='dpo: .*"beta": 0.1.* -> .*"beta": 0.2'):
        script.main()
    launch(runs, "resumed", "minillm", FULL)
    assert "RESUMING from" in (runs / "resumed.log").read_text()
    a, b = curves(full), curves(out)
    assert sorted(b) == list(range(1, 21))  # the checkpoint's history, then steps 11-20 trained now
    figures = {k: worst(a, b, k, range(11, 21)) for k in ("loss", "rewards/margins")}
    print(f"\nresumed at 10 vs uninterrupted, steps 11-20: {figures}")
    assert max(figures.values()) <= TOL, figures
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("checkpoint-10")


def test_packing_trains_as_padding(runs, tmp_path, monkeypatch):
    """One process, no DeepSpeed: --packing and padded batches give the same per-step losses and margins."""
    from train import dpo as script

    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    common = ["--model_name_or_path", str(runs / "base"), "--max_steps", "6", "--per_device_train_batch_size", "4",
              "--max_length", "64", "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "7",
              "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none"]
    for name, extra in (("padded", []), ("packed", ["--packing"])):
        monkeypatch.setattr(sys, "argv", ["dpo.py", *common, "--output_dir", str(tmp_path / name), *extra])
        script.main()
    a, b = curves(tmp_path / "padded"), curves(tmp_path / "packed")
    figures = {k: worst(a, b, k) for k in ("loss", "rewards/margins")}
    assert len(a) == 6 and max(figures.values()) <= 1e-5, figures
    assert json.loads((tmp_path / "packed" / "run.json").read_text())["packing"]["packing"] is True
    with pytest.raises(SystemExit, match="minillm's only"):
        monkeypatch.setattr(sys, "argv", ["dpo.py", *common, "--impl", "hf", "--packing",
                                          "--output_dir", str(tmp_path / "hf")])
        script.main()


def test_default_learning_rate_by_method_and_width(tmp_path):
    """train/dpo.py DEFAULT_LR: measured for full DPO and LoRA of hidden <= 512 models; TRL's 1e-6 otherwise."""
    from train import dpo as script
    from train.args import ModelArguments
    from train.peft_methods import PeftArguments

    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps({"hidden_size": 1024}))
    tiny = ModelArguments(config_name="tiny")
    assert script.default_learning_rate(tiny, PeftArguments()) == script.DEFAULT_LR["none"] == 3e-4
    assert script.default_learning_rate(tiny, PeftArguments(peft="lora")) == 3e-3
    assert script.default_learning_rate(tiny, PeftArguments(use_lora=True)) == 3e-3
    assert script.default_learning_rate(tiny, PeftArguments(peft="prefix")) == script.TRL_LR == 1e-6
    assert script.default_learning_rate(ModelArguments(model_name_or_path=str(wide)), PeftArguments()) == 1e-6


def test_pair_logps_are_the_training_log_probs(runs):
    """train/dpo.py pair_logps (the demo's preference table): each row's (chosen, rejected) log-probs, equal to
    minillm.dpo.completion_logps on the batch training collates, whatever the batch size."""
    from transformers import AutoTokenizer

    from minillm import dpo, preference
    from minillm.model import CausalLM
    from train.dpo import SAMPLE_DPO, pair_logps

    tok = AutoTokenizer.from_pretrained(str(runs / "base"))
    model = CausalLM.from_pretrained(str(runs / "base"))
    rows = [json.loads(line) for line in SAMPLE_DPO.read_text(encoding="utf-8").splitlines()[:6]]
    ids, _ = preference.tokenize_rows(tok, rows, tok.eos_token, 1024)
    with torch.no_grad():
        chosen, rejected = dpo.completion_logps(model, preference.collate(ids, tok.pad_token_id, 1024)).chunk(2)
    for batch_size in (6, 4, 1):
        got = pair_logps(model, tok, rows, batch_size=batch_size)
        assert len(got) == 6
        for (c, r), c0, r0 in zip(got, chosen.tolist(), rejected.tolist()):
            assert abs(c - c0) <= 1e-4 and abs(r - r0) <= 1e-4
        assert all(c < 0 and r < 0 for c, r in got)

"""train/doctor.py: a run inside the reference band is normal; typical mistakes are far off and named."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from minillm.config import ModelConfig
from minillm.data import TOKENIZER_DIR
from parity.model import random_model

ROOT = Path(__file__).resolve().parent.parent
from train import doctor


def curve(start: float, end: float, n: int, wiggle: float = 0.0, phase: int = 0) -> list[float]:
    """An exponential-ish fall from start to end over n steps, with a deterministic wiggle (batch noise)."""
    return [end + (start - end) * math.exp(-i / (n / 6)) + wiggle * math.sin(1.7 * i + phase) for i in range(n)]


REF = {"pretrain": {"seeds": {str(s): curve(8.3, 1.1 + 0.05 * s, 200, 0.2, s) for s in (1, 2, 3)}},
       "sft": {"seeds": {str(s): curve(6.3, 0.7 + 0.05 * s, 300, 0.2, s) for s in (1, 2, 3)}}}


def write_run(tmp: Path, losses: list[float], script: str, lr: float = 3e-3, lora=None,
              data: str = "minillm/data/sft.jsonl", model: str = "tiny", peft=None) -> Path:
    history = [{"step": i + 1, "loss": l, "learning_rate": lr, "grad_norm": 1.0} for i, l in enumerate(losses)]
    (tmp / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (tmp / "run.json").write_text(json.dumps({"script": script, "model": model, "lora": lora, "peft": peft,
                                              "data": [{"path": str(ROOT / data)}]}))
    return tmp


def run(tmp: Path, capsys, ref=REF) -> tuple[int, str]:
    path = tmp / "ref.json"
    path.write_text(json.dumps(ref))
    rc = doctor.main([str(tmp), "--reference", str(path)])
    return rc, capsys.readouterr().out


def test_a_curve_like_the_references_is_normal(tmp_path, capsys):
    write_run(tmp_path, curve(8.3, 1.15, 200, 0.25, 7), "pretrain.py", data="minillm/data/pretrain.jsonl")
    rc, out = run(tmp_path, capsys)
    assert rc == 0 and "normal" in out and "ABOVE" not in out and "BELOW" not in out, out


def test_trainer_default_lr_is_named(tmp_path, capsys):
    write_run(tmp_path, curve(8.3, 7.9, 200, 0.05), "pretrain.py", lr=5e-5, data="minillm/data/pretrain.jsonl")
    rc, out = run(tmp_path, capsys)
    assert rc == 1 and "learning rate too low" in out and "Trainer's default" in out, out


def test_sft_far_below_names_masking_and_padding(tmp_path, capsys):
    write_run(tmp_path, curve(3.0, 0.1, 300, 0.02), "finetune.py")
    rc, out = run(tmp_path, capsys)
    assert rc == 1 and "masking" in out and "padding" in out and "BELOW" in out, out


def test_sft_high_start_names_template_and_lora(tmp_path, capsys):
    write_run(tmp_path, curve(9.5, 5.0, 300, 0.05), "finetune.py", lora={"r": 8})
    rc, out = run(tmp_path, capsys)
    assert rc == 1 and "template" in out and "LoRA" in out, out


@pytest.mark.parametrize("method,what", [("prefix", "virtual-token"), ("adapter", "small adapters")])
def test_sft_with_another_peft_method_names_it(tmp_path, capsys, method, what):
    write_run(tmp_path, curve(6.3, 5.0, 300, 0.05), "finetune.py", peft={"method": method})
    rc, out = run(tmp_path, capsys)
    assert rc == 1 and f"--peft {method} instead of full fine-tuning" in out and what in out, out
    write_run(tmp_path, curve(6.3, 5.0, 300, 0.05), "finetune.py")  # the same curve of a full SFT run: not named
    rc, out = run(tmp_path, capsys)
    assert rc == 1 and "--peft" not in out.split("Likely causes")[-1], out


def test_diverging_and_nan_runs(tmp_path, capsys):
    write_run(tmp_path, [6.0 + 0.02 * i for i in range(100)], "finetune.py")
    rc, out = run(tmp_path, capsys)
    assert rc == 1 and "too high" in out, out
    write_run(tmp_path, [6.0, 5.0, float("nan")], "finetune.py")
    rc, out = run(tmp_path, capsys)
    assert rc == 1 and "NaN" in out, out


def test_other_setup_is_noted_and_missing_state_is_an_error(tmp_path, capsys):
    write_run(tmp_path, curve(6.3, 0.75, 300, 0.2), "finetune.py", data="mydata/belle.jsonl")
    rc, out = run(tmp_path, capsys)
    assert "not the demo's tiny model" in out, out
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no trainer_state.json"):
        doctor.main([str(empty)])


def test_shipped_reference_has_both_stages_from_several_seeds():
    ref = json.loads(doctor.REFERENCE.read_text())
    for stage, n in (("pretrain", 200), ("sft", 300)):
        seeds = ref[stage]["seeds"]
        assert len(seeds) >= 3 and all(len(c) == n for c in seeds.values()), (stage, [len(c) for c in seeds.values()])
        lo, mid, hi = doctor.band(ref, stage)
        assert lo[-1] <= mid[-1] <= hi[-1] < lo[0]  # the band falls: the reference runs trained


def _base(tmp: Path, losses: list[float]) -> Path:
    base = tmp / "pretrain"
    base.mkdir()
    return write_run(base, losses, "pretrain.py", lr=3e-3, data="minillm/data/pretrain.jsonl")


def test_undertrained_base_is_named_not_the_learning_rate(tmp_path, capsys):
    """issue 20: the README's old course path (a 9-step base, loss 7.6) then LoRA SFT: the doctor used to say
    "learning rate too low (peak 0.0049; the demo's is 0.003)"; it must name the base."""
    base = _base(tmp_path, curve(8.3, 7.6, 9))
    sft = tmp_path / "sft"
    sft.mkdir()
    write_run(sft, curve(7.9, 7.35, 563, 0.05), "finetune.py", lr=4.9e-3, model=str(base), lora={"r": 8})
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(REF))
    rc = doctor.main([str(sft), "--reference", str(path)])
    out = capsys.readouterr().out
    assert rc == 1 and "undertrained base model" in out and "9 steps" in out, out
    assert "learning rate too low" not in out, out
    warning = doctor.end_of_run_warning(sft, path)
    assert "this model has not learned yet: 563 steps" in warning and "undertrained base" in warning, warning
    assert "--peft lora" in warning and "train/doctor.py" in warning, warning


def test_a_short_pretraining_is_too_few_steps(tmp_path, capsys):
    base = _base(tmp_path, curve(8.3, 7.6, 9))
    rc, out = run(base, capsys)
    assert rc == 1 and "too few steps" in out and "this model has not learned yet: 9 steps" in out, out
    warning = doctor.end_of_run_warning(base, base / "ref.json")  # the reference run() wrote
    assert warning.startswith("WARNING: this model has not learned yet: 9 steps, loss 7."), warning
    assert "the demo's base (pretraining) reaches 1.2" in warning, warning


def test_no_warning_for_a_run_that_learned_or_another_setup(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(REF))
    good = tmp_path / "good"
    good.mkdir()
    write_run(good, curve(8.3, 1.15, 257, 0.1), "pretrain.py", data="minillm/data/pretrain.jsonl")
    assert doctor.end_of_run_warning(good, path) is None
    # logged every 10 steps (the scripts' default): the last logged loss is already a 10-step mean
    ten = tmp_path / "ten"
    ten.mkdir()
    losses = curve(8.3, 1.15, 200, 0.1)
    hist = [{"step": s, "loss": sum(losses[s - 10:s]) / 10, "learning_rate": 3e-3} for s in range(10, 201, 10)]
    (ten / "trainer_state.json").write_text(json.dumps({"log_history": hist}))
    (ten / "run.json").write_text((good / "run.json").read_text())
    assert doctor.end_of_run_warning(ten, path) is None
    assert doctor.main([str(ten), "--reference", str(path)]) == 0  # smoothed over steps: no 90-step lag
    other = tmp_path / "other"
    other.mkdir()
    write_run(other, curve(8.3, 7.6, 9), "pretrain.py", data="mydata/corpus.jsonl")
    assert doctor.end_of_run_warning(other, path) is None  # not the demo's setup: the band says nothing


def test_a_run_shorter_than_its_logging_interval_is_warned_about(tmp_path):
    """5 steps at the scripts' --logging_steps 10 log no 'loss', only the run's mean train_loss: still warned."""
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(REF))
    run_dir = tmp_path / "short"
    run_dir.mkdir()
    write_run(run_dir, [], "pretrain.py", data="minillm/data/pretrain.jsonl")
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 5, "train_loss": 8.01}]}))
    assert "not learned yet: 5 steps, loss 8.01" in doctor.end_of_run_warning(run_dir, path)


def saved_model(d: Path) -> Path:
    """A run directory's final model: a seeded random tiny model with the bundled tokenizer (an untrained model)."""
    random_model(ModelConfig.preset("tiny", pad_token_id=3, eos_token_id=0), 0).eval().save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / f, d / f)
    return d


def test_heldout_bpb_above_the_band_is_named(tmp_path, capsys):
    """A loss in band but a final model that predicts the held-out text badly (here: untrained weights)."""
    write_run(tmp_path, curve(8.3, 1.15, 200, 0.25, 7), "pretrain.py", data="minillm/data/pretrain.jsonl")
    saved_model(tmp_path)
    ref = {**REF, "pretrain": {**REF["pretrain"], "heldout_bpb": {"1": 1.10, "2": 1.15, "3": 1.20}}}
    rc, out = run(tmp_path, capsys, ref)
    assert rc == 1 and "held-out bits per byte" in out and "ABOVE" in out and "never saw" in out, out
    bpb = doctor.heldout_bpb(tmp_path)
    assert bpb > 2  # untrained: about log2(4096) = 12 bits per token, over ~4 bytes per token
    ref["pretrain"]["heldout_bpb"] = {"1": bpb - 0.01, "2": bpb, "3": bpb + 0.01}
    rc, out = run(tmp_path, capsys, ref)
    assert rc == 0 and "in band" in out and "normal" in out, out


def test_bpb_verdicts():
    ref = {"sft": {"heldout_bpb": {"1": 1.0, "2": 1.1, "3": 1.2}, "seeds": REF["sft"]["seeds"]}}
    assert doctor.bpb_verdict(1.05, ref, "sft")[1] is None and "in band" in doctor.bpb_verdict(1.05, ref, "sft")[0]
    assert doctor.bpb_verdict(1.24, ref, "sft") == (doctor.bpb_verdict(1.24, ref, "sft")[0], None)  # near band
    assert "below the demo's band" in doctor.bpb_verdict(0.5, ref, "sft")[1]
    assert doctor.heldout_bpb(Path("/nonexistent")) is None  # no final model: nothing to evaluate
    line, cause = doctor.bpb_verdict(0.5, ref, "sft", steps=3000)  # ten times the reference's 300 steps
    assert cause is None and "expected: this run made 3000 steps" in line
    assert doctor.bpb_verdict(2.0, ref, "sft", steps=30)[1] is None and doctor.bpb_verdict(2.0, ref, "sft", 300)[1]


def test_the_reference_holds_a_bpb_band_per_stage():
    """train/reference_curves.json: every reference seed's final model has its held-out BPB."""
    ref = json.loads(doctor.REFERENCE.read_text())
    for stage in ("pretrain", "sft"):
        assert set(ref[stage]["heldout_bpb"]) == set(ref[stage]["seeds"])
        assert all(0 < v < 12 for v in ref[stage]["heldout_bpb"].values())

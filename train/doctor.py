"""Is my loss normal? Place a training run's loss curve against the demo's reference band and name likely causes.

    python train/doctor.py RUN_DIR [--stage pretrain|sft]        (make doctor RUN=RUN_DIR)

RUN_DIR is a train/pretrain.py or train/finetune.py output directory (its trainer_state.json, or its last
checkpoint-N's). The band comes from train/reference_curves.json: the demo's pretraining (tiny preset, bundled
data, lr 3e-3) and full SFT (lr 3e-3) with several seeds (train/reference_curves.py). It fits the demo's setup;
for another model or data the absolute values differ, and only the shape checks (falls at all? diverges?)
carry over. A run that saved a final model is also evaluated on the bundled held-out text
(minillm/data/eval/heldout.yaml, never trained on; a few seconds) and its bits per byte placed against the band
of the same reference runs' final models (`heldout_bpb`): the loss says how well it fits its training text, the
held-out BPB how well it predicts text it never saw. Exit status: 0 normal, 1 far off (the causes are printed),
2 unreadable run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import statistics
from pathlib import Path

from minillm.evaluate import encoder_for, evaluate_task, read_task
from minillm.generate import runnable_python
from minillm.model import CausalLM

REFERENCE = Path(__file__).resolve().parent / "reference_curves.json"
SMOOTH = 9  # steps in the moving average: single-batch noise is ±0.3 at this batch size
TRAINER_DEFAULT_LR = 5e-5
HELDOUT = Path(__file__).resolve().parent.parent / "minillm" / "data" / "eval" / "heldout.yaml"


def smooth(xs: list[float], k: int = SMOOTH) -> list[float]:
    """Trailing moving average (the first k-1 points average what there is)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def smooth_steps(points: list[tuple[int, float]], k: int = SMOOTH) -> list[float]:
    """Per logged point, the mean of the logged losses of the last k *steps* (not the last k points): a run logged
    every 10 steps (the scripts' default) logs losses that already average 10 steps, and averaging 9 of them would
    lag 90 steps behind the band (smoothed over 9 steps)."""
    out = []
    for s, _ in points:
        window = [l for t, l in points if s - k < t <= s]
        out.append(sum(window) / len(window))
    return out


def read_run(run_dir: Path) -> tuple[list[tuple[int, float]], dict, dict | None]:
    """(step, loss) pairs, the last log entry's extras (learning rates seen, grad norms) and run.json if any."""
    state_file = run_dir / "trainer_state.json"
    if not state_file.is_file():
        ckpts = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
        if not ckpts:
            raise SystemExit(f"doctor.py: error: {run_dir} has no trainer_state.json (nor checkpoint-N/ with one): "
                             "pass a train/pretrain.py or train/finetune.py output directory")
        state_file = ckpts[-1]
    try:
        history = json.loads(state_file.read_text())["log_history"]
    except (ValueError, KeyError) as e:
        raise SystemExit(f"doctor.py: error: {state_file}: not a Trainer state file ({e})")
    points = [(int(e["step"]), float(e["loss"])) for e in history if "loss" in e and "step" in e]
    summary = next((e for e in history if "train_loss" in e and "step" in e), None)
    if not points and summary is not None:  # a run shorter than --logging_steps: its mean loss at its last step
        points = [(int(summary["step"]), float(summary["train_loss"]))]
    extra = {"lrs": [float(e["learning_rate"]) for e in history if "learning_rate" in e],
             "grad_norms": [float(e["grad_norm"]) for e in history if "grad_norm" in e]}
    record = None
    for where in (run_dir, state_file.parent):
        if (where / "run.json").is_file():
            record = json.loads((where / "run.json").read_text())
            break
    return points, extra, record


def band(reference: dict, stage: str) -> tuple[list[float], list[float], list[float]]:
    """Per step (1-based index i-1): the smoothed low, median and high over the reference seeds."""
    curves = [smooth(c) for c in reference[stage]["seeds"].values()]
    n = min(len(c) for c in curves)
    lo = [min(c[i] for c in curves) for i in range(n)]
    hi = [max(c[i] for c in curves) for i in range(n)]
    mid = [sorted(c[i] for c in curves)[len(curves) // 2] for i in range(n)]
    return lo, mid, hi


def diagnose(points: list[tuple[int, float]], extra: dict, record: dict | None, stage: str,
             reference: dict) -> tuple[list[str], list[str]]:
    """Rows of the comparison table and the likely causes (empty: the run looks normal)."""
    if not points:
        return [], ["no training loss was logged (log_history has no 'loss'): set --logging_steps"]
    losses = [l for _, l in points]
    if not all(math.isfinite(l) for l in losses):
        return [], ["the loss became NaN/inf: learning rate too high (or fp16 overflow): lower --learning_rate, "
                    "keep gradient clipping (--max_grad_norm 1.0), prefer --bf16 over --fp16"]
    lo, mid, hi = band(reference, stage)
    sm = smooth_steps(points)
    rows, above, below = [], 0, 0
    checked = [i for i, (s, _) in enumerate(points) if s <= len(lo)]
    marks = sorted({checked[min(len(checked) - 1, round(f * (len(checked) - 1)))] for f in (0.1, 0.25, 0.5, 1.0)}
                   ) if checked else []
    for i in marks:
        step = points[i][0]
        l, m, h = lo[step - 1], mid[step - 1], hi[step - 1]
        tol = max(0.15, 0.1 * h)  # "far": clearly outside the seeds' spread, not a noisy batch
        verdict = ("in band" if l <= sm[i] <= h else "near band" if l - tol <= sm[i] <= h + tol
                   else "ABOVE" if sm[i] > h else "BELOW")
        above += verdict == "ABOVE"
        below += verdict == "BELOW"
        rows.append(f"| {step} | {sm[i]:.3f} | {l:.3f} .. {h:.3f} (median {m:.3f}) | {verdict} |")
    causes = []
    lr = max(extra["lrs"]) if extra["lrs"] else None
    ref_lr = 3e-3
    drop = (sm[0] - sm[-1]) / sm[0] if sm[0] > 0 else 0.0
    quarter = max(1, len(sm) // 4)
    if len(sm) >= 8 and sum(losses[-quarter:]) / quarter > sum(losses[:quarter]) / quarter:
        causes.append(f"the loss rises: learning rate too high (peak {lr:g})" if lr else "the loss rises: "
                      "learning rate too high")
    base_cause = undertrained_base(record, reference) if stage == "sft" else None
    if base_cause:
        causes.append(base_cause)
    short = None if base_cause or setup_note(record, stage) is not None else not_learned(points, reference, stage)
    if short and points[-1][0] < reference_end(reference, stage)[0]:
        causes.append(f"too few steps: {short}: train longer (more --num_train_epochs or --max_steps; "
                      "train/demo.py's settings reach the band)")
    lr_low = lr is None or lr < ref_lr / 2
    if above and drop < 0.3 and lr_low and not base_cause:
        low = f" (peak {lr:g}; the demo's is {ref_lr:g}" + (", and 5e-05 is the Trainer's default" if lr and
              abs(lr - TRAINER_DEFAULT_LR) < 1e-12 else "") + ")" if lr else ""
        causes.append(f"learning rate too low{low}: the loss fell only {100 * drop:.0f}%; without --learning_rate "
                      "the scripts pick one per mode (train/args.py DEFAULT_LR)")
    if above and stage == "sft" and record and record.get("lora"):
        causes.append("LoRA instead of full fine-tuning: on the tiny model LoRA plateaus near loss 3.0 "
                      "(train/demo.py's docstring); the band is full SFT")
    method = (record or {}).get("peft") or {}
    if above and stage == "sft" and method.get("method"):
        few = "a few virtual-token vectors" if method["method"] in ("prefix", "prompt") else "small adapters"
        causes.append(f"--peft {method['method']} instead of full fine-tuning: {few} train, and on the tiny model "
                      "they stay far above full SFT (make compare's methods table); the band is full SFT")
    if above and stage == "sft" and sm[0] > hi[0] + 1.0 and not base_cause:  # (an untrained base starts high too)
        causes.append("template: the first SFT losses are far above the reference start: a chat template or special "
                      "tokens (<|im_start|>, <|im_end|>) other than the tokenizer's ChatML, or a base model trained "
                      "with another tokenizer")
    if below and stage == "sft":
        causes.append("masking: the loss is far below the band, as when prompts (system/user turns) are labelled; "
                      "only the assistant replies and their <|im_end|> should be, the rest -100 (minillm.sft)")
        causes.append("padding: padded positions labelled (pad id instead of -100) are easy tokens that pull "
                      "the average loss down (SFTCollator pads labels with -100)")
    if below and stage == "pretrain":
        causes.append("far below the band: repeated data (several epochs of a small file, or evaluation on the "
                      "training data), or a larger model than the demo's")
    if (above or below or short) and not causes:
        causes.append("outside the band for no reason found here: a different model, data, batch size or "
                      "schedule from the demo's changes the curve")
    return rows, causes


def reference_end(reference: dict, stage: str) -> tuple[int, float, float]:
    """(steps, median, high) of the reference runs' smoothed loss at their last step: where the demo's run ends."""
    lo, mid, hi = band(reference, stage)
    return len(mid), mid[-1], hi[-1]


def not_learned(points: list[tuple[int, float]], reference: dict, stage: str) -> str | None:
    """'this model has not learned yet: N steps, loss X; the demo's base reaches Y after Z steps' when a run's
    final (smoothed) loss is far above where the demo's run of that stage ends; None otherwise. Meant for the demo's
    setup (tiny model, bundled data): elsewhere the absolute values differ."""
    if not points or not all(math.isfinite(l) for _, l in points):
        return None
    last = points[-1][0]
    tail = [l for s, l in points if s > last - SMOOTH]  # the last SMOOTH steps (a logged loss averages its interval)
    final = sum(tail) / len(tail)
    steps, mid, hi = reference_end(reference, stage)
    if final <= hi + max(0.3, 0.25 * hi):
        return None
    what = "base (pretraining)" if stage == "pretrain" else "full SFT"
    return (f"this model has not learned yet: {points[-1][0]} steps, loss {final:.2f}; the demo's {what} reaches "
            f"{mid:.2f} after {steps} steps")


def base_run(record: dict | None) -> Path | None:
    """The base model's own run directory named by an SFT run's run.json (its `model`), if it is one of ours."""
    model = (record or {}).get("model")
    if not model or not Path(model).is_dir():
        return None
    d = Path(model)
    return d if (d / "trainer_state.json").is_file() or list(d.glob("checkpoint-*/trainer_state.json")) else None


def undertrained_base(record: dict | None, reference: dict) -> str | None:
    """The likely cause of a poor SFT run when its base model is a pretraining run that has not learned (read from
    the base's own run.json and logged losses)."""
    base = base_run(record)
    if base is None:
        return None
    try:
        points, _, base_record = read_run(base)
    except SystemExit:
        return None
    if (base_record or {}).get("script") != "pretrain.py" or setup_note(base_record, "pretrain") is not None:
        return None
    if (short := not_learned(points, reference, "pretrain")) is None:
        return None
    return (f"an undertrained base model: {base} {short.replace('this model has', 'has')}. Fine-tuning cannot teach "
            "a base that has not learned the language; pretrain longer first (README, Training: one epoch of the "
            "bundled data at --block_size 128 --per_device_train_batch_size 8 on 2 ranks is 258 steps), then check "
            f"it: make doctor RUN={base}")


def end_of_run_warning(run_dir: str | Path, reference_path: Path = REFERENCE) -> str | None:
    """What pretrain.py/finetune.py print at the end of a run whose loss is far above where the demo's run ends
    (the demo's setup only), naming an undertrained base for an SFT run; None for a run that learned."""
    try:
        points, _, record = read_run(Path(run_dir))
        reference = json.loads(Path(reference_path).read_text())
    except (SystemExit, OSError, ValueError):
        return None
    stage = "sft" if record and record.get("script") == "finetune.py" else "pretrain"
    if setup_note(record, stage) is not None or not (short := not_learned(points, reference, stage)):
        return None
    lines = [f"WARNING: {short}."]
    method = ((record or {}).get("peft") or {}).get("method") or ("lora" if (record or {}).get("lora") else None)
    if stage == "sft" and method:
        lines.append(f"  --peft {method} on this 0.6M-parameter model stays far above full SFT (train/demo.py's "
                     "docstring): it will not answer the taught questions; full SFT (no --peft) does.")
    if stage == "sft" and (cause := undertrained_base(record, reference)):
        lines.append(f"  Likely cause: {cause}")
    lines.append(f"  The chat will not answer the taught questions yet. Diagnosis: {runnable_python()} train/doctor.py "
                 f"{run_dir}")
    return "\n".join(lines)


def setup_note(record: dict | None, stage: str) -> str | None:
    """Say when the run is not the demo's setup: then the band's absolute values do not apply."""
    if record is None:
        return "no run.json: the run's setup is unknown; the band is the demo's"
    data = [Path(d["path"]).name for d in record.get("data") or []]
    bundled = {"pretrain": ["pretrain.jsonl"], "sft": ["sft.jsonl"]}[stage]
    model_ok = record.get("model") == "tiny" if stage == "pretrain" else True
    if data != bundled or not model_ok:
        return (f"this run trains {record.get('model')} on {', '.join(data) or '?'}, not the demo's tiny model "
                "on the bundled data: the band's values are a guide only, the shape checks still apply")
    return None


def heldout_bpb(run_dir: Path) -> float | None:
    """Bits per byte of the run's final model on the bundled held-out text (train/reference_curves.py measures the
    band with this same function); None without a final full model and its tokenizer (an adapter run, a run
    stopped early)."""
    if not all((run_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return None
    model = CausalLM.from_pretrained(run_dir).eval()
    enc = encoder_for(run_dir, model.config.max_position_embeddings)
    return evaluate_task(model, enc, read_task(HELDOUT))["metrics"]["bits_per_byte"][0]


def bpb_verdict(bpb: float, reference: dict, stage: str, steps: int | None = None) -> tuple[str, str | None]:
    """(the line placing `bpb` against the reference seeds' held-out BPB after their last step, the cause when it
    is far outside). A run of `steps` clearly shorter (longer) than the reference runs is expected above (below)."""
    seeds = reference[stage]["heldout_bpb"]
    lo, hi, mid = min(seeds.values()), max(seeds.values()), statistics.median(seeds.values())
    ref_steps = min(len(c) for c in reference[stage]["seeds"].values())
    tol = max(0.05, 0.05 * hi)  # "far": clearly beyond the seeds' spread, as for the loss
    verdict = ("in band" if lo <= bpb <= hi else "near band" if lo - tol <= bpb <= hi + tol
               else "ABOVE" if bpb > hi else "BELOW")
    line = (f"held-out bits per byte ({HELDOUT.with_suffix('.jsonl').name}): {bpb:.3f}; the demo's {stage} runs "
            f"after {ref_steps} steps {lo:.3f} .. {hi:.3f} (median {mid:.3f}, {len(seeds)} seeds): {verdict}")
    if steps is not None and ((verdict == "ABOVE" and steps < 0.9 * ref_steps) or
                              (verdict == "BELOW" and steps > 1.1 * ref_steps)):
        return line + f" (expected: this run made {steps} steps)", None
    if verdict == "ABOVE":
        return line, (f"held-out bits per byte {bpb:.3f} is above the demo's band ({lo:.3f} .. {hi:.3f}): the model "
                      "predicts text it never saw worse than the demo's runs; with a loss in band, it has learned its "
                      "training text by heart (many epochs of a small file) rather than the language")
    if verdict == "BELOW":
        return line, (f"held-out bits per byte {bpb:.3f} is below the demo's band ({lo:.3f} .. {hi:.3f}): the "
                      "held-out text (minillm/data/eval/heldout.jsonl) or text like it may be in the training data, "
                      "or the model is larger than the demo's")
    return line, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", help="output directory of train/pretrain.py or train/finetune.py")
    ap.add_argument("--stage", choices=["pretrain", "sft"], help="default: from the run's run.json")
    ap.add_argument("--reference", default=str(REFERENCE))
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"doctor.py: error: no such directory: {run_dir}", file=sys.stderr)
        return 2
    points, extra, record = read_run(run_dir)
    stage = args.stage or ("sft" if record and record.get("script") == "finetune.py" else "pretrain")
    reference = json.loads(Path(args.reference).read_text())
    rows, causes = diagnose(points, extra, record, stage, reference)
    note = setup_note(record, stage)
    bpb = heldout_bpb(run_dir) if reference[stage].get("heldout_bpb") else None
    if bpb is not None:
        bpb_line, bpb_cause = bpb_verdict(bpb, reference, stage, points[-1][0] if points else None)
        if bpb_cause and note is None:  # another setup's held-out BPB is not the demo's: a guide only
            causes.append(bpb_cause)
    print(f"{run_dir}: {stage} run, {len(points)} logged steps, compared with the demo's {stage} band "
          f"({len(reference[stage]['seeds'])} seeds, {SMOOTH}-step moving average)")
    if note:
        print(f"note: {note}")
    if rows:
        print("| step | your loss | reference band | verdict |\n|---:|---:|---|---|\n" + "\n".join(rows))
    if bpb is not None:
        print(bpb_line)
    if not causes:
        print("verdict: normal (within the reference band)")
        return 0
    print("verdict: far off. Likely causes:")
    for c in causes:
        print(f"  - {c}")
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""Is my loss normal? Place a training run's loss curve against the demo's reference band and name likely causes.

    python train/doctor.py RUN_DIR [--stage pretrain|sft]        (make doctor RUN=RUN_DIR)

RUN_DIR is a train/pretrain.py or train/finetune.py output directory (its trainer_state.json, or its last
checkpoint-N's). The band comes from train/reference_curves.json: the demo's pretraining (tiny preset, bundled
data, lr 3e-3) and full SFT (lr 3e-3) with several seeds (train/reference_curves.py). It fits the demo's setup;
for another model or data the absolute values differ, and only the shape checks (falls at all? diverges?)
carry over. Exit status: 0 normal, 1 far off (the causes are printed), 2 unreadable run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "reference_curves.json"
SMOOTH = 9  # steps in the moving average: single-batch noise is ±0.3 at this batch size
TRAINER_DEFAULT_LR = 5e-5


def smooth(xs: list[float], k: int = SMOOTH) -> list[float]:
    """Trailing moving average (the first k-1 points average what there is)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
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
    sm = smooth(losses)
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
    if above and drop < 0.3:
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
    if above and stage == "sft" and sm[0] > hi[0] + 1.0:
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
    if (above or below) and not causes:
        causes.append("outside the band for no reason found here: a different model, data, batch size or "
                      "schedule from the demo's changes the curve")
    return rows, causes


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
    print(f"{run_dir}: {stage} run, {len(points)} logged steps, compared with the demo's {stage} band "
          f"({len(reference[stage]['seeds'])} seeds, {SMOOTH}-step moving average)")
    if note := setup_note(record, stage):
        print(f"note: {note}")
    if rows:
        print("| step | your loss | reference band | verdict |\n|---:|---:|---|---|\n" + "\n".join(rows))
    if not causes:
        print("verdict: normal (within the reference band)")
        return 0
    print("verdict: far off. Likely causes:")
    for c in causes:
        print(f"  - {c}")
    return 1


if __name__ == "__main__":
    sys.exit(main())

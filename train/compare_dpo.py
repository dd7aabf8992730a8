"""`make compare`'s DPO stage (issue 21): train/dpo.py --impl minillm vs --impl hf (TRL 1.16's DPOTrainer).

train/compare.py runs the two launches with its compare_stage (same ranks, ZeRO-2, seed, data and flags, full
fine-tuning from one base directory); this file adds what a DPO run logs beyond the loss, TRL's `rewards/margins`,
and its per-step |Δ|, and draws and tabulates both. The stage passes when max |Δ loss| and max |Δ margin| are
both within compare.TARGET (tests/test_dpo_train.py measured 9.5e-7 and 1.5e-6 over 20 steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

from minillm.data import DATA_DIR  # noqa: E402
from train.plots import delta_panel  # noqa: E402

# The trajectory check's settings (tests/test_dpo_train.py): batch 4 per rank, pairs cut at 128 tokens, lr 1e-3
# (large enough that the margins move visibly in 20 steps), the bundled pairs, beta 0.1, sigmoid.
DPO_FLAGS = ["--train_files", str(DATA_DIR / "dpo.jsonl"), "--max_length", "128", "--learning_rate", "1e-3",
             "--beta", "0.1", "--loss_type", "sigmoid"]


def margins(run_dir: Path) -> list[float]:
    """The logged rewards/margins per step (TRL's metric: the mean over every rank's pairs)."""
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [e["rewards/margins"] for e in state["log_history"] if "loss" in e]


def with_margins(stage: dict, out: Path, target: float) -> dict:
    """compare_stage's DPO result with each run's margins, their per-step |Δ| and the verdict on both curves."""
    for impl, run in stage["runs"].items():
        run["margin"] = margins(out / f"{stage['stage']}-{impl}")
    a, b = stage["runs"]["minillm"]["margin"], stage["runs"]["hf"]["margin"]
    stage["margin_delta"] = [abs(x - y) for x, y in zip(a, b)]
    stage["max_margin_delta"] = max(stage["margin_delta"])
    stage["passed"] = stage["max_delta"] <= target and stage["max_margin_delta"] <= target
    return stage


def dpo_table(stage: dict, target: float) -> str:
    a, b = stage["runs"]["minillm"], stage["runs"]["hf"]
    verdict = "PASS" if stage["passed"] else "FAIL"
    lines = [f"## {stage['stage']}: train/dpo.py --impl minillm vs --impl hf (TRL's DPOTrainer), {stage['steps']} "
             f"steps, max |Δ loss| = {stage['max_delta']:.3g}, max |Δ rewards/margins| = "
             f"{stage['max_margin_delta']:.3g} (target {target:g} each: {verdict})", "",
             "| | minillm | hf (TRL) |", "|---|---|---|",
             f"| final loss | {a['loss'][-1]:.6f} | {b['loss'][-1]:.6f} |",
             f"| final rewards/margins | {a['margin'][-1]:.6f} | {b['margin'][-1]:.6f} |",
             f"| train loop (s) | {a['train_runtime_s']:.1f} | {b['train_runtime_s']:.1f} |",
             f"| wall time incl. start-up (s) | {a['wall_s']:.1f} | {b['wall_s']:.1f} |", "",
             "| step | minillm loss | hf loss | \\|Δ loss\\| | minillm margin | hf margin | \\|Δ margin\\| |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s} | {x:.8f} | {y:.8f} | {d:.2e} | {m:.8f} | {n:.8f} | {e:.2e} |"
              for s, x, y, d, m, n, e in zip(a["steps"], a["loss"], b["loss"], stage["delta"], a["margin"],
                                             b["margin"], stage["margin_delta"])]
    lines.append("")
    return "\n".join(lines)


def dpo_plot(stage: dict, path: Path, target: float) -> None:
    """Loss and reward margin per step (minillm solid, TRL dashed) on top, their |Δ| below on a log axis; a step
    with Δ = 0 is a tick on the bottom edge (train/plots.py delta_panel, as compare.plot draws them)."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 7), squeeze=False)
    steps = stage["runs"]["minillm"]["steps"]
    for col, (key, delta, name) in enumerate((("loss", "delta", "DPO loss"),
                                              ("margin", "margin_delta", "rewards/margins"))):
        top, bottom = axes[0][col], axes[1][col]
        for impl, style in (("minillm", "-"), ("hf", "--")):
            top.plot(steps, stage["runs"][impl][key], style, label=f"--impl {impl}")
        top.set_title(f"{stage['stage']}: {name} (ZeRO-2)")
        top.set_xlabel("step")
        top.legend(fontsize=8)
        delta_panel(bottom, steps, stage[delta], target)
        bottom.set_title(f"|Δ {name}|: max {max(stage[delta]):.2g}")
        bottom.set_xlabel("step")
        bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)

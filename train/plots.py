"""The loss curve of a run as loss.png in its output directory (train/trainer.py's train_and_save draws it)."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("minillm.train")


def save_loss_plot(history: list[dict], path: Path, smooth: int = 9) -> None:
    """The run's loss curve as a picture: training loss per logged step, its moving average over `smooth` logged
    steps (one batch's loss is noisy), eval loss where there is one, and for a DPO run the reward margin
    (rewards/margins) on its own axis; with evaluation bits per byte (eval_bpb, train/trainer.py) a second panel
    below shows it with the eval perplexity. A missing matplotlib only skips it."""
    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(f"matplotlib is not installed: no {path.name} (pip install -e '.[train]')")
        return
    bpb = [(e["step"], e["eval_bpb"], e.get("eval_perplexity")) for e in history if "eval_bpb" in e and "step" in e]
    if bpb:  # loss above, bits per byte below, on the same steps
        fig, (ax, low) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, loss = zip(*train)
        ax.plot(steps, loss, lw=0.8, alpha=0.5, label="training loss")
        if len(loss) >= smooth:  # centred on its window, so the average does not lag the raw curve
            avg = [sum(loss[i:i + smooth]) / smooth for i in range(len(loss) - smooth + 1)]
            ax.plot(steps[smooth // 2:smooth // 2 + len(avg)], avg, lw=2,
                    label=f"moving average ({smooth} logged steps)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    (low if bpb else ax).set_xlabel("step")
    ax.set_ylabel("loss")
    if bpb:
        steps, values, ppl = zip(*bpb)
        low.plot(steps, values, "o-", color="tab:red", label="eval bits per byte")
        for x, y, p in zip(steps, values, ppl):
            if p is not None:  # the perplexity beside each point: the same evaluation in run_clm's unit
                low.annotate(f"ppl {p:.3g}", (x, y), textcoords="offset points", xytext=(0, 6), fontsize=7,
                             ha="center")
        low.set_ylabel("bits per byte")
        low.legend()
    ax.set_title(path.parent.name)
    handles = ax.get_legend_handles_labels()
    margins = [(e["step"], e["rewards/margins"]) for e in history if "rewards/margins" in e and "step" in e]
    if margins:  # DPO: the reward margin (chosen - rejected) should grow as the loss falls
        right = ax.twinx()
        right.plot(*zip(*margins), color="tab:green", lw=1.2, label="reward margin")
        right.set_ylabel("reward margin")
        handles = [a + b for a, b in zip(handles, right.get_legend_handles_labels())]
    ax.legend(*handles)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    logger.info(f"Loss curve: {path}")


def delta_panel(ax, steps: list[int], deltas: list[float], target: float, what: str = "|Δ|") -> int:
    """|Δ| per step of two implementations' curves on a log axis, with the target as a line. A step with Δ = 0
    (bit-identical) has no place on a log axis, so it is a tick on the bottom edge, counted in the legend.
    Returns the number of equal steps."""
    nonzero = [(s, d) for s, d in zip(steps, deltas) if d > 0]
    zero = [s for s, d in zip(steps, deltas) if d == 0]
    if nonzero:
        ax.semilogy(*zip(*nonzero), ".", label=f"{what} > 0 ({len(nonzero)} steps)")
    else:
        ax.set_yscale("log")
    ax.axhline(target, color="red", linestyle=":", label=f"target {target:g}")
    if zero:  # x in data units, y on the bottom edge of the axes
        ax.scatter(zero, [0.03] * len(zero), marker="|", color="green", s=80,
                   transform=ax.get_xaxis_transform(), label=f"Δ = 0, equal ({len(zero)} steps)")
    # every step in view: the equal ones at either end, and a |Δ| far above the target (a failing stage)
    ax.set_xlim(min(steps) - 1, max(steps) + 1)
    ax.set_ylim(min([d for _, d in nonzero] + [target * 1e-3]) / 3, max([d * 3 for _, d in nonzero] + [target * 10]))
    return len(zero)


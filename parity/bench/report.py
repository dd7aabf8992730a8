"""The benchmark's table: one row per (case, metric), each target looked up in targets.TARGETS."""

from __future__ import annotations

from typing import Any

from parity.bench.peft_methods import METHODS
from parity.bench.targets import TARGETS


def _met(figure: float | None, op: str, target: float) -> bool | None:
    if figure is None:
        return None
    return figure >= target if op == ">=" else figure <= target


def ratio_spread(c: dict, key: str, higher_is_better: bool = False, reference: str = "reference") -> str:
    """The ratio's range over the rounds of a case measured in rounds (parity/bench/dpo.py's shape: c[key + "_spread"]
    = {side: (min, max)}, rounds = c["rounds"] or the number of runs per side), worst first: a note for the table;
    "" for a case measured once."""
    spread, rounds = c.get(f"{key}_spread"), c.get("rounds") or len(c.get("runs", {}).get("minillm", []))
    if not spread or rounds < 2:
        return ""
    (a_lo, a_hi), (b_lo, b_hi) = spread["minillm"], spread[reference]
    worst, best = (a_lo / b_hi, a_hi / b_lo) if higher_is_better else (a_hi / b_lo, a_lo / b_hi)
    return f"ratio {worst:.2f} (worst) to {best:.2f} (best) over {rounds} rounds"


def eval_items_s(c: dict) -> tuple[dict, dict | None]:
    """The eval case's items/s per side, and their (min, max) over rounds: its own "items_s" if it gives one, else
    c["size"]["items"] / the seconds of dpo_case's shape ("step_s" = one pass over the task, "step_s_spread")."""
    if "items_s" in c:
        return c["items_s"], c.get("items_s_spread")
    n = c.get("size", {}).get("items", 1)
    spread = c.get("step_s_spread")
    return ({side: n / s for side, s in c["step_s"].items()},
            None if spread is None else {side: (n / hi, n / lo) for side, (lo, hi) in spread.items()})


def table_rows(cases: dict[str, dict], verdicts: bool = True) -> list[dict]:
    """minillm, reference and their ratio per metric; target and verdict from TARGETS where one applies.
    verdicts=False (--quick: toy sizes, which only show that the bench runs): no target and no verdict, since the
    targets are set for the full sizes."""
    targets = {(t.case, t.metric): t for t in TARGETS}
    rows = []

    def add(case, metric, a, b, note=""):
        ratio = None if a is None or b is None else a / b
        t = targets.get((case, metric)) if verdicts else None
        if t is not None and t.on == "minillm":
            note = note or "target on minillm's fraction"
        rows.append({"case": case, "metric": metric, "minillm": a, "reference": b, "ratio": ratio,
                     "target": None if t is None else f"{t.op} {t.value:g}",
                     "met": None if t is None else _met(ratio if t.on == "ratio" else a, t.op, t.value), "note": note})

    for name, c in cases.items():
        if "error" in c:
            add(name, "error", None, None, note=c["error"][:200])
            continue
        same = "" if c.get("same_output") else "OUTPUT DIFFERS"
        if name.startswith("train_"):
            t = c["tokens_s"]
            add(name, "tokens/s", t["minillm"], t["reference"], same)
            m = c["peak_mb"]
            add(name, "peak MiB", m["minillm"], m["reference"])
            g = c["grads_adam_mb"]
            add(name, "peak-grad-Adam", m["minillm"] - g, m["reference"] - g,
                note=f"peak minus grads+AdamW state ({g:.0f} MiB)")
            f = c["flop_rate_fraction"]
            add(name, "FLOP/matmul", f["minillm"], f["reference"])
            if "loss_only" in c:  # lm_head + cross-entropy alone, from a fixed hidden state (train.StepWorker)
                lo = c["loss_only"]
                add(name, "loss peak MiB", lo["peak_mb"]["minillm"], lo["peak_mb"]["reference"],
                    note="forward + backward, d W included; one run")
                add(name, "loss s", lo["seconds"]["minillm"], lo["seconds"]["reference"], note="one run, not a median")
        elif name.startswith("lora_") or name in METHODS:
            s, method = c["step_s"], METHODS.get(name)
            add(name, "step s", s["minillm"], s["reference"],
                same or (f"vs {method.reference}" if method and not method.same_model else ""))
            m = c["peak_mb"]
            add(name, "peak MiB", m["minillm"], m["reference"])
        elif name.startswith("chunker"):
            t = c["tokens_s"]
            add(name, "tokens/s", t["minillm"], t["reference"], same)
        elif name == "masker":
            t = c["conv_s"]
            add(name, "conv/s", t["minillm"], t["reference"], same)
        elif name == "sft_epoch":  # learned tokens/s of one epoch; minillm = packed (parity/bench/sft_epoch.py)
            r = c["runs"]
            t = {k: v["learned_tokens_s"] for k, v in r.items()}
            add(name, "vs course", t["packed"], t["course"], same)
            add(name, "vs dyn. padding", t["packed"], t["dynpad"], same)
            add(name, "hf packed vs dyn.", t["hf_packed"], t["dynpad"], note="transformers on the same packed rows")
            loss = {k: (r[k0]["eval_loss"] + r[f"{k}_seed1"]["eval_loss"]) / 2
                    for k, k0 in (("packed", "packed"), ("unpacked", "unpacked_seed0"))}
            add(name, "loss: packed-unpacked", loss["packed"] - loss["unpacked"], c["loss_noise"],
                note=f"held-out {loss['packed']:.3f} vs {loss['unpacked']:.3f} (same steps); reference = seed spread")
        elif name == "generate":
            t = c["tokens_s"]
            add(name, "tokens/s", t["minillm"], t["reference"], same)
        elif name == "preprocess":
            t, m = c["tokens_s"], c["peak_mb"]
            add(name, "tokens/s", t["minillm"], t["reference"], same or f"{c['corpus_mb']:.0f} MB corpus, {c['workers']} workers")
            add(name, "peak MiB", m["minillm"], m["reference"], "tree PSS, libraries included")
        elif name.startswith("dpo"):  # parity/bench/dpo.py: medians over rounds, and the ratio's range
            v = c["size"]["vocab"]
            add(name, "step s", c["step_s"]["minillm"], c["step_s"]["reference"],
                same or "; ".join(x for x in (f"vs TRL's DPOTrainer, vocab {v:,}", ratio_spread(c, "step_s")) if x))
            add(name, "peak MiB", c["peak_mb"]["minillm"], c["peak_mb"]["reference"], ratio_spread(c, "peak_mb"))
            if "grads_adam_mb" in c:  # what the log-probs and the reference change: the peak less the fixed state
                g = c["grads_adam_mb"]
                add(name, "peak-grad-Adam", c["peak_mb"]["minillm"] - g, c["peak_mb"]["reference"] - g,
                    note=f"peak minus grads+AdamW state ({g:.0f} MiB)")
        elif name == "eval":  # parity/bench/eval.py (issue 22): multiple-choice scoring vs lm-eval
            items_s, spread = eval_items_s(c)
            timed = {"items_s_spread": spread, "runs": c.get("runs", {}), "rounds": c.get("rounds")}
            add(name, "items/s", items_s["minillm"], items_s["reference"],
                same or "; ".join(x for x in ("vs lm-eval's hf model, its fastest batch",
                                              ratio_spread(timed, "items_s", True)) if x))
            if "reference_default" in items_s:  # lm-eval as run without --batch_size (HFLM's default 1)
                add(name, "items/s vs lm-eval batch 1", items_s["minillm"], items_s["reference_default"],
                    ratio_spread(timed, "items_s", True, "reference_default"))
            if "peak_mb" in c:
                add(name, "peak MiB", c["peak_mb"]["minillm"], c["peak_mb"]["reference"], ratio_spread(c, "peak_mb"))
    return rows


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 10 else f"{x:,.0f}"
    return str(x)


def format_table(rows: list[dict]) -> str:
    head = ("case", "metric", "minillm", "reference", "ratio", "target", "met?", "note")
    body = [(r["case"], r["metric"], _fmt(r["minillm"]), _fmt(r["reference"]),
             _fmt(r["ratio"]) if r["ratio"] is None else f"{r['ratio']:.2f}", r["target"] or "-", _fmt(r["met"]),
             r["note"]) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])

"""`python -m parity.bench.eval`: multiple-choice evaluation, minillm.evaluate against lm-evaluation-harness 0.4.13's
`hf` model (HFLM), in one process, on the same checkpoint and the same task (issue 22: items/s >= 2x lm-eval's).

The task is the bundled minillm/data/eval/sample_mc.yaml (300 English/Chinese items, 4 choices each); the checkpoint
a seeded random model of the `small` preset (4 layers, hidden 256, vocab 4,096: the bundled tokenizer's) saved with
the bundled tokenizer, read by both sides from the same directory. What is timed on each side is the same work:
tokenising every (context, choice) pair and scoring it, from the task's rendered items to per-choice
log-likelihoods and is_greedy:
- minillm: `evaluate_task` (each context read once, its choices side by side after it in the same row under a
  tree mask, a batch of items one forward; the LM head and log_softmax only at the scored positions), metrics
  included;
- lm-eval: `HFLM.loglikelihood` on the requests its multiple_choice task builds, (context, delimiter + choice) per
  choice (every choice reads its whole context again), at HFLM's default batch size (1) and at the batch size that
  is fastest for it here (swept once before the rounds, the fastest kept).
The bundled task's contexts are short (median 3 tokens) and most choices one token, which lm-eval's own logits
cache already serves with one forward per context (HFLM logits_cache: requests whose context + continuation[:-1]
agree share a row): little is left for reading the context once to save there. The same is measured on a long-context task
built from the bundled held-out text (`long_context_task`: ~50-token contexts, 4 endings of ~10 tokens), the shape
of HellaSwag-like benchmarks, where lm-eval reads every context once per choice.
Rounds run the sides in turn (alternating order); medians and the spread (min-max over rounds) are reported; a
shared CPU makes timings noisy. The results must agree: per-choice log-likelihoods within 1e-5 relative and the
same acc / acc_norm (same_output).

    python -m parity.bench.eval [--quick] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from minillm.config import ModelConfig
from minillm.data import DATA_DIR, TOKENIZER_DIR
from minillm.evaluate import Task, encoder_for, evaluate_task, read_task
from minillm.model import CausalLM
from parity.model import random_model

SIZES = {"full": dict(preset="small", items=300, sweep=(4, 16, 64, 128)),
         "quick": dict(preset="tiny", items=40, sweep=(16,))}
MINILLM_BATCH = 16  # train/evaluate.py's default --batch_size (items per batch)
LM_EVAL_DEFAULT_BATCH = 1  # HFLM(batch_size=1) unless told otherwise


def save_checkpoint(d: Path, preset: str) -> Path:
    random_model(ModelConfig.preset(preset, pad_token_id=3, eos_token_id=0), 0).eval().save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / f, d / f)
    return d


def requests(task: Task) -> tuple[list[Instance], list[tuple[str, list[str], int]]]:
    """lm-eval's multiple_choice requests (ConfigurableTask.construct_requests): one per choice."""
    raw = [task.item(i) for i in range(len(task.docs))]
    reqs = [Instance("loglikelihood", task.docs[i], (ctx, task.target_delimiter + c), j, ("sample_mc", i, 1))
            for i, (ctx, choices, _) in enumerate(raw) for j, c in enumerate(choices)]
    return reqs, raw


def lm_eval_pass(lm: HFLM, reqs: list[Instance], raw) -> tuple[float, list[list[float]], dict]:
    """(seconds, per-item log-likelihoods, acc/acc_norm) of one HFLM.loglikelihood pass, metrics as lm-eval's
    multiple_choice process_results computes them."""
    t0 = time.perf_counter()
    res = iter(lm.loglikelihood(reqs, disable_tqdm=True))
    lls = [[next(res)[0] for _ in choices] for _, choices, _ in raw]
    seconds = time.perf_counter() - t0
    acc = [float(np.argmax(ll) == gold) for ll, (_, _, gold) in zip(lls, raw)]
    norm = [float(np.argmax(np.array(ll) / np.array([float(len(c)) for c in choices])) == gold)
            for ll, (_, choices, gold) in zip(lls, raw)]
    return seconds, lls, {"acc": sum(acc) / len(acc), "acc_norm": sum(norm) / len(norm)}


def minillm_pass(model: CausalLM, enc, task: Task) -> tuple[float, list[list[float]], dict]:
    t0 = time.perf_counter()
    out = evaluate_task(model, enc, task, batch_size=MINILLM_BATCH)
    seconds = time.perf_counter() - t0
    return seconds, [i["loglikelihoods"] for i in out["items"]], {m: out["metrics"][m][0] for m in ("acc", "acc_norm")}


def agree(a: tuple, b: tuple) -> bool:
    (_, lls_a, m_a), (_, lls_b, m_b) = a, b
    close = all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for la, lb in zip(lls_a, lls_b, strict=True)
                for x, y in zip(la, lb, strict=True))
    return close and m_a == m_b


def long_context_task(d: Path, n: int) -> Path:
    """A HellaSwag-shaped task from the bundled held-out text: the context a document's words but its last 8 (~50
    tokens), the choices its own last 8 words and three other documents' (~10 tokens each). Here lm-eval reads
    each context once per choice, and its one-token logits cache cannot help."""
    rng = random.Random(0)
    docs = [json.loads(line)["text"].split() for line in (DATA_DIR / "eval" / "heldout.jsonl").read_text().splitlines()]
    docs = [w for w in docs if len(w) >= 24][:n]
    endings = [" ".join(w[-8:]) for w in docs]
    rows = []
    for i, words in enumerate(docs):  # distinct choices: a tie decides acc by the last bits of the sums
        choices = [endings[i]] + rng.sample(sorted(set(endings) - {endings[i]}), 3)
        rng.shuffle(choices)
        rows.append({"question": " ".join(words[:-8]), "choices": choices, "answer": choices.index(endings[i])})
    (d / "long.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (d / "long.yaml").write_text(f"task: long_context\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                 f"    test: {d / 'long.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
                                 "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n")
    return d / "long.yaml"


def measure(d: Path, task: Task, size: dict, quick: bool, rounds: int) -> dict:
    """One task: items/s of each side, medians over rounds and their spread; same_output when every pass of every
    side agrees with minillm's first."""
    n = len(task.docs)
    model = CausalLM.from_pretrained(d).eval()
    enc = encoder_for(d, model.config.max_position_embeddings)
    reqs, raw = requests(task)
    first = minillm_pass(model, enc, task)  # warm-up, and the results every other pass is checked against
    same, lms, sweep = True, {}, {}
    for bs in sorted({LM_EVAL_DEFAULT_BATCH, *size["sweep"]}):  # one pass each after a warm-up: the fastest wins
        lms[bs] = HFLM(pretrained=str(d), device="cpu", batch_size=bs, dtype="float32")
        lm_eval_pass(lms[bs], reqs[:len(reqs) // 10 or 1], raw[:1])
        out = lm_eval_pass(lms[bs], reqs, raw)
        same &= agree(out, first)
        sweep[bs] = n / out[0]
    best = max(sweep, key=sweep.get)
    sides = {"minillm": lambda: minillm_pass(model, enc, task),
             "reference": lambda: lm_eval_pass(lms[best], reqs, raw),
             "reference_default": lambda: lm_eval_pass(lms[LM_EVAL_DEFAULT_BATCH], reqs, raw)}
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(1 if quick else rounds):
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            out = sides[side]()
            same &= agree(out, first)
            runs[side].append({"step_s": out[0], "items_s": n / out[0]})
    med = lambda side, k: statistics.median(x[k] for x in runs[side])  # noqa: E731
    spread = lambda side, k: (min(x[k] for x in runs[side]), max(x[k] for x in runs[side]))  # noqa: E731
    # the ratio within each round (the sides ran back to back there): its median and range over rounds
    ratios = {s: [a["items_s"] / b["items_s"] for a, b in zip(runs["minillm"], runs[s])] for s in sides if s != "minillm"}
    return {"size": {**size, "task": task.name, "items": n, "choices": len(reqs)}, "runs": runs,
            "batch_size": {"minillm": MINILLM_BATCH, "reference": best, "reference_default": LM_EVAL_DEFAULT_BATCH},
            "sweep_items_s": sweep,
            "items_s": {s: med(s, "items_s") for s in runs}, "step_s": {s: med(s, "step_s") for s in runs},
            "items_s_spread": {s: spread(s, "items_s") for s in runs},
            "step_s_spread": {s: spread(s, "step_s") for s in runs},
            "ratio": {s: statistics.median(r) for s, r in ratios.items()},
            "ratio_spread": {s: (min(r), max(r)) for s, r in ratios.items()},
            "metrics": first[2], "same_output": same}


def eval_case(quick: bool, threads: int, rounds: int = 3) -> dict:
    """The `eval` case on the bundled sample_mc task (its keys as dpo_case's: size, runs, step_s, step_s_spread,
    same_output; plus items_s, ratio and lm-eval's default batch as the side reference_default), and the same
    measurement on a long-context task under "long_context"."""
    size = SIZES["quick" if quick else "full"]
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        d = save_checkpoint(Path(tmp, "model"), size["preset"])
        task = read_task(DATA_DIR / "eval" / "sample_mc.yaml")
        task.docs, task.doc_where = task.docs[:size["items"]], task.doc_where[:size["items"]]
        case = measure(d, task, {**size, "threads": threads}, quick, rounds)
        long = read_task(long_context_task(Path(tmp), size["items"]))
        case["long_context"] = measure(d, long, {**size, "threads": threads}, quick, rounds)
    case["same_output"] = case["same_output"] and case["long_context"]["same_output"]
    return case


def format_case(c: dict) -> str:
    lines = ["| task | side | batch | items/s (median) | range over rounds | minillm / side (median; range over rounds) |",
             "|---|---|---|---|---|---|"]
    for t in (c, c["long_context"]):
        for side, name in (("minillm", "minillm.evaluate (context once)"), ("reference", "lm-eval HFLM, fastest batch"),
                           ("reference_default", "lm-eval HFLM, default batch")):
            v, (lo, hi) = t["items_s"][side], t["items_s_spread"][side]
            ratio = "" if side == "minillm" else f"{t['ratio'][side]:.2f}x ({t['ratio_spread'][side][0]:.2f} - " \
                                                 f"{t['ratio_spread'][side][1]:.2f})"
            lines.append(f"| {t['size']['task']} | {name} | {t['batch_size'][side]} | {v:.1f} | {lo:.1f} - {hi:.1f} | "
                         f"{ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.bench.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    c = eval_case(args.quick, args.threads, args.rounds)
    print(format_case(c))
    for t in (c, c["long_context"]):
        sweep = ", ".join(f"{b}: {v:.1f}" for b, v in t["sweep_items_s"].items())
        print(f"{t['size']['task']}: lm-eval's batch sweep (items/s, one pass each) {sweep}; {t['metrics']}; "
              f"{t['size']}")
    print(f"same log-likelihoods and acc/acc_norm on every pass of both tasks: {c['same_output']}")
    return 0 if c["same_output"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

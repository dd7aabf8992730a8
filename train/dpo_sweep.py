"""Does preference training surface the preferred answers the demo's chat model misses? The measured sweep behind the
README's table under "Is the model too small, or the DPO set-up wrong?".

    python train/dpo_sweep.py [--base out/demo/pretrain-minillm] [--sft_steps 500 900] [--out out/dpo_sweep]
                                                             (run `make demo` first; ~20 min on 2 CPU cores)

From the demo's pretrained model: full SFT for each --sft_steps (the demo's settings otherwise), then every run of
RUNS from that SFT model (train/dpo.py --impl minillm: the demo's DPO, 2 ranks x 8 pairs, 60 steps, beta 0.1, but
for what the run names). Before and after, the greedy replies to the 320 training pairs' questions are sorted into
train/demo.py's kinds (preferred / rejected-style / other) and the kind changes counted (demo.kind_changes). Pairs:
- bundled: minillm/data/dpo.jsonl as it is;
- greedy (on-policy): those pairs with the rejected answer replaced by the SFT model's own greedy reply wherever that
  is not the chosen answer;
- samples (on-policy): for each question the model answers wrongly, every distinct wrong reply among 8 samples at
  temperature 1 (and its greedy reply) is a rejected answer; the questions it answers rightly keep their bundled pair;
- iterative: 3 rounds of greedy pairs, each round trained from and against the model of the round before.
"continued SFT" is what preference training is measured against: train/finetune.py on the 320 chosen answers, the
same steps and batch. Single runs (seed 42). Everything lands in --out: table.md, sweep.json, the models, the logs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from minillm.generate import load_chat, stop_ids
from minillm.generation import generate
from train.compare import launch
from train.demo import (DPO_BATCH, DPO_STEPS, DPO_TRAIN, KINDS, answers_by_shape, chosen_answers, dpo_args,
                        kind_changes, pretrain_args, question_ids, reply_kind, score_chat, sft_args, shared_args)

NPROC = 2  # ranks, as the demo
# (what the table calls it, pairs, learning rate, extra train/dpo.py flags, rounds); "sft": continued SFT instead
RUNS = [("DPO, bundled pairs", "bundled", "1e-4", [], 1),
        ("DPO, bundled pairs", "bundled", "3e-4", [], 1),
        ("DPO, on-policy greedy pairs", "greedy", "1e-4", [], 1),
        ("DPO, on-policy greedy pairs", "greedy", "3e-4", [], 1),
        ("DPO, on-policy samples (1 epoch)", "samples", "1e-4", [], 1),
        ("DPO, on-policy samples (1 epoch)", "samples", "3e-4", [], 1),
        ("DPO, beta 1, on-policy greedy pairs", "greedy", "1e-3", ["--beta", "1.0"], 1),
        ("iterative DPO, 3 rounds of greedy pairs", "greedy", "1e-4", [], 3),
        ("continued SFT on the chosen answers", "sft", "1e-3", [], 1),
        ("DPO, on-policy greedy pairs", "greedy", "3e-5", [], 1),
        ("continued SFT on the chosen answers", "sft", "1e-4", [], 1)]  # the last two: for the larger model
SAMPLES, MAX_NEW = 8, 64


def replies(model_dir: Path, rows: list[dict]) -> list[dict]:
    """Greedy replies to the pairs' questions, each with its kind."""
    taught = answers_by_shape()
    out = score_chat(model_dir, None, chosen_answers(rows))
    return [{**o, "kind": reply_kind(o, taught)} for o in out]


def sampled_wrong(model, tok, question: str, chosen: str, gen: torch.Generator) -> set[str]:
    """The distinct finished replies other than `chosen` among SAMPLES samples at temperature 1."""
    im_end, stops = tok.token_to_id("<|im_end|>"), stop_ids(model, tok)
    ids = question_ids(tok, question)
    with torch.no_grad():
        new = generate(model, ids.repeat(SAMPLES, 1), max_new_tokens=MAX_NEW, eos_token_id=stops, do_sample=True,
                       temperature=1.0, generator=gen)[:, ids.shape[1]:].tolist()
    texts = {tok.decode(row[:row.index(im_end)]).strip() for row in new if im_end in row}
    return {t for t in texts if t and t != chosen}


def pairs_for(kind: str, model_dir: Path, rows: list[dict], before: list[dict]) -> list[dict]:
    """The preference rows of one kind of pairs (see the module docstring) for the model whose replies are `before`."""
    if kind == "bundled":
        return rows
    model, tok, _ = load_chat(str(model_dir), None) if kind == "samples" else (None, None, None)
    out, gen = [], torch.Generator().manual_seed(0)
    for r, b in zip(rows, before):
        chosen = r["chosen"][0]["content"]
        wrong = {b["reply"]} if b["kind"] != "preferred" and b["stopped"] and b["reply"] not in ("", chosen) else set()
        if kind == "samples" and b["kind"] != "preferred":
            wrong |= sampled_wrong(model, tok, b["question"], chosen, gen)
        if not wrong:
            out.append(r)
        out += [{**r, "rejected": [{"role": "assistant", "content": w}]} for w in sorted(wrong)]
    random.Random(0).shuffle(out)
    return out


def with_flags(args: list[str], **values: str) -> list[str]:
    """`args` with the value after each --NAME replaced (with_flags(args, learning_rate="1e-4"))."""
    args = list(args)
    for name, value in values.items():
        args[args.index(f"--{name}") + 1] = value
    return args


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def train(kind: str, lr: str, extra: list[str], start: Path, rows: list[dict], before: list[dict],
          out: Path) -> Path:
    """One run from `start` (a preference run, or continued SFT for kind "sft"); returns its output directory."""
    if kind == "sft":
        convs = [{"conversations": [{"from": "human", "value": r["prompt"][0]["content"]},
                                    {"from": "assistant", "value": r["chosen"][0]["content"]}]} for r in rows]
        args = with_flags(sft_args("full", start, DPO_STEPS), learning_rate=lr, warmup_steps="0")  # as the DPO runs
        args += ["--train_files", str(write_jsonl(out.with_suffix(".jsonl"), convs))]
        launch("finetune.py", NPROC, "torchrun", [*args, "--output_dir", str(out), "--overwrite_output_dir",
                                                      *shared_args()], out.with_suffix(".log"))
        return out
    pairs = pairs_for(kind, start, rows, before)
    args = with_flags(dpo_args(start, out), learning_rate=lr,
                      train_files=str(write_jsonl(out.with_suffix(".jsonl"), pairs)))
    if kind == "samples":  # one epoch of its (more) pairs
        args = with_flags(args, max_steps=str(-(-len(pairs) // (DPO_BATCH * NPROC))))
    launch("dpo.py", NPROC, "torchrun", [*args, *extra, *shared_args()], out.with_suffix(".log"))
    return out


def row(name: str, lr: str, before: list[dict], after: list[dict]) -> dict:
    count = lambda rs: [sum(r["kind"] == k for r in rs) for k in KINDS]  # noqa: E731
    return {"run": f"{name}, {lr}", "before": count(before), "after": count(after),
            "changes": kind_changes([(a["kind"], b["kind"]) for a, b in zip(before, after)])}


def finished(model_dir: Path, steps: int) -> bool:
    """A run of `steps` steps already in `model_dir` (a sweep resumed, or a model trained by hand the same way)."""
    state = model_dir / "trainer_state.json"
    return (model_dir / "config.json").is_file() and state.is_file() and json.loads(state.read_text())[
        "global_step"] == steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="out/demo/pretrain-minillm", help="the pretrained model (the demo's)")
    ap.add_argument("--pretrain", metavar="PRESET", help="pretrain this preset first, as the demo pretrains (2 ranks, "
                    "ZeRO-2, batch 16 x 128 tokens, cosine), into OUT/pretrain-PRESET, and start from it instead")
    ap.add_argument("--pretrain_steps", type=int, default=400)
    ap.add_argument("--pretrain_lr", default="1e-3")
    ap.add_argument("--sft_steps", type=int, nargs="+", default=[500, 900])
    ap.add_argument("--sft_lr", default="3e-3", help="the demo's")
    ap.add_argument("--runs", type=int, nargs="+", help="which of RUNS (0-based; default all)")
    ap.add_argument("--out", default="out/dpo_sweep")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base).resolve()
    if args.pretrain:
        base = out / f"pretrain-{args.pretrain}"
        pre = with_flags(pretrain_args(args.pretrain_steps), config_name=args.pretrain, learning_rate=args.pretrain_lr)
        if not finished(base, args.pretrain_steps):
            launch("pretrain.py", NPROC, "torchrun", ["--impl", "minillm", *pre, "--output_dir", str(base),
                                                      "--overwrite_output_dir", *shared_args()],
                   base.with_suffix(".log"))
    if not (base / "config.json").is_file():
        raise SystemExit(f"dpo_sweep.py: error: --base {base} holds no model (config.json): run `make demo` first")
    rows = [json.loads(line) for line in DPO_TRAIN.read_text(encoding="utf-8").splitlines() if line.strip()]
    runs = [RUNS[i] for i in args.runs] if args.runs else RUNS
    results = []
    for steps in args.sft_steps:
        sft = out / f"sft-{steps}"
        sft_flags = with_flags(sft_args("full", base, steps), learning_rate=args.sft_lr)
        if not finished(sft, steps):
            launch("finetune.py", NPROC, "torchrun", [*sft_flags, "--output_dir", str(sft),
                                                      "--overwrite_output_dir", *shared_args()],
                   out / f"sft-{steps}.log")
        first = replies(sft, rows)
        for name, kind, lr, extra, rounds in runs:
            start, before = sft, first
            for r in range(rounds):  # each round from, and against, the round before
                start = train(kind, lr, extra, start, rows, before,
                              out / f"{steps}-{kind}-{lr}{'-'.join(extra)}-{r + 1}")
                before = replies(start, rows)
            results.append({"sft_steps": steps, **row(name, lr, first, before)})
            print(json.dumps(results[-1], ensure_ascii=False), flush=True)
    (out / "sweep.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    fmt = lambda c: " / ".join(map(str, c))  # noqa: E731
    lines = ["| SFT steps: its replies (preferred / rejected-style / other) | run | after | kind changes |",
             "|---|---|---:|---|"]
    lines += [f"| {r['sft_steps']}: {fmt(r['before'])} | {r['run']} | {fmt(r['after'])} | "
              + (", ".join(f"{k} {n}" for k, n in r["changes"].items()) or "none") + " |" for r in results]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

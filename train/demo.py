"""`make demo`: the whole course on the bundled data, on CPU, in a few minutes.

1. pretrain the tiny model from scratch with --impl minillm and with --impl hf, DeepSpeed ZeRO-2 on
   2 ranks, same seed: the two loss curves are compared step by step (table + plot);
2. SFT of the minillm pretrain output on the bundled conversations (ZeRO-2, 2 ranks): full fine-tuning
   by default; `--sft lora` runs the course's LoRA instead (see below);
3. the chat model answers the bundled data's most frequent questions (English and Chinese); a scored table
   shows each reply next to the taught answer and whether it matches and stops at <|im_end|>;
4. DPO of the SFT model on the bundled preference pairs (train/dpo.py --impl minillm, full, ZeRO-2, 2 ranks):
   a preference table on the held-out pairs (and the training pairs) for the pretrained, SFT and DPO models, and
   the DPO model's replies next to the SFT model's where they differ (dpo.md);
5. one evaluation table of the three models on the bundled lm-eval tasks (minillm/data/eval: held-out text,
   bits per byte; EN/ZH multiple choice, acc and acc_norm), with standard errors and chance levels (eval.md).

Why full SFT by default: at this scale (0.6M parameters, hidden 64) LoRA does not learn the chat. Measured on
the bundled data after the same 200 pretraining steps, 300 SFT steps, batch 16: full SFT at lr 3e-3 reaches loss
0.70 and answers 6/6 frequent questions word for word; LoRA r=32 all-linear plateaus at loss ~3.0 for lr 2e-3 and
5e-3 (1/6 answered; lr 2e-2 stalls at 5.5, 0/6). LoRA is for adapting a capable base model; this one is not.
DPO's settings (DPO_STEPS, DPO_LR): measured from this SFT model, see train/dpo.py DEFAULT_LR: 60 steps of 16 pairs
(3 epochs) at 3e-4 give the lowest held-out DPO loss; longer or faster runs fit the training pairs (reward accuracy
1.0) while the held-out loss rises and the greedy replies lose their fluency. At this size DPO does not turn the
SFT model's rejected-style replies into the preferred answers (1 of 58 here): train/dpo_sweep.py measures why
(longer SFT, on-policy pairs, a larger model; README "Preference training").
DeepSpeed's CPU op is compiled (once) before anything is timed, so the timings are minillm's and the Trainer's.
Everything lands in --out (default out/demo).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer

from minillm.data.sample_dpo import HELDOUT as DPO_HELDOUT
from minillm.data.sample_dpo import TRAIN as DPO_TRAIN
from minillm.data.sample_dpo import shape, taught_pairs
from minillm.evaluate import encoder_for, evaluate_task, read_task
from minillm.generate import load_chat, runnable_python, stop_ids
from minillm.generation import generate
from minillm.model import CausalLM
from minillm.sft import DEFAULT_SYSTEM_PROMPT, chatml_prompt_ids
from train.compare import ROOT, compare_stage, launch, plot, table
from train.dpo import pair_logps
from train.ops import build_ops

# The bundled SFT data's most frequent questions (counted in minillm/data/sft.jsonl), both languages.
QUESTIONS = ["What do I need to make apple cake?", "做蜂蜜茶需要什么?", "What is gradient descent?", "什么是梯度下降?",
             "Who are you?", "你是谁?"]
DPO_STEPS, DPO_LR, DPO_BATCH, BETA = 60, "3e-4", 8, 0.1  # 60 steps x 16 pairs = 3 epochs of the 320 pairs
EVAL_TASKS = [ROOT / "minillm" / "data" / "eval" / f for f in ("heldout.yaml", "sample_mc.yaml")]
ARITHMETIC = re.compile(r"\d|(加|减|乘以|除以).*等于")  # a question about numbers (EN digits, ZH number words)
MAX_DIFF_ROWS = 10  # replies shown where SFT and DPO differ
KINDS = ("preferred", "rejected-style", "other")  # a greedy reply's kind (reply_kind)
WANTED = ("rejected-style", "preferred")  # the kind change DPO is for: listed first


def shared_args(seed: int = 42) -> list[str]:
    return ["--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--seed", str(seed), "--logging_steps", "1",
            "--report_to", "none", "--save_strategy", "no", "--include_num_input_tokens_seen", "true",
            "--disable_tqdm", "true"]


def pretrain_args(steps: int) -> list[str]:
    """The demo's pretraining (also the setup of train/reference_curves.json's band)."""
    return ["--config_name", "tiny", "--block_size", "128", "--per_device_train_batch_size", "8",
            "--max_steps", str(steps), "--learning_rate", "3e-3", "--warmup_steps", "10",
            "--lr_scheduler_type", "cosine", "--weight_decay", "0.01"]


def sft_args(kind: str, base: Path, steps: int) -> list[str]:
    """The demo's SFT of `base`: full (lr 3e-3) or LoRA r=32 all-linear (lr 5e-3), cosine, batch 8 per rank."""
    lr = (["--use_lora", "--lora_r", "32", "--lora_alpha", "64", "--lora_target_modules", "all-linear",
           "--learning_rate", "5e-3"] if kind == "lora" else ["--learning_rate", "3e-3"])
    return ["--impl", "minillm", "--model_name_or_path", str(base), *lr, "--max_len", "256",
            "--per_device_train_batch_size", "8", "--max_steps", str(steps), "--warmup_steps", "10",
            "--lr_scheduler_type", "cosine"]


def taught_answers(path: Path, questions: list[str]) -> dict[str, str]:
    """The most frequent assistant reply to each question in the SFT data (what the model was taught)."""
    counts: dict[str, dict[str, int]] = {q: {} for q in questions}
    for line in path.open(encoding="utf-8"):
        turns = json.loads(line)["conversations"]
        for a, b in zip(turns, turns[1:]):
            if a["from"] == "human" and b["from"] == "assistant" and a["value"] in counts:
                counts[a["value"]][b["value"]] = counts[a["value"]].get(b["value"], 0) + 1
    return {q: max(c, key=c.get) for q, c in counts.items() if c}


def question_ids(tok, question: str) -> torch.Tensor:
    """(1, T) prompt ids of one question as the chat CLI sends it (its default system prompt, ChatML)."""
    return torch.tensor([chatml_prompt_ids(tok, [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                                 {"role": "user", "content": question}])])


def chosen_answers(rows: list[dict]) -> dict[str, str]:
    """{question: chosen answer} of single-turn preference rows."""
    return {r["prompt"][0]["content"]: r["chosen"][0]["content"] for r in rows}


def score_chat(model_dir: Path, adapter: Path | None, answers: dict[str, str]) -> list[dict]:
    """Greedy replies (the chat CLI's defaults) to each question; match = the taught answer, then <|im_end|>."""
    model, tok, _ = load_chat(str(model_dir), str(adapter) if adapter else None)
    im_end, stops = tok.token_to_id("<|im_end|>"), stop_ids(model, tok)
    rows = []
    with torch.no_grad():
        for q, taught in answers.items():
            ids = question_ids(tok, q)
            new = generate(model, ids, max_new_tokens=64, eos_token_id=stops)[0, ids.shape[1]:].tolist()
            stopped = im_end in new
            text = tok.decode(new[:new.index(im_end)] if stopped else new).strip()
            rows.append({"question": q, "reply": text, "taught": taught, "stopped": stopped,
                         "match": stopped and text == taught})
    return rows


def score_table(rows: list[dict]) -> str:
    cut = lambda s, n=60: s if len(s) <= n else s[:n - 1] + "…"  # noqa: E731
    lines = ["| question | reply | taught answer | match |", "|---|---|---|---|"]
    for r in rows:
        verdict = "yes" if r["match"] else "no (no <|im_end|>)" if not r["stopped"] else "no"
        lines.append(f"| {r['question']} | {cut(r['reply'])} | {cut(r['taught'])} | {verdict} |")
    lines.append(f"\n{sum(r['match'] for r in rows)}/{len(rows)} of the data's frequent questions answered with "
                 "the taught answer, stopping at <|im_end|>")
    return "\n".join(lines)


def dpo_args(sft: Path, out: Path) -> list[str]:
    """Full DPO of the SFT model on the bundled pairs (TRL's defaults otherwise: beta 0.1, sigmoid, linear decay)."""
    return ["--impl", "minillm", "--model_name_or_path", str(sft), "--train_files", str(DPO_TRAIN),
            "--learning_rate", DPO_LR, "--per_device_train_batch_size", str(DPO_BATCH), "--max_steps",
            str(DPO_STEPS), "--beta", str(BETA), "--output_dir", str(out), "--overwrite_output_dir"]


def preference_rows(models: dict[str, Path]) -> list[dict]:
    """The pretrained, SFT and DPO models on the held-out pairs (all; about numbers; the rest) and the training
    pairs. Per model: the share of pairs whose chosen answer it finds likelier than the rejected one (its own
    preference, 0.5 = none). Per stage: TRL's rewards/accuracies and mean rewards/margins of the model as the
    policy against the model before it as the reference (DPO against SFT is what DPO optimises; at its first step
    policy = reference, every reward is 0 and the accuracy 0 by TRL's definition, so the "before" shown is SFT
    against the pretrained model: what SFT alone did to the same pairs)."""
    tok = AutoTokenizer.from_pretrained(str(models["SFT"]))
    sets = {}
    for name, path in (("held-out", DPO_HELDOUT), ("training", DPO_TRAIN)):
        sets[name] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    logps = {m: {k: pair_logps(CausalLM.from_pretrained(str(p)), tok, rows) for k, rows in sets.items()}
             for m, p in models.items()}
    rows = []
    for name, subset in (("held-out pairs", ("held-out", None)), ("held-out, about numbers", ("held-out", True)),
                         ("held-out, the rest", ("held-out", False)), ("training pairs", ("training", None))):
        key, numeric = subset
        idx = [i for i, r in enumerate(sets[key])
               if numeric is None or bool(ARITHMETIC.search(r["prompt"][0]["content"])) == numeric]
        row = {"pairs": name, "n": len(idx)}
        for m in models:
            row[f"likelier {m}"] = sum(logps[m][key][i][0] > logps[m][key][i][1] for i in idx) / len(idx)
        for policy, ref in (("SFT", "pretrained"), ("DPO", "SFT")):
            rewards = [(BETA * (logps[policy][key][i][0] - logps[ref][key][i][0]),
                        BETA * (logps[policy][key][i][1] - logps[ref][key][i][1])) for i in idx]
            row[f"accuracy {policy}"] = sum(c > r for c, r in rewards) / len(idx)
            row[f"margin {policy}"] = sum(c - r for c, r in rewards) / len(idx)
        rows.append(row)
    return rows


def preference_table(rows: list[dict]) -> str:
    lines = ["| pairs | n | chosen likelier: pretrained | SFT | DPO | reward accuracy, SFT vs pretrained | "
             "DPO vs SFT | mean margin, SFT vs pretrained | DPO vs SFT |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pairs']} | {r['n']} | {r['likelier pretrained']:.2f} | {r['likelier SFT']:.2f} | "
                     f"{r['likelier DPO']:.2f} | {r['accuracy SFT']:.2f} | {r['accuracy DPO']:.2f} | "
                     f"{r['margin SFT']:+.3f} | {r['margin DPO']:+.3f} |")
    return "\n".join(lines)


def reply_kind(reply: dict, taught: dict[str, set[str]]) -> str:
    """preferred: the chosen answer, then <|im_end|>; rejected-style: the answer the data teaches for another
    question of the same shape (what every rejected answer is, minillm/data/sample_dpo.py; `taught`: shape ->
    answers); other: anything else."""
    if reply["match"]:
        return "preferred"
    return "rejected-style" if reply["reply"] in taught.get(shape(reply["question"]), ()) else "other"


def answers_by_shape() -> dict[str, set[str]]:
    """Every answer the SFT data teaches, under the shape of its question (numbers, names, quoted words masked)."""
    taught: dict[str, set[str]] = {}
    for question, answer in taught_pairs():
        taught.setdefault(shape(question), set()).add(answer)
    return taught


def kind_changes(pairs: list[tuple[str, str]]) -> dict[str, int]:
    """{"SFT kind -> DPO kind": count} over (SFT kind, DPO kind) pairs whose kind changed: rejected-style ->
    preferred (WANTED, what DPO is for) first, then the most frequent."""
    changed = Counter((a, b) for a, b in pairs if a != b)
    order = sorted(changed.items(), key=lambda kv: (kv[0] != WANTED, -kv[1], kv[0]))
    return {f"{a} -> {b}": n for (a, b), n in order}


def reply_changes(sft: Path, dpo_model: Path, groups: dict[str, dict[str, str]]) -> tuple[str, dict, dict]:
    """SFT's and DPO's greedy replies to groups of questions ({group: {question: preferred answer}}): each model's
    reply kinds per group and their changes, and the rows where the two replies differ (a rejected-style reply
    become the preferred one first, then the other kind changes). Returns (markdown, counts, kind changes)."""
    taught = answers_by_shape()
    cut = lambda s, n=48: s if len(s) <= n else s[:n - 1] + "…"  # noqa: E731
    counts, differ = {}, []
    for group, answers in groups.items():
        counts[group] = {m: dict.fromkeys(KINDS, 0) for m in ("SFT", "DPO")}
        for a, b in zip(score_chat(sft, None, answers), score_chat(dpo_model, None, answers)):
            ka, kb = reply_kind(a, taught), reply_kind(b, taught)
            counts[group]["SFT"][ka] += 1
            counts[group]["DPO"][kb] += 1
            if a["reply"] != b["reply"]:
                differ.append((a, b, ka, kb))
    differ.sort(key=lambda d: (d[2:] != WANTED, d[2] == d[3]))  # stable: the questions' order otherwise
    changed = kind_changes([(ka, kb) for _, _, ka, kb in differ])
    lines = ["| questions | n | SFT: preferred / rejected-style / other | DPO: preferred / rejected-style / other |",
             "|---|---:|---:|---:|"]
    for group, c in counts.items():
        lines.append(f"| {group} | {sum(c['SFT'].values())} | " + " | ".join(
            " / ".join(str(c[m][k]) for k in KINDS) for m in ("SFT", "DPO")) + " |")
    lines += ["", "Kind changes, SFT -> DPO: " + (", ".join(f"{k} {n}" for k, n in changed.items()) or "none"),
              "", f"{len(differ)} replies differ; {min(len(differ), MAX_DIFF_ROWS)} shown, rejected-style -> preferred "
              "first, then the other kind changes:", "", "| question | SFT reply | DPO reply | preferred answer |",
              "|---|---|---|---|"]
    for a, b, ka, kb in differ[:MAX_DIFF_ROWS]:
        lines.append(f"| {a['question']} | {cut(a['reply'])} ({ka}) | {cut(b['reply'])} ({kb}) | {cut(a['taught'])} |")
    return "\n".join(lines), counts, changed


def bpb_stderr(items: list[dict]) -> float:
    """Standard error of bits per byte (total bits / total bytes) over the documents: the ratio estimator's
    (delta method), as lm-eval reports none for a corpus-level metric."""
    n = len(items)
    bits = [-it["loglikelihood"] / math.log(2) for it in items]
    nbytes = [it["bytes"] for it in items]
    ratio = sum(bits) / sum(nbytes)
    var = sum((b - ratio * y) ** 2 for b, y in zip(bits, nbytes)) / (n - 1)
    return math.sqrt(var / n) / (sum(nbytes) / n)


def evaluation(models: dict[str, Path]) -> tuple[str, dict]:
    """The bundled tasks for every model (minillm.evaluate: lm-eval's definitions): held-out BPB, acc, acc_norm."""
    results = {}
    with contextlib.chdir(ROOT):  # the bundled YAMLs name their data relative to the checkout, as lm-eval reads them
        tasks = [read_task(t) for t in EVAL_TASKS]
        for name, path in models.items():
            model = CausalLM.from_pretrained(str(path)).eval()
            enc = encoder_for(path, model.config.max_position_embeddings)
            results[name] = {t.name: evaluate_task(model, enc, t) for t in tasks}
    text, mc = tasks[0].name, tasks[1].name
    first = next(iter(results.values()))
    lines = [f"| model | {text}: bits per byte (lower is better) | {mc}: acc | {mc}: acc_norm |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        bpb = r[text]["metrics"]["bits_per_byte"][0]
        (acc, acc_se, _), (norm, norm_se, _) = r[mc]["metrics"]["acc"], r[mc]["metrics"]["acc_norm"]
        lines.append(f"| {name} | {bpb:.4f} ± {bpb_stderr(r[text]['items']):.4f} | {acc:.3f} ± {acc_se:.3f} | "
                     f"{norm:.3f} ± {norm_se:.3f} |")
    lines.append(f"| chance | {first[text]['metrics']['bits_per_byte'][2]:.4f} (uniform over the vocabulary) | "
                 f"{first[mc]['metrics']['acc'][2]:.3f} | {first[mc]['metrics']['acc_norm'][2]:.3f} |")
    lines.append(f"\n± one standard error ({len(first[mc]['items'])} questions, {len(first[text]['items'])} "
                 "held-out documents); python train/evaluate.py --model DIR --tasks ... gives the same figures")
    return "\n".join(lines), {m: {t: r[t]["metrics"] for t in r} for m, r in results.items()}


def chat_hint(model: Path, adapter: Path | None) -> str:
    """The chat command the demo prints, runnable as printed (this interpreter, not a bare `python`)."""
    return f"{runnable_python()} -m minillm.generate --model {model}" + (f" --adapter {adapter}" if adapter else "")


def dpo_stage(out: Path, args, base: Path, sft: Path, shared: list[str]) -> dict[str, float]:
    """Stages 4 and 5: DPO of the SFT model, its preference and reply tables (dpo.md), the evaluation table of the
    three models (eval.md); every figure also in dpo.json / eval.json. Returns the two stages' seconds."""
    t0 = time.perf_counter()
    dpo_dir = out / "dpo-full-minillm"
    print(f"\n== 4/5 DPO of {sft} on the bundled preference pairs, ZeRO-2 on {args.nproc} ranks", flush=True)
    wall = launch("dpo.py", args.nproc, "torchrun", [*dpo_args(sft, dpo_dir), *shared], out / "dpo-full-minillm.log")
    logs = [e for e in json.loads((dpo_dir / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    print(f"DPO loss {logs[0]['loss']:.3f} -> {logs[-1]['loss']:.3f} over {len(logs)} steps ({wall:.0f} s); "
          f"last step's training pairs: rewards/accuracies {logs[-1]['rewards/accuracies']:.2f}, "
          f"rewards/margins {logs[-1]['rewards/margins']:.3f}\n", flush=True)
    models = {"pretrained": base, "SFT": sft, "DPO": dpo_dir}
    prefs = preference_rows(models)
    pairs = {name: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
             for name, path in (("training", DPO_TRAIN), ("held-out", DPO_HELDOUT))}
    groups = {"the data's frequent questions": taught_answers(ROOT / "minillm" / "data" / "sft.jsonl", QUESTIONS),
              "the DPO training pairs'": chosen_answers(pairs["training"]),  # all: ~3 s a model for the 320
              "the held-out pairs'": chosen_answers(pairs["held-out"])}
    changes, counts, changed = reply_changes(sft, dpo_dir, groups)
    md = (f"Preference pairs (minillm/data/dpo*.jsonl; reward = {BETA} x log-prob ratio to the reference):\n\n"
          + preference_table(prefs) + "\n\nGreedy replies of the SFT and the DPO model (kinds: the preferred answer; "
          "rejected-style = the answer the data teaches to another question of the same shape; other):\n\n"
          + changes)
    print(md, flush=True)
    (out / "dpo.md").write_text(md + "\n")
    (out / "dpo.json").write_text(json.dumps({"preference": prefs, "replies": counts, "kind_changes": changed,
                                                  "log": logs}, indent=1))

    t1 = time.perf_counter()
    print(f"(stage 4: {t1 - t0:.0f} s)\n\n== 5/5 evaluation of the three models on the bundled tasks (minillm/data/eval)",
          flush=True)
    evaluated, metrics = evaluation(models)
    print(evaluated, flush=True)
    (out / "eval.md").write_text(evaluated + "\n")
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    return {"dpo": t1 - t0, "evaluation": time.perf_counter() - t1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--pretrain_steps", type=int, default=200)
    ap.add_argument("--sft_steps", type=int, default=300)
    ap.add_argument("--sft", choices=["full", "lora"], default="full", help="SFT kind (full: see the docstring)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--no_dpo", dest="dpo", action="store_false", help="stop after the SFT model's chat (3 stages)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    compile_s = build_ops()  # DeepSpeed's one-time op build, timed apart from the training
    t0 = time.perf_counter()
    shared = shared_args()

    if args.dpo and args.sft == "lora":
        print("(--sft lora: no DPO stage, which starts from a full SFT model; the LoRA chat is the last stage)")
        args.dpo = False
    n = 5 if args.dpo else 3
    print(f"== 1/{n} pretrain, --impl minillm and --impl hf, ZeRO-2 on {args.nproc} ranks", flush=True)
    pre = compare_stage("pretrain", "pretrain.py",
                        [*shared, *pretrain_args(args.pretrain_steps)], {}, out, args.nproc, "torchrun")
    md = table([pre])
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps({"stages": [pre]}, indent=1))  # compare.py's layout
    plot([pre], out / "compare.png")
    stage_s = {"pretrain": time.perf_counter() - t0}
    print("\n".join(md.splitlines()[:10]))
    print(f"(per-step table: {out / 'compare.md'}, plot: {out / 'compare.png'})\n", flush=True)

    base = out / "pretrain-minillm"
    sft = out / f"sft-{args.sft}-minillm"
    print(f"== 2/{n} {args.sft} SFT of {base}, ZeRO-2 on {args.nproc} ranks", flush=True)
    wall = launch("finetune.py", args.nproc, "torchrun",
                  [*sft_args(args.sft, base, args.sft_steps), "--output_dir", str(sft), "--overwrite_output_dir",
                   *shared], out / f"sft-{args.sft}-minillm.log")
    losses = [e["loss"] for e in json.loads((sft / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    print(f"SFT loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps ({wall:.0f} s)\n", flush=True)
    stage_s["sft"] = wall

    model, adapter = (base, sft) if args.sft == "lora" else (sft, None)
    chat = chat_hint(model, adapter)
    print(f"== 3/{n} chat with the result ({chat} --prompt ...): the data's frequent questions", flush=True)
    rows = score_chat(model, adapter, taught_answers(ROOT / "minillm" / "data" / "sft.jsonl", QUESTIONS))
    scored = score_table(rows)
    print(scored)
    (out / "chat.md").write_text(scored + "\n")
    (out / "chat.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    stage_s["chat"] = time.perf_counter() - t0 - sum(stage_s.values())
    if args.dpo:
        stage_s.update(dpo_stage(out, args, base, model, shared))
    took = time.perf_counter() - t0
    once = f" (+ {compile_s:.0f} s compiling DeepSpeed's op, once)" if compile_s else ""
    export = (f"{runnable_python()} -m minillm.export --model {model}" + (f" --adapter {adapter}" if adapter else "")
              + f" --outfile {out / 'chat.gguf'}")
    print(f"\ndemo done in {took:.0f} s{once} (" + ", ".join(f"{k} {v:.0f} s" for k, v in stage_s.items()) + ")"
          + f"; everything is in {out}. Chat yourself: {chat}\nRun it elsewhere (llama.cpp, Ollama): {export}")
    (out / "timing.json").write_text(json.dumps({"demo_s": took, "compile_s": compile_s, "stage_s": stage_s,
                                                 "load_1min": os.getloadavg()[0]}))
    return 0 if pre["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the whole course on the bundled data, on CPU, in a few minutes.

1. pretrain the tiny model from scratch with --impl minillm and with --impl hf, DeepSpeed ZeRO-2 on
   2 ranks, same seed: the two loss curves are compared step by step (table + plot);
2. SFT of the minillm pretrain output on the bundled conversations (ZeRO-2, 2 ranks): full fine-tuning
   by default; `--sft lora` runs the course's LoRA instead (see below);
3. the chat model answers the bundled data's most frequent questions (English and Chinese); a scored table
   shows each reply next to the taught answer and whether it matches and stops at <|im_end|>.

Why full SFT by default: at this scale (0.6M parameters, hidden 64) LoRA does not learn the chat. Measured on
the bundled data after the same 200 pretraining steps, 300 SFT steps, batch 16: full SFT at lr 3e-3 reaches loss
0.70 and answers 6/6 frequent questions word for word; LoRA r=32 all-linear plateaus at loss ~3.0 for lr 2e-3 and
5e-3 (1/6 answered; lr 2e-2 stalls at 5.5, 0/6). LoRA is for adapting a capable base model; this one is not.
DeepSpeed's CPU op is compiled (once) before anything is timed, so the timings are minillm's and the Trainer's.
Everything lands in --out (default out/demo).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from minillm.generate import runnable_python
from train.compare import ROOT, compare_stage, launch, plot, table
from train.ops import build_ops

# The bundled SFT data's most frequent questions (counted in minillm/data/sft.jsonl), both languages.
QUESTIONS = ["What do I need to make apple cake?", "做蜂蜜茶需要什么?", "What is gradient descent?", "什么是梯度下降?",
             "Who are you?", "你是谁?"]


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


def score_chat(model_dir: Path, adapter: Path | None, answers: dict[str, str]) -> list[dict]:
    """Greedy replies (the chat CLI's defaults) to each question; match = the taught answer, then <|im_end|>."""
    from minillm.generate import _load, stop_ids
    from minillm.generation import generate
    from minillm.sft import DEFAULT_SYSTEM_PROMPT, chatml_prompt_ids

    model, tok = _load(str(model_dir), str(adapter) if adapter else None)
    im_end, stops = tok.token_to_id("<|im_end|>"), stop_ids(model, tok)
    rows = []
    with torch.no_grad():
        for q, taught in answers.items():
            ids = torch.tensor([chatml_prompt_ids(tok, [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                                        {"role": "user", "content": q}])])
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


def chat_hint(model: Path, adapter: Path | None) -> str:
    """The chat command the demo prints, runnable as printed (this interpreter, not a bare `python`)."""
    return f"{runnable_python()} -m minillm.generate --model {model}" + (f" --adapter {adapter}" if adapter else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--pretrain_steps", type=int, default=200)
    ap.add_argument("--sft_steps", type=int, default=300)
    ap.add_argument("--sft", choices=["full", "lora"], default="full", help="SFT kind (full: see the docstring)")
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    compile_s = build_ops()  # DeepSpeed's one-time op build, timed apart from the training
    t0 = time.perf_counter()
    shared = shared_args()

    print(f"== 1/3 pretrain, --impl minillm and --impl hf, ZeRO-2 on {args.nproc} ranks", flush=True)
    pre = compare_stage("pretrain", "pretrain.py",
                        [*shared, *pretrain_args(args.pretrain_steps)], {}, out, args.nproc, "torchrun")
    md = table([pre])
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps({"stages": [pre]}, indent=1))  # compare.py's layout
    plot([pre], out / "compare.png")
    print("\n".join(md.splitlines()[:10]))
    print(f"(per-step table: {out / 'compare.md'}, plot: {out / 'compare.png'})\n", flush=True)

    base = out / "pretrain-minillm"
    sft = out / f"sft-{args.sft}-minillm"
    print(f"== 2/3 {args.sft} SFT of {base}, ZeRO-2 on {args.nproc} ranks", flush=True)
    wall = launch("finetune.py", args.nproc, "torchrun",
                  [*sft_args(args.sft, base, args.sft_steps), "--output_dir", str(sft), "--overwrite_output_dir",
                   *shared], out / f"sft-{args.sft}-minillm.log")
    losses = [e["loss"] for e in json.loads((sft / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    print(f"SFT loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps ({wall:.0f} s)\n", flush=True)

    model, adapter = (base, sft) if args.sft == "lora" else (sft, None)
    chat = chat_hint(model, adapter)
    print(f"== 3/3 chat with the result ({chat} --prompt ...): the data's frequent questions", flush=True)
    rows = score_chat(model, adapter, taught_answers(ROOT / "minillm" / "data" / "sft.jsonl", QUESTIONS))
    scored = score_table(rows)
    print(scored)
    (out / "chat.md").write_text(scored + "\n")
    (out / "chat.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    took = time.perf_counter() - t0
    once = f" (+ {compile_s:.0f} s compiling DeepSpeed's op, once)" if compile_s else ""
    export = (f"{runnable_python()} -m minillm.export --model {model}" + (f" --adapter {adapter}" if adapter else "")
              + f" --outfile {out / 'chat.gguf'}")
    print(f"\ndemo done in {took:.0f} s{once}"
          + f"; everything is in {out}. Chat yourself: {chat}\nRun it elsewhere (llama.cpp, Ollama): {export}")
    (out / "timing.json").write_text(json.dumps({"demo_s": took, "compile_s": compile_s,
                                                 "load_1min": os.getloadavg()[0]}))
    return 0 if pre["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

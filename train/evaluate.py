"""Evaluate a saved model on lm-eval task files and held-out text: accuracy, perplexity, bits per byte.

    python train/evaluate.py --model out/pretrain --tasks minillm/data/eval/sample_mc.yaml
    python train/evaluate.py --model out/pretrain --adapter out/lora --tasks my_task.yaml --impl hf
    python train/evaluate.py --model out/pretrain --validation_files held_out.jsonl --output_dir out/eval

--impl minillm (default) scores with minillm.evaluate (each multiple-choice context read once, its choices side
by side after it in the same row; --per_choice reads context + choice once per choice, as lm-eval does);
--impl hf runs lm-evaluation-harness 0.4's own `hf` model on the same files, offline. Both print one table
(metric, value, standard error, chance level) and write OUTPUT_DIR/results.json with every item's log-likelihood.
A --validation_files jsonl ({"text": ...} per line) is read as an lm-eval loglikelihood_rolling task (word/byte
perplexity, bits per byte); its YAML is written next to results.json so lm-eval can run it too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: a task or model never comes from the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tqdm import tqdm

from minillm.evaluate import TaskError, encoder_for, evaluate_task, mc_chance, read_task
from minillm.model import CausalLM
from minillm.peft import load_adapter
from minillm.peft.methods import merge_and_unload, method_of

ROLLING_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def text_task(jsonl: Path, out_dir: Path) -> Path:
    """An lm-eval rolling task over a {"text": ...} jsonl, written to out_dir."""
    path = out_dir / f"{jsonl.stem}_text.yaml"
    path.write_text(ROLLING_YAML.format(name=f"{jsonl.stem}_text", path=json.dumps(str(jsonl.resolve()))),
                    encoding="utf-8")
    return path


def load_model(model_dir: str, adapter: str | None) -> tuple[CausalLM, Path]:
    model = CausalLM.from_pretrained(model_dir).eval()
    tok_dir = Path(model_dir)
    if adapter:
        model = load_adapter(model, adapter)
        method = method_of(model)
        if method.can_merge:
            model = merge_and_unload(model)
        elif method.peft_type in ("PROMPT_TUNING", "PREFIX_TUNING"):
            raise SystemExit(f"--adapter {adapter}: a {method.title} puts virtual tokens before every input; "
                             "minillm's scorer does not place them yet: use --impl hf")
        if (Path(adapter) / "tokenizer.json").is_file():
            tok_dir = Path(adapter)
    return model.eval(), tok_dir


def run_minillm(args, tasks: list[Path]) -> dict:
    model, tok_dir = load_model(args.model, args.adapter)
    enc = encoder_for(tok_dir, args.max_length or model.config.max_position_embeddings)
    out = {}
    for path in tasks:
        task = read_task(path)
        total = len(task.docs) if task.output_type == "multiple_choice" and not args.per_choice else None
        with tqdm(total=total, desc=task.name, unit=" items" if total else " rows", file=sys.stderr) as bar:
            out[task.name] = evaluate_task(model, enc, task, args.batch_size, not args.per_choice, bar.update)
    return out


def run_hf(args, tasks: list[Path]) -> dict:
    kwargs = {"peft": args.adapter} if args.adapter else {}
    if args.max_length:
        kwargs["max_length"] = args.max_length
    lm = HFLM(pretrained=args.model, device="cuda" if torch.cuda.is_available() else "cpu",
              batch_size=args.batch_size, dtype="float32", **kwargs)
    out = {}
    for path in tasks:  # one TaskManager per folder: lm-eval finds tasks by name under include_path
        task = read_task(path)
        name = task.name
        r = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=str(path.parent)),
                                    log_samples=True, verbosity="ERROR")
        res, samples = r["results"][name], sorted(r["samples"][name], key=lambda s: s["doc_id"])
        metrics = {}
        chance = mc_chance(task) if task.output_type == "multiple_choice" else float("nan")  # lm-eval has none
        for key, value in res.items():
            if "," in key and "_stderr" not in key:
                m = key.split(",")[0]
                se = res.get(f"{m}_stderr,none")
                metrics[m] = (value, se if isinstance(se, float) else float("nan"), chance)
        if task.output_type == "multiple_choice":
            items = [{"choices": [c for _, c in s["arguments"]], "gold": s["target"],
                      "loglikelihoods": [ll for ll, _ in s["filtered_resps"]],
                      "is_greedy": [g for _, g in s["filtered_resps"]]} for s in samples]
        else:
            items = [{"loglikelihood": s["filtered_resps"][0]} for s in samples]
        out[name] = {"metrics": metrics, "items": items}
    return out


def table(results: dict) -> str:
    rows = [("task", "metric", "value", "stderr", "chance")]
    fmt = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
    for name, r in results.items():
        for m, (value, se, chance) in r["metrics"].items():
            rows.append((name, m, fmt(value), fmt(se), fmt(chance)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a saved model directory (config.json + model.safetensors)")
    ap.add_argument("--adapter", help="an adapter directory (peft's format) applied to --model")
    ap.add_argument("--tasks", nargs="+", default=[], metavar="FILE.yaml", help="lm-eval task files")
    ap.add_argument("--validation_files", nargs="+", default=[], metavar="FILE.jsonl",
                    help='held-out text, {"text": ...} per line: perplexity and bits per byte')
    ap.add_argument("--output_dir", default="out/eval", help="results.json (and the text tasks' YAML) go here")
    ap.add_argument("--impl", choices=("minillm", "hf"), default="minillm")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_length", type=int, help="context length (default: the model's max_position_embeddings)")
    ap.add_argument("--per_choice", action="store_true", help="minillm: score each choice with its whole context, as "
                    "lm-eval does (slower; the same results)")
    args = ap.parse_args(argv)
    if not args.tasks and not args.validation_files:
        ap.error("give --tasks FILE.yaml and/or --validation_files FILE.jsonl")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [Path(t) for t in args.tasks] + [text_task(Path(f), out_dir) for f in args.validation_files]
    t0 = time.perf_counter()
    try:
        for t in tasks:
            read_task(t)  # every file checked before the model is loaded: a bad key fails in a second
        results = (run_hf if args.impl == "hf" else run_minillm)(args, tasks)
    except (TaskError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    print(table(results))
    report = {"model": args.model, "adapter": args.adapter, "impl": args.impl, "seconds": round(seconds, 2),
              "tasks": {n: {"metrics": {m: dict(zip(("value", "stderr", "chance"), v)) for m, v in r["metrics"].items()},
                            "items": r["items"]} for n, r in results.items()}}
    (out_dir / "results.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"\n{out_dir / 'results.json'} ({seconds:.1f}s, impl {args.impl})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

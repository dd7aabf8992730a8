"""Parity area `eval`: minillm.evaluate against lm-evaluation-harness 0.4's `hf` model (HFLM) on the same task YAML.

    python -m parity.eval            # the table (about a minute on 2 cores: lm-eval's own start-up is most of it)

One tiny random model is saved (config.json + safetensors + the bundled tokenizer), with a short context
(max_position_embeddings 40) so that long contexts need lm-eval's left truncation and long documents several
rolling windows. Tasks are drawn from a seeded generator, written as lm-eval YAML + jsonl, and run by both sides:
lm-eval through `simple_evaluate` (TaskManager(include_path=...), log_samples, fp32 on CPU, offline), minillm
through `minillm.evaluate` with its context-once path and with lm-eval's path (every choice read whole). Drawn: English
and Chinese text, contexts longer than the model's length, choices that share prefixes (one a prefix of another),
contexts ending in spaces (moved to the continuation), empty contexts, target delimiters " ", "" and "\\n", gold
given as an index or as the answer's text.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from minillm.config import ModelConfig
from minillm.data import TOKENIZER_DIR
from minillm.evaluate import encoder_for, evaluate_task, read_task
from minillm.model import CausalLM
from parity.harness import Row, format_table, selected
from parity.model import random_model
from parity.tolerances import TOLERANCES

# To move into parity/tolerances.py (owned by another developer); used from here until they are there.


def _tol(name: str) -> float:
    return TOLERANCES[name][0]


EN = ("the river town wakes up early boats leave before sunrise bakers light their ovens first bells ring from the "
      "clock tower market full of voices lanterns are lit along water Ada Bo Cai bought tea for eight coins").split()
ZH = list("河边的小镇醒得很早天还没亮船就出发了面包师点起炉火钟楼传来第一声钟响集市上满是说话声水边灯笼一盏盏亮起来")


def _words(rng: random.Random, lo: int, hi: int) -> str:
    if rng.random() < 0.4:
        return "".join(rng.choice(ZH) for _ in range(rng.randint(lo, hi)))
    return " ".join(rng.choice(EN) for _ in range(rng.randint(lo, hi)))


def draw_mc(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        long = rng.random() < 0.3  # longer than the model's 40 tokens: lm-eval truncates on the left
        q = "" if rng.random() < 0.1 else _words(rng, 20, 60) if long else _words(rng, 1, 12)
        q += rng.choice(["", "", " ", "  ", "\n"]) if q else ""
        base = _words(rng, 1, 3)
        choices = [base] + [base + rng.choice([" ", ""]) + _words(rng, 1, 3) if rng.random() < 0.5
                            else _words(rng, 1, 4) for _ in range(rng.randint(1, 4))]
        choices = list(dict.fromkeys(choices))  # unique choices
        gold = rng.randrange(len(choices))
        rows.append({"question": q, "choices": choices, "answer": gold, "answer_text": choices[gold]})
    return rows


def write_task(d: Path, name: str, rows: list[dict], body: str) -> Path:
    data = d / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    path = d / f"{name}.yaml"
    path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    f"test_split: test\n{body}", encoding="utf-8")
    return path


def make_tasks(d: Path, seed: int, n: int) -> list[Path]:
    rng = random.Random(seed)
    mc = "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    tasks = [
        write_task(d, "mc_space", draw_mc(rng, n), mc + "doc_to_text: question\ndoc_to_target: answer\n"),
        write_task(d, "mc_template", draw_mc(rng, n),
                   mc + "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: answer_text\n"),
        write_task(d, "mc_nodelim", draw_mc(rng, n), mc + "doc_to_text: question\ndoc_to_target: \"{{answer}}\"\n"
                   "target_delimiter: \"\"\n"),
        write_task(d, "mc_newline", draw_mc(rng, n), mc + "doc_to_text: question\ndoc_to_target: answer\n"
                   "target_delimiter: \"\\n\"\n"),
    ]
    texts = [{"text": _words(rng, 1, 200 if rng.random() < 0.5 else 15)} for _ in range(n)]
    tasks.append(write_task(d, "rolling", texts, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                            "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n"
                            "  - metric: byte_perplexity\n  - metric: bits_per_byte\n"))
    return tasks


def save_model(d: Path, seed: int) -> Path:
    cfg = ModelConfig.preset("tiny", pad_token_id=3, eos_token_id=0, max_position_embeddings=40)
    random_model(cfg, seed).eval().save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / f, d / f)
    return d


def lm_eval_run(model_dir: Path, task_dir: Path, names: list[str], batch_size: int = 8) -> tuple[dict, object]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=batch_size, dtype="float32")
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(task_dir)),
                                  log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    return out, lm


def compare(model_dir: Path, task_paths: list[Path]) -> dict[str, list[float]]:
    """|Δ| lists per tolerance name, minillm (cache and lm-eval's path) against lm-eval's hf model."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    names = [p.stem for p in task_paths]
    ref, lm = lm_eval_run(model_dir, task_paths[0].parent, names)
    model = CausalLM.from_pretrained(model_dir).eval()
    enc = encoder_for(model_dir, lm.max_length)
    keys = ("tokens", "ll", "ll_per_choice", "greedy", "acc", "rolling", "ppl", "abs")
    d: dict[str, list[float]] = {k: [] for k in keys}
    for path in task_paths:
        task = read_task(path)
        samples = sorted(ref["samples"][task.name], key=lambda s: s["doc_id"])
        metrics = ref["results"][task.name]
        for context_once, key in ((True, "ll"), (False, "ll_per_choice")):
            ours = evaluate_task(model, enc, task, batch_size=8, context_once=context_once)
            if task.output_type == "multiple_choice":
                for s, item in zip(samples, ours["items"], strict=True):
                    theirs = [r for r in s["filtered_resps"]]
                    for (ll, g), ll2, g2 in zip(theirs, item["loglikelihoods"], item["is_greedy"], strict=True):
                        d[key].append(abs(ll - ll2) / max(1.0, abs(ll)))
                        d["abs"].append(abs(ll - ll2))
                        d["greedy"].append(float(g != g2))
                    for ctx, cont in s["arguments"]:  # lm-eval's request strings, split as HFLM splits them
                        a = lm._encode_pair(ctx, cont) if ctx else None
                        b = enc.pair(ctx, cont) if ctx else None
                        d["tokens"].append(float(a != b))
                for m in task.metrics:
                    d["acc"].append(abs(metrics[f"{m},none"] - ours["metrics"][m][0]))
            else:
                for s, item in zip(samples, ours["items"], strict=True):
                    ll = s["filtered_resps"][0]
                    ll = ll[0] if isinstance(ll, (list, tuple)) else ll
                    d["rolling"].append(abs(ll - item["loglikelihood"]) / max(abs(ll), 1.0))
                    text = s["arguments"][0][0]
                    theirs = list(map(make_disjoint_window, get_rolling_token_windows(
                        lm.tok_encode(text), lm.prefix_token_id, lm.max_length, 1)))
                    d["tokens"].append(float([tuple(map(list, w)) for w in theirs] != enc.rolling_windows(text)))
                for m in task.metrics:
                    a = metrics[f"{m},none"]
                    d["ppl"].append(abs(a - ours["metrics"][m][0]) / abs(a))
    return d


def rows(budget: float = 1.0) -> list[Row]:
    specs = [("eval tokens (_encode_pair, rolling windows)", "tokens", "eval_tokens"),
             ("eval mc loglikelihood (context once, rel)", "ll", "eval_ll"),
             ("eval mc loglikelihood (lm-eval's path, rel)", "ll_per_choice", "eval_ll"),
             ("eval is_greedy", "greedy", "eval_metric"),
             ("eval acc / acc_norm", "acc", "eval_metric"),
             ("eval rolling loglikelihood (rel)", "rolling", "eval_rolling"),
             ("eval word/byte ppl, bits/byte (rel)", "ppl", "eval_ppl")]
    if not any(selected(c) for c, _, _ in specs):
        return []
    t0 = time.perf_counter()
    n = max(4, int(25 * budget))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()
        (tmp / "tasks").mkdir()
        d = compare(save_model(tmp / "model", 0), make_tasks(tmp / "tasks", 0, n))
    seconds = (time.perf_counter() - t0) / len(specs)
    out = []
    for check, key, tol_name in specs:
        worst = max(d[key], default=float("nan"))
        note = f"abs max {max(d['abs']):.1e}, both paths" if key == "ll" else ""
        out.append(Row(check, "lm-eval 0.4 hf", len(d[key]), worst, _tol(tol_name),
                       bool(d[key]) and worst <= _tol(tol_name), note, seconds))
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    table = rows()
    print(format_table(table))
    sys.exit(1 if any(r.verdict == "FAIL" for r in table) else 0)

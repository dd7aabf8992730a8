"""Evaluation: log-likelihoods, accuracy and bits per byte, scored exactly as lm-evaluation-harness 0.4 scores them.

What lm-eval does, and so what this file does (lm_eval/api/model.py, models/huggingface.py, api/task.py, utils.py):
- A multiple-choice item becomes one (context, target_delimiter + choice) pair per choice. `_encode_pair` moves
  the context's trailing spaces to the continuation, encodes context + continuation whole, and keeps the tokens
  after len(encode(context)) as the continuation. An empty context is the prefix token (BOS, else EOS).
- The model reads (context + continuation)[-(max_length + 1):][:-1]: too long, it loses tokens on the left.
- An item's log-likelihood is the sum of the continuation's log-probs; `is_greedy` says whether every
  continuation token was the argmax. acc is argmax(lls) == gold; acc_norm divides each ll by the choice's length
  in *characters* (0.4.13's process_results; acc_bytes divides by UTF-8 bytes); stderr = sample std / sqrt(n).
- A rolling document is cut into windows of max_length tokens (get_rolling_token_windows + make_disjoint_window,
  the first window conditioned on the prefix token); word/byte perplexity and bits per byte come from the summed
  log-likelihood over the document's word count (re.split(r"\\s+")) and UTF-8 byte count.

What is unusual here: lm-eval runs context + choice through the model once per choice. `score_choices` runs each
context once, keeps its keys/values in a KVCache, and scores all choices of a batch of items from that cache.

Tasks come from lm-eval task YAML (`read_task`), the subset a local task needs; see SUPPORTED_KEYS. Templates
support the `{{ field }}` form only (plain text around it); anything else in braces is refused by name.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml  # PyYAML: installed with tokenizers' and transformers' hub client
from tokenizers import Tokenizer

from minillm.generation import KVCache

SUPPORTED_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "test_split", "validation_split",
                  "training_split", "output_type", "doc_to_text", "doc_to_choice", "doc_to_target",
                  "target_delimiter", "fewshot_delimiter", "description", "num_fewshot", "metric_list", "metadata"}
METRICS = {"multiple_choice": ("acc", "acc_norm", "acc_bytes"),
           "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte")}
DEFAULT_METRICS = {"multiple_choice": ["acc", "acc_norm"],
                   "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"]}
FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class TaskError(ValueError):
    """A task file or its data outside what minillm reads: the message names the file, line and key."""


@dataclass
class Task:
    name: str
    path: Path
    output_type: str
    docs: list[dict]              # the split's rows, in file order
    doc_where: list[str]          # "data.jsonl:7" for each row
    templates: dict[str, Any]     # doc_to_text / doc_to_choice / doc_to_target as written
    lines: dict[str, int]         # the YAML line of each top-level key
    target_delimiter: str = " "
    description: str = ""
    metrics: list[str] = field(default_factory=list)

    def render(self, key: str, i: int) -> Any:
        """lm-eval's doc_to_*: an int as is, a field name -> the field, else a template rendered on the row."""
        t, doc = self.templates.get(key), self.docs[i]
        if t is None or isinstance(t, (int, list)):
            return t
        if t in doc:
            return doc[t]
        names = FIELD.findall(t)
        if "{%" in t or "{#" in t or len(FIELD.findall(t)) != t.count("{{"):
            raise TaskError(f"{self.path}:{self.lines[key]}: {key} uses Jinja beyond {{{{ field }}}} ({t!r}); "
                            "minillm reads plain text with {{ field }} substitutions only")
        for n in names:
            if n not in doc:
                raise TaskError(f"{self.path}:{self.lines[key]}: {key} refers to field '{n}', which "
                                f"{self.doc_where[i]} does not have (fields: {', '.join(doc) or 'none'})")
        if key == "doc_to_choice" and len(names) == 1 and FIELD.fullmatch(t.strip()):
            return doc[names[0]]  # lm-eval renders str(list) then literal_evals it: the same list
        text = FIELD.sub(lambda m: v if isinstance(v := doc[m.group(1)], str) else str(v), t)
        if key == "doc_to_choice":
            return ast.literal_eval(text)
        if key == "doc_to_target" and text.isdigit() and "doc_to_choice" in self.templates:
            return int(text)
        return text

    def item(self, i: int) -> tuple[str, list[str], int] | str:
        """(context, choices, gold) of a multiple-choice row; the text of a rolling row."""
        if self.output_type == "loglikelihood_rolling":
            return str(self.render("doc_to_target", i))
        text, choices, gold = (self.render(k, i) for k in ("doc_to_text", "doc_to_choice", "doc_to_target"))
        where = f"{self.doc_where[i]} (task {self.path})"
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"{where}: the choice list is {choices!r}; a multiple-choice item needs at least one "
                            "choice, each a string")
        if isinstance(gold, str):
            if gold not in choices:
                raise TaskError(f"{where}: the answer {gold!r} is not one of the choices {choices}")
            gold = choices.index(gold)
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise TaskError(f"{where}: the gold index {gold!r} is out of range for {len(choices)} choices")
        return self.description + str(text), choices, gold


class _Function(str):
    """lm-eval's `!function module.name` tag, read as its text so that the error can name it."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


def read_task(path: str | Path) -> Task:
    """Read an lm-eval task YAML and its local json/jsonl data (relative data paths: the working directory, as
    lm-eval, then the YAML's directory)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    node, cfg = yaml.compose(text), yaml.load(text, Loader=_Loader)
    if not isinstance(cfg, dict):
        raise TaskError(f"{path}: a task file is a YAML mapping (key: value lines)")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    where = lambda k: f"{path}:{lines.get(k, 1)}"
    for key, value in cfg.items():
        if isinstance(value, _Function):
            raise TaskError(f"{where(key)}: {key} is a !function ({value}): minillm runs no Python from task files")
        if key not in SUPPORTED_KEYS:
            raise TaskError(f"{where(key)}: key '{key}' is outside the lm-eval subset minillm reads "
                            f"(supported: {', '.join(sorted(SUPPORTED_KEYS))})")
    output_type = cfg.get("output_type", "generate_until")
    if output_type not in METRICS:
        raise TaskError(f"{where('output_type')}: output_type '{output_type}' is not supported "
                        f"(supported: {', '.join(METRICS)})")
    if cfg.get("dataset_path") != "json" or cfg.get("dataset_name") is not None:
        raise TaskError(f"{where('dataset_path')}: dataset_path must be 'json' (local files, with no dataset_name)")
    if cfg.get("num_fewshot", 0) != 0:
        raise TaskError(f"{where('num_fewshot')}: num_fewshot must be 0 (few-shot contexts are not supported)")
    kwargs = cfg.get("dataset_kwargs") or {}
    if set(kwargs) != {"data_files"}:
        raise TaskError(f"{where('dataset_kwargs')}: dataset_kwargs must hold data_files only, got {sorted(kwargs)}")
    files = kwargs["data_files"]
    split = cfg.get("test_split") or cfg.get("validation_split")
    files = files.get(split) if isinstance(files, dict) else files if split == "train" else None
    if files is None:
        raise TaskError(f"{where('dataset_kwargs')}: no data_files for split '{split}' (set test_split; data_files "
                        "given as a plain list is the split 'train', as in datasets)")
    docs, doc_where = [], []
    for f in [files] if isinstance(files, str) else files:
        p = Path(f) if Path(f).exists() or Path(f).is_absolute() else path.parent / f
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                docs.append(json.loads(line))
                doc_where.append(f"{p}:{n}")
    metrics = [m["metric"] if isinstance(m, dict) else m for m in cfg.get("metric_list") or []]
    for m in metrics:
        if m not in METRICS[output_type]:
            raise TaskError(f"{where('metric_list')}: metric '{m}' is not supported for {output_type} "
                            f"(supported: {', '.join(METRICS[output_type])})")
    templates = {k: cfg[k] for k in ("doc_to_text", "doc_to_choice", "doc_to_target") if k in cfg}
    return Task(name=str(cfg.get("task", path.stem)), path=path, output_type=output_type, docs=docs,
                doc_where=doc_where, templates=templates, lines=lines,
                target_delimiter=cfg.get("target_delimiter", " "), description=cfg.get("description") or "",
                metrics=metrics or DEFAULT_METRICS[output_type])


class Encoder:
    """lm-eval's tokenisation around a `tokenizers.Tokenizer`: tok_encode, _encode_pair, the empty context."""

    def __init__(self, tok, prefix_token_id: int, max_length: int):
        self.tok, self.prefix, self.max_length = tok, prefix_token_id, max_length
        self.prefix_text = tok.decode([prefix_token_id], skip_special_tokens=False)

    def encode(self, s: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None:  # text that already starts with the prefix token gets no second one
            add_special_tokens = not (self.prefix_text and s.startswith(self.prefix_text))
        return self.tok.encode(s, add_special_tokens=add_special_tokens).ids

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            return ([self.prefix], cont) if cont[:1] != [self.prefix] else (cont[:1], cont[1:])
        n = len(context) - len(context.rstrip())  # trailing spaces belong to the continuation's first word
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]  # the whole string encoded, split at the context's length

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """lm_eval.utils.get_rolling_token_windows(context_len=1) + make_disjoint_window."""
        tokens, L, out, done = self.encode(text), self.max_length, [], 0
        if tokens:
            first = min(L, len(tokens))
            out.append(([self.prefix], tokens[:first]))
            done = first
        while done < len(tokens):
            n = min(len(tokens) - done, L)
            end = done + n
            ctx = tokens[end - L - 1:end - 1]  # end > L here, so the slice starts at >= 0
            out.append((ctx[:len(ctx) - (n - 1)], tokens[end - n:end]))
            done = end
        return out


def encoder_for(tok_dir: str | Path, max_length: int) -> Encoder:
    """The Encoder of a saved model: tokenizer.json, and tokenizer_config.json's bos_token (else eos_token) as the
    prefix token, as HFLM.prefix_token_id picks it."""
    tok_dir = Path(tok_dir)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    names = [cfg.get("bos_token"), cfg.get("eos_token")]
    names = [n.get("content") if isinstance(n, dict) else n for n in names]
    ids = [tok.token_to_id(n) for n in names if n]
    if not any(i is not None for i in ids):
        raise ValueError(f"{cfg_path}: neither bos_token nor eos_token names a token of tokenizer.json: lm-eval "
                         "needs one as the prefix of an empty context and of the first rolling window")
    return Encoder(tok, next(i for i in ids if i is not None), max_length)


def _lls(logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """(sum of log-probs of `cont`, every token the argmax) from its (len(cont), V) logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(cont, device=logits.device)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


@torch.no_grad()
def score_rows(model, rows: list[tuple[list[int], list[int]]], max_length: int, batch_size: int = 16,
               progress: Callable[[int], None] = lambda n: None) -> list[tuple[float, bool]]:
    """lm-eval's _loglikelihood_tokens: each row read whole, left-truncated, right-padded (causal: pads unseen)."""
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]) - len(rows[i][1]), rows[i][0] + rows[i][1]))
    device = next(model.parameters()).device
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        inps = [(rows[i][0] + rows[i][1])[-(max_length + 1):][:-1] for i in idx]
        T = max(map(len, inps))
        x = torch.zeros(len(idx), T, dtype=torch.long, device=device)
        for r, inp in enumerate(inps):
            x[r, :len(inp)] = torch.tensor(inp)
        logits = model(x).logits  # (B, T, V)
        for r, i in enumerate(idx):
            cont, n = rows[i][1], len(inps[r])
            out[i] = _lls(logits[r, n - len(cont):n], cont)
        progress(len(idx))
    return out  # type: ignore[return-value]


@torch.no_grad()
def score_choices(model, items: list[tuple[list[int], list[list[int]]]], max_length: int, batch_size: int = 16,
                  progress: Callable[[int], None] = lambda n: None) -> list[list[tuple[float, bool]]]:
    """(ll, is_greedy) of every continuation of every (context, [continuations]) item, each context read once.

    A batch of contexts minus their last token goes through the model once into a KVCache (right-padded); the
    cache rows are copied once per choice; then each choice reads [last context token] + continuation[:-1] from
    its position on, a 2-D mask hiding the other contexts' padding. Items that need left truncation take
    lm-eval's path (score_rows): their truncated contexts differ per choice."""
    out: list[list | None] = [None] * len(items)
    fits = [i for i, (c, conts) in enumerate(items) if all(len(c) + len(k) <= max_length + 1 for k in conts)]
    rest = sorted(set(range(len(items))) - set(fits))
    flat = [(items[i][0], k) for i in rest for k in items[i][1]]
    scored = iter(score_rows(model, flat, max_length, batch_size))
    for i in rest:
        out[i] = [next(scored) for _ in items[i][1]]
        progress(1)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    fits.sort(key=lambda i: -len(items[i][0]))
    for b in range(0, len(fits), batch_size):
        idx = fits[b:b + batch_size]
        ctxs = [items[i][0] for i in idx]
        P = max(map(len, ctxs)) - 1  # cached context positions (all but each context's last token)
        owner = [r for r, i in enumerate(idx) for _ in items[i][1]]  # the context row of each choice row
        conts = [k for i in idx for k in items[i][1]]
        T = max(map(len, conts))
        cache = KVCache(model.config, len(idx), P, dtype, device)
        if P > 0:
            x = torch.zeros(len(idx), P, dtype=torch.long, device=device)
            for r, c in enumerate(ctxs):
                x[r, :len(c) - 1] = torch.tensor(c[:-1])
            model(x, cache=cache, logits_to_keep=1)  # (B, P) keys/values; no logits needed
        rows = KVCache(model.config, len(conts), P + T, dtype, device)
        owner_t = torch.tensor(owner, device=device)
        rows.k[:, :, :, :P], rows.v[:, :, :, :P] = cache.k[:, owner_t], cache.v[:, owner_t]
        rows.length = P
        x = torch.zeros(len(conts), T, dtype=torch.long, device=device)
        mask = torch.zeros(len(conts), P + T, dtype=torch.long, device=device)
        start = torch.tensor([len(ctxs[o]) - 1 for o in owner], device=device)
        for r, (o, k) in enumerate(zip(owner, conts)):
            x[r, :len(k)] = torch.tensor([ctxs[o][-1]] + k[:-1])
            mask[r, :len(ctxs[o]) - 1] = 1
            mask[r, P:] = 1
        positions = start[:, None] + torch.arange(T, device=device)  # (R, T): each row continues its context
        logits = model(x, attention_mask=mask, position_ids=positions, cache=rows).logits  # (R, T, V)
        res = [_lls(logits[r, :len(k)], k) for r, k in enumerate(conts)]
        n = 0
        for i in idx:
            out[i], n = res[n:n + len(items[i][1])], n + len(items[i][1])
        progress(len(idx))
    return out  # type: ignore[return-value]


def check_continuations(task: Task, i: int, context: str, choices: list[str], conts: list[list[int]],
                        max_length: int) -> None:
    """Refuse what lm-eval's HFLM asserts on (`assert len(continuation_enc) > 0` and `<= self.max_length` in
    lm_eval/models/huggingface.py): scored anyway, an empty continuation's log-likelihood would be 0, the highest."""
    for j, (choice, cont) in enumerate(zip(choices, conts)):
        where = f"{task.doc_where[i]} (task {task.path}), choice {j} {choice!r}"
        if not cont:
            raise TaskError(f"{where}: tokenizes to nothing after the context ...{context[-20:]!r}: the tokenizer "
                            "merges the end of the context with the choice, so encode(context + delimiter + choice) "
                            "is no longer than encode(context) (lm-eval's _encode_pair); lm-eval stops here too. "
                            "Separate them with a space (target_delimiter \" \", the default) or end the context "
                            "with punctuation the tokenizer keeps apart")
        if len(cont) > max_length:
            raise TaskError(f"{where}: is {len(cont)} tokens, longer than the model's {max_length}; lm-eval "
                            "refuses it too (it truncates contexts, never continuations)")


def mean_stderr(xs: list[float]) -> float:
    """lm-eval's mean_stderr: sample standard deviation / sqrt(n)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def mc_chance(task: Task, raw: list[tuple[str, list[str], int]] | None = None) -> float:
    """The accuracy of a uniform guess: the mean over items of 1 / (number of choices)."""
    raw = raw if raw is not None else [task.item(i) for i in range(len(task.docs))]
    return sum(1 / len(c) for _, c, _ in raw) / len(raw)


def evaluate_task(model, enc: Encoder, task: Task, batch_size: int = 16, use_cache: bool = True,
                  progress: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Score every item of `task`: {"metrics": {name: (value, stderr, chance)}, "items": [...per item...]}."""
    vocab = model.config.vocab_size
    if task.output_type == "multiple_choice":
        raw = [task.item(i) for i in range(len(task.docs))]
        pairs = [[enc.pair(ctx, task.target_delimiter + c) for c in choices] for ctx, choices, _ in raw]
        for i, ((ctx, choices, _), p) in enumerate(zip(raw, pairs)):
            check_continuations(task, i, ctx, choices, [cont for _, cont in p], enc.max_length)
        items = [(p[0][0], [cont for _, cont in p]) for p in pairs]
        if use_cache:
            scores = score_choices(model, items, enc.max_length, batch_size, progress)
        else:  # lm-eval's way: context + choice, once per choice
            flat = iter(score_rows(model, [pc for p in pairs for pc in p], enc.max_length, batch_size, progress))
            scores = [[next(flat) for _ in p] for p in pairs]
        per, log = {m: [] for m in METRICS["multiple_choice"]}, []
        for (ctx, choices, gold), s in zip(raw, scores):
            lls = np.array([ll for ll, _ in s])
            per["acc"].append(float(np.argmax(lls) == gold))
            per["acc_norm"].append(float(np.argmax(lls / np.array([float(len(c)) for c in choices])) == gold))
            per["acc_bytes"].append(float(np.argmax(lls / np.array([float(len(c.encode())) for c in choices])) == gold))
            log.append({"context": ctx, "choices": choices, "gold": gold, "loglikelihoods": lls.tolist(),
                        "is_greedy": [g for _, g in s]})
        chance = mc_chance(task, raw)
        metrics = {m: (sum(per[m]) / len(per[m]), mean_stderr(per[m]), chance) for m in task.metrics}
        return {"metrics": metrics, "items": log}
    texts = [task.item(i) for i in range(len(task.docs))]
    windows = [enc.rolling_windows(t) for t in texts]
    flat = iter(score_rows(model, [w for ws in windows for w in ws], enc.max_length, batch_size, progress))
    lls = [sum(next(flat)[0] for _ in ws) for ws in windows]
    words = [len(re.split(r"\s+", t)) for t in texts]
    nbytes = [len(t.encode("utf-8")) for t in texts]
    ntok = [sum(len(c) for _, c in ws) for ws in windows]
    ll, uniform = sum(lls), -sum(ntok) * math.log(vocab)  # a uniform model's log-likelihood: the chance level
    values = {"word_perplexity": lambda x: math.exp(-x / sum(words)),
              "byte_perplexity": lambda x: math.exp(-x / sum(nbytes)),
              "bits_per_byte": lambda x: -x / sum(nbytes) / math.log(2)}
    metrics = {m: (values[m](ll), float("nan"), values[m](uniform)) for m in task.metrics}
    log = [{"loglikelihood": a, "words": w, "bytes": b, "tokens": t} for a, w, b, t in zip(lls, words, nbytes, ntok)]
    return {"metrics": metrics, "items": log}

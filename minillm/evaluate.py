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

What is unusual here: lm-eval runs context + choice through the model once per choice. `score_choices` reads each
context once: an item is one row, its context followed by all its choices side by side, a mask letting each choice
see only the context and itself (a tree of continuations), so a batch of items is one forward pass.

Bits per byte during training (train/trainer.py) is nanochat's: `HeldOutBits` sums the nats of the target tokens
and their UTF-8 bytes (`token_bytes`), special tokens out of both; on a document read as one rolling window it is
the number this file's loglikelihood_rolling gives.

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

    def encode_many(self, strings: list[str]) -> list[list[int]]:
        """`encode` of every string. One call per string: the tokenizer's batch call (encode_batch_fast, Rust
        threads) measured no faster here in steady state, and up to 10x slower on a CPU busy with other work."""
        return [self.encode(s) for s in strings]

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self.pairs([(context, continuation)])[0]

    def pairs(self, requests: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """lm-eval's loglikelihood tokenisation of (context, continuation) pairs: (context ids, continuation ids)."""
        out: list[tuple[list[int], list[int]] | None] = [None] * len(requests)
        split = []  # (request index, context, context + continuation)
        for i, (context, continuation) in enumerate(requests):
            if context == "":
                cont = self.encode(continuation, add_special_tokens=False)
                out[i] = ([self.prefix], cont) if cont[:1] != [self.prefix] else (cont[:1], cont[1:])
                continue
            n = len(context) - len(context.rstrip())  # trailing spaces belong to the continuation's first word
            if n:
                context, continuation = context[:-n], context[-n:] + continuation
            split.append((i, context, context + continuation))
        contexts = list(dict.fromkeys(c for _, c, _ in split))  # a question's choices share its context
        ctx_ids = dict(zip(contexts, self.encode_many(contexts)))
        for (i, context, _), whole in zip(split, self.encode_many([w for _, _, w in split])):
            ctx = ctx_ids[context]
            out[i] = (ctx, whole[len(ctx):])  # the whole string encoded, split at the context's length
        return out  # type: ignore[return-value]

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


def token_bytes(tok: Tokenizer) -> list[int]:
    """The UTF-8 bytes each token id stands for, 0 for special tokens: bits per byte as nanochat counts it (total
    nats over the total bytes of the target tokens, special tokens excluded from both). Byte-level BPE: each
    character of a token's string is one byte (GPT-2's byte alphabet), exact even for a token that holds part of a
    character; other tokenizers: the length of the token's decoded text."""
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    added = {t.content for t in tok.get_added_tokens_decoder().values()}  # stored as written, not byte-encoded
    byte_level = json.loads(tok.to_str()).get("decoder", {}).get("type") == "ByteLevel"
    out = []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        s = tok.id_to_token(i)
        if s is None or s in specials:
            out.append(0)
        elif byte_level and s not in added:
            out.append(len(s))
        else:
            out.append(len(tok.decode([i], skip_special_tokens=False).encode("utf-8")))
    return out


class HeldOutBits:
    """Totals of a training run's evaluation, batch by batch, for bits per byte as nanochat defines it: the nats of
    every target token over its UTF-8 bytes (`token_bytes`), special tokens and ignored labels (-100) out of both."""

    def __init__(self, token_bytes: list[int]):
        self.bytes_of = torch.tensor(token_bytes, dtype=torch.long)
        self.nats, self.bytes, self.tokens = 0.0, 0, 0

    def per_row(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, 3) float64: nats, bytes and counted tokens of each row of one batch, its (B, T', V) logits and (B, T)
        labels read as transformers' causal-LM loss reads them (per row: a caller can drop repeated rows)."""
        T = labels.shape[1]
        logits, labels = logits[:, -T:][:, :-1], labels[:, 1:]  # position t predicts label t+1; virtual tokens of
        # prompt learning come first in the logits, so the last T positions are the labelled ones
        if len(self.bytes_of) < logits.shape[-1]:  # a vocabulary padded beyond the tokenizer's: no bytes there
            self.bytes_of = torch.cat([self.bytes_of, self.bytes_of.new_zeros(logits.shape[-1] - len(self.bytes_of))])
        nbytes = torch.where(labels == -100, 0, self.bytes_of.to(labels.device)[labels.clamp(min=0)])  # (B, T-1)
        keep = nbytes > 0
        nats = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
        out = torch.zeros(labels.shape[0], 3, dtype=torch.float64, device=labels.device)
        out[:, 0].index_add_(0, keep.nonzero()[:, 0], nats.double())
        out[:, 1], out[:, 2] = nbytes.sum(1), keep.sum(1)
        return out

    def add(self, rows: torch.Tensor) -> None:
        nats, nbytes, tokens = rows.sum(0).tolist()
        self.nats, self.bytes, self.tokens = self.nats + nats, self.bytes + int(nbytes), self.tokens + int(tokens)

    def bpb(self) -> float:
        return self.nats / self.bytes / math.log(2) if self.bytes else float("nan")


def _padded(rows: list[list[int]], width: int, device) -> torch.Tensor:
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _score(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> list[tuple[float, bool]]:
    """Per row of (R, T, V) logits: (sum of the log-probs of `targets` where `scored`, every scored target the
    argmax), as lm-eval's _loglikelihood_tokens computes them (log_softmax in fp32 per position, gather, sum), for
    the whole batch at once: only the scored positions go through log_softmax."""
    row = scored.nonzero()[:, 0]  # (N,) the row of each scored position, row-major: each row's in order
    target = targets[scored]
    logp = torch.log_softmax(logits[scored].float(), dim=-1)  # (N, V)
    token = logp.gather(-1, target[:, None])[:, 0]
    miss = (logp.argmax(-1) != target).long()
    R = logits.shape[0]
    ll = torch.zeros(R, dtype=token.dtype, device=token.device).index_add_(0, row, token)  # sums in row order
    missed = torch.zeros(R, dtype=torch.long, device=token.device).index_add_(0, row, miss)
    return list(zip(ll.tolist(), (missed == 0).tolist()))


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
        # the continuation's tokens are the last len(cont) targets of each input (the logits at n-k .. n-1)
        targets = [[0] * (len(inp) - len(rows[i][1])) + rows[i][1] for inp, i in zip(inps, idx)]
        scored = [[0] * (len(inp) - len(rows[i][1])) + [1] * len(rows[i][1]) for inp, i in zip(inps, idx)]
        logits = model(_padded(inps, T, device)).logits  # (B, T, V)
        res = _score(logits, _padded(targets, T, device), _padded(scored, T, device).bool())
        for i, r in zip(idx, res):
            out[i] = r
        progress(len(idx))
    return out  # type: ignore[return-value]


def _tree_mask(seg: torch.Tensor, dtype: torch.dtype, eager: bool) -> torch.Tensor:
    """(B, 1, T, T) mask of rows laid out as [padding][context][choice 1][choice 2]...: `seg` (B, T) is -1 on padding,
    0 on the context, j on choice j. A token sees the tokens before it that are context or of its own choice, so
    every choice reads the context as if it followed it alone; padding sees only itself (a fully masked query row
    would make SDPA return NaN, which the next layer's keys would carry)."""
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    q, k = seg[:, :, None], seg[:, None, :]  # (B, T, 1) queries, (B, 1, T) keys
    mask = causal & (k >= 0) & ((k == 0) | (k == q)) | torch.eye(T, dtype=torch.bool, device=seg.device)
    mask = mask[:, None]
    return torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype) if eager else mask


@torch.no_grad()
def score_choices(model, items: list[tuple[list[int], list[list[int]]]], max_length: int, batch_size: int = 16,
                  progress: Callable[[int], None] = lambda n: None) -> list[list[tuple[float, bool]]]:
    """(ll, is_greedy) of every continuation of every (context, [continuations]) item, each context read once.

    lm-eval reads context + choice once per choice. Here an item is one row: its context, then each choice's
    tokens but the last, side by side, with a mask (`_tree_mask`) that lets every choice see the context and its own
    earlier tokens only, and position ids that continue the context for each choice. The logits at the context's
    last token give every choice's first token; a one-token choice adds nothing to the row. Rows are left-padded,
    so only the last positions (the choices') go through the LM head (logits_to_keep), and log_softmax runs once per
    scored position. Items that need left truncation take lm-eval's path (score_rows): their truncated contexts
    differ per choice."""
    out: list[list | None] = [None] * len(items)
    fits = [i for i, (c, conts) in enumerate(items) if all(len(c) + len(k) <= max_length + 1 for k in conts)]
    rest = sorted(set(range(len(items))) - set(fits))
    flat = [(items[i][0], k) for i in rest for k in items[i][1]]
    scored = iter(score_rows(model, flat, max_length, batch_size))
    for i in rest:
        out[i] = [next(scored) for _ in items[i][1]]
        progress(1)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    # a choice written twice is scored once: lm-eval gives both the same number (one request, one logits row), so
    # argmax picks the first, which differing last bits from two places in a row could turn round
    uniq = {i: [list(k) for k in dict.fromkeys(map(tuple, items[i][1]))] for i in fits}
    tail = lambda i: sum(len(k) - 1 for k in uniq[i])  # choice tokens after the context  # noqa: E731
    fits.sort(key=lambda i: -(len(items[i][0]) + tail(i)))  # similar row lengths batched: little padding
    for b in range(0, len(fits), batch_size):
        idx = fits[b:b + batch_size]
        n = [len(items[i][0]) + tail(i) for i in idx]  # each row's tokens
        T, K = max(n), max(tail(i) for i in idx) + 1  # row length; positions that need logits (the last K)
        ids, seg, pos = [], [], []
        for i, n_i in zip(idx, n):
            ctx, conts = items[i][0], uniq[i]
            ids.append([0] * (T - n_i) + ctx + [t for k in conts for t in k[:-1]])
            seg.append([-1] * (T - n_i) + [0] * len(ctx) + [j + 1 for j, k in enumerate(conts) for _ in k[:-1]])
            pos.append([0] * (T - n_i) + list(range(len(ctx))) + [len(ctx) + t for k in conts for t in range(len(k) - 1)])
        seg_t = torch.tensor(seg, device=device)
        mask = _tree_mask(seg_t, dtype, model.attn_implementation == "eager")
        logits = model(torch.tensor(ids, device=device), attention_mask=mask,
                       position_ids=torch.tensor(pos, device=device), logits_to_keep=K).logits  # (B, K, V)
        # the scored positions: each row's context end and its choice tokens, its last tail(i) + 1 positions
        needed = [[0] * (K - tail(i) - 1) + [1] * (tail(i) + 1) for i in idx]
        logp = torch.log_softmax(logits[torch.tensor(needed, device=device).bool()].float(), dim=-1)  # (N, V)
        at, target, choice = [], [], []  # (row of logp, its target, the choice's number in the batch)
        row0, c = 0, 0
        for i in idx:
            ctx_end, start = row0, row0 + 1  # logp rows: the context's last token, then the choices' tokens
            for k in uniq[i]:
                at += [ctx_end, *range(start, start + len(k) - 1)]
                target += k
                choice += [c] * len(k)
                start, c = start + len(k) - 1, c + 1
            row0 = start
        at_t, target_t, choice_t = (torch.tensor(x, device=device) for x in (at, target, choice))
        token = logp[at_t, target_t]  # (M,) each choice token's log-prob
        miss = (logp.argmax(-1)[at_t] != target_t).long()
        ll = torch.zeros(c, dtype=token.dtype, device=device).index_add_(0, choice_t, token)  # in token order
        missed = torch.zeros(c, dtype=torch.long, device=device).index_add_(0, choice_t, miss)
        res = list(zip(ll.tolist(), (missed == 0).tolist()))
        c = 0
        for i in idx:
            scores = dict(zip(map(tuple, uniq[i]), res[c:c + len(uniq[i])]))
            out[i], c = [scores[tuple(k)] for k in items[i][1]], c + len(uniq[i])
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


def evaluate_task(model, enc: Encoder, task: Task, batch_size: int = 16, context_once: bool = True,
                  progress: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Score every item of `task`: {"metrics": {name: (value, stderr, chance)}, "items": [...per item...]}."""
    vocab = model.config.vocab_size
    if task.output_type == "multiple_choice":
        raw = [task.item(i) for i in range(len(task.docs))]
        flat_pairs = iter(enc.pairs([(ctx, task.target_delimiter + c) for ctx, choices, _ in raw for c in choices]))
        pairs = [[next(flat_pairs) for _ in choices] for _, choices, _ in raw]
        for i, ((ctx, choices, _), p) in enumerate(zip(raw, pairs)):
            check_continuations(task, i, ctx, choices, [cont for _, cont in p], enc.max_length)
        items = [(p[0][0], [cont for _, cont in p]) for p in pairs]
        if context_once:
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

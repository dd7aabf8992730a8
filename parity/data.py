"""Data parity: minillm's chunker and SFT masker vs transformers, plus the course's code for benchmarks.

Rows (`rows(budget)`):
- `group_texts` (eos_token_id=None) vs transformers' run_clm example `group_texts`, on random batches
  of tokenized documents with random block sizes and extra columns;
- `group_texts(eos_token_id=e)` vs the same reference run on documents with `e` appended by hand;
- `mask_batch` vs `tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True,
  return_dict=True)` under the ChatML template with `{% generation %}` markers, on the bundled
  tokenizer and on two tokenizers built here: a GPT-2 style byte-level BPE (GPT-2's regex, offsets
  trimmed, pad == eos) and a SentencePiece-style Metaspace BPE. The reference's ids are cut at
  max_len; a sample whose cut mask is all zero must be dropped by minillm.

The reference implementations used by `make bench` (and `python -m parity.data --bench`):
`run_clm_group_texts`, `course_group_texts` and `course_preprocess` (the course's chapter-6 SFT loop).
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import chain
from typing import Any, Iterator

import numpy as np
import torch
import transformers
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from minillm.chunk import Chunker, group_texts
from minillm.corpus import SAMPLE_PRETRAIN, SAMPLE_SFT, TOKENIZER_DIR, iter_pretrain_texts, iter_sft_conversations
from minillm.sft import DEFAULT_SYSTEM_PROMPT, IM_END, IM_START, ROLES, mask_batch
from minillm.train_tokenizer import CHAT_TEMPLATE
from parity.harness import Row, property_check

transformers.logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------
# Reference implementations
# ---------------------------------------------------------------------------------------------

def run_clm_group_texts(examples: dict[str, list], block_size: int) -> dict[str, list]:
    """transformers' `group_texts`, from examples/pytorch/language-modeling/run_clm.py
    (huggingface/transformers, commit 00d481d18f914b55e65faa31e82321629691eadb, Apache-2.0),
    restated line for line: concatenate every column, drop the remainder (a batch shorter than
    block_size gives no block), slice into blocks, labels = a copy of input_ids."""
    concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
              for k, t in concatenated_examples.items()}
    result["labels"] = result["input_ids"].copy()
    return result


def course_group_texts(examples: dict[str, list], block_size: int) -> dict[str, list]:
    """The course's chapter-6 `group_texts` ("3.1.3 预训练数据处理"): as run_clm, except that a batch
    shorter than block_size is kept as one short block."""
    concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    if total_length >= block_size:
        total_length = (total_length // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
              for k, t in concatenated_examples.items()}
    result["labels"] = result["input_ids"].copy()
    return result


def course_preprocess(sources: list[list[dict]], tokenizer: Any, max_len: int,
                      system_message: str = DEFAULT_SYSTEM_PROMPT) -> dict[str, torch.Tensor]:
    """The course's chapter-6 SFT `preprocess` ("3.2.2 微调数据处理"), faithfully: per sample, per turn,
    one tokenizer call per piece; pad id as ignore label; user/system markers left unmasked."""
    roles = {"human": "<|im_start|>human", "assistant": "<|im_start|>assistant"}
    im_start = tokenizer("<|im_start|>").input_ids
    im_end = tokenizer("<|im_end|>").input_ids
    IGNORE_TOKEN_ID = tokenizer.pad_token_id
    nl_tokens = tokenizer("\n").input_ids
    _system = tokenizer("system").input_ids + nl_tokens
    input_ids, targets = [], []
    for i in range(len(sources)):
        source = sources[i]
        if source[0]["from"] != "human":
            source = source[1:]
        input_id, target = [], []
        system = im_start + _system + tokenizer(system_message).input_ids + im_end + nl_tokens
        input_id += system
        target += im_start + [IGNORE_TOKEN_ID] * (len(system) - 3) + im_end + nl_tokens
        assert len(input_id) == len(target)
        for j, sentence in enumerate(source):
            role = roles[sentence["from"]]
            _input_id = tokenizer(role).input_ids + nl_tokens + tokenizer(sentence["value"]).input_ids + im_end + nl_tokens
            input_id += _input_id
            if role == "<|im_start|>human":
                _target = im_start + [IGNORE_TOKEN_ID] * (len(_input_id) - 3) + im_end + nl_tokens
            elif role == "<|im_start|>assistant":
                _target = (im_start + [IGNORE_TOKEN_ID] * len(tokenizer(role).input_ids)
                           + _input_id[len(tokenizer(role).input_ids) + 1 : -2] + im_end + nl_tokens)
            else:
                raise NotImplementedError(role)
            target += _target
        assert len(input_id) == len(target)
        input_id += [tokenizer.pad_token_id] * (max_len - len(input_id))
        target += [IGNORE_TOKEN_ID] * (max_len - len(target))
        input_ids.append(input_id[:max_len])
        targets.append(target[:max_len])
    input_ids = torch.tensor(input_ids)
    targets = torch.tensor(targets)
    return dict(input_ids=input_ids, labels=targets, attention_mask=input_ids.ne(tokenizer.pad_token_id))


# ---------------------------------------------------------------------------------------------
# Tokenizers: the bundled one, and two built here
# ---------------------------------------------------------------------------------------------

_TOKENIZERS: dict[str, Any] = {}


def _training_text(n: int = 400) -> list[str]:
    texts = [t for _, t in zip(range(n), iter_pretrain_texts(SAMPLE_PRETRAIN))]
    for conv in (c for _, c in zip(range(n), iter_sft_conversations(SAMPLE_SFT))):
        texts += [f"{ROLES[t['from']]}\n{t['value']}" for t in conv]
    return texts + ["system\nYou are a helpful assistant."]


def _wrap(tok: Tokenizer, eos: str, pad: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                   extra_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE)


def tokenizer(name: str) -> Any:
    """'bundled', 'gpt2_bpe' (GPT-2 regex byte-level BPE, trimmed offsets, pad == eos) or 'metaspace_bpe'."""
    if name in _TOKENIZERS:
        return _TOKENIZERS[name]
    if name == "bundled":
        tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    elif name == "gpt2_bpe":
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        t.decoder = decoders.ByteLevel()
        t.post_processor = processors.ByteLevel(trim_offsets=True)
        t.train_from_iterator(_training_text(), trainers.BpeTrainer(
            vocab_size=700, special_tokens=["<|endoftext|>", IM_START, IM_END],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        tok = _wrap(t, eos="<|endoftext|>", pad="<|endoftext|>")
    elif name == "metaspace_bpe":
        t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        ])
        t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        t.train_from_iterator(_training_text(), trainers.BpeTrainer(
            vocab_size=900, special_tokens=["<unk>", "</s>", IM_START, IM_END, "<pad>"], show_progress=False))
        tok = _wrap(t, eos="</s>", pad="<pad>")
    else:
        raise KeyError(name)
    _TOKENIZERS[name] = tok
    return tok


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

# ASCII, Chinese, digits, punctuation and the whitespace that tests token boundaries (newlines,
# runs of spaces, tabs) — and no literal ChatML markers.
CHARS = list("abcxyz ABC  你好世界中文。,!?.:-'0123456789\n\n\t é")


@st.composite
def token_batches(draw, max_docs: int = 12, max_len: int = 40) -> dict:
    """A `datasets.map` batch of tokenized documents: input_ids, attention_mask and an extra column."""
    lengths = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_docs))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, 5000, n).tolist() for n in lengths]
    batch = {"input_ids": ids, "attention_mask": [[1] * n for n in lengths]}
    if draw(st.booleans()):
        batch["token_type_ids"] = [rng.integers(0, 2, n).tolist() for n in lengths]
    return {"batch": batch, "block_size": draw(st.integers(1, 64)), "eos": draw(st.integers(0, 5000))}


@st.composite
def conversations(draw, max_turns: int = 6) -> list[dict]:
    """BelleGroup or OpenAI style turns; sometimes a system turn first, sometimes a leading assistant turn."""
    text = st.text(alphabet=st.sampled_from(CHARS), max_size=25)
    n = draw(st.integers(0, max_turns))
    roles = ["human" if i % 2 == 0 else "assistant" for i in range(n)]
    if n and draw(st.integers(0, 4)) == 0:
        roles = ["assistant", *roles]
    if draw(st.integers(0, 3)) == 0:
        roles = ["system", *roles]
    openai = draw(st.booleans())
    turns = []
    for role in roles:
        content = draw(text)
        turns.append({"role": ROLES[role], "content": content} if openai else {"from": role, "value": content})
    return turns


@st.composite
def sft_cases(draw, names: tuple[str, ...]) -> dict:
    return {"tokenizer": draw(st.sampled_from(names)), "conversations": draw(st.lists(conversations(), min_size=1, max_size=4)),
            "max_len": draw(st.integers(8, 160))}


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def _blocks_delta(got: dict, want: dict) -> float:
    """0 if every column has identical blocks, else the number of differing cells (inf on a shape mismatch)."""
    if set(got) != set(want):
        return float("inf")
    worst = 0.0
    for k in want:
        a, b = np.asarray(got[k], dtype=np.int64), np.asarray(want[k], dtype=np.int64).reshape(-1, got[k].shape[1])
        if a.shape != b.shape:
            return float("inf")
        worst = max(worst, float(np.abs(a - b).max(initial=0)))
    return worst


def measure_group_texts(case: dict) -> float:
    return _blocks_delta(group_texts(case["batch"], case["block_size"]),
                         run_clm_group_texts(case["batch"], case["block_size"]))


def measure_group_texts_eos(case: dict) -> float:
    batch, eos = case["batch"], case["eos"]
    by_hand = {k: [d + [eos if k == "input_ids" else 1 if k == "attention_mask" else 0] for d in docs]
               for k, docs in batch.items()}
    return _blocks_delta(group_texts(batch, case["block_size"], eos_token_id=eos),
                         run_clm_group_texts(by_hand, case["block_size"]))


def reference_messages(turns: list[dict]) -> list[dict]:
    """OpenAI messages as the course treats the conversation: human -> user, a leading non-user turn
    (after the optional system turn) dropped. The template adds the default system turn."""
    msgs = [{"role": ROLES[t.get("from", t.get("role"))], "content": t.get("value", t.get("content"))} for t in turns]
    head = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
    rest = msgs[len(head):]
    if rest and rest[0]["role"] != "user":
        rest = rest[1:]
    return head + rest


def measure_sft(case: dict) -> float:
    """Number of mismatched ids/labels (or kept/dropped mismatches) between minillm and the template."""
    tok, max_len = tokenizer(case["tokenizer"]), case["max_len"]
    got = mask_batch(case["conversations"], tok, max_len)
    want_ids, want_labels = [], []
    for turns in case["conversations"]:
        msgs = reference_messages(turns)
        if not msgs:  # transformers refuses an empty conversation; minillm must drop it (no labels)
            continue
        ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, mask = ref["input_ids"][:max_len], ref["assistant_masks"][:max_len]
        if any(mask):  # an all-masked sample must be dropped
            want_ids.append(ids)
            want_labels.append([i if m else -100 for i, m in zip(ids, mask)])
    if len(got["input_ids"]) != len(want_ids):
        return float("inf")
    bad = 0
    for a, b, la, lb, am in zip(got["input_ids"], want_ids, got["labels"], want_labels, got["attention_mask"]):
        if len(a) != len(b) or len(la) != len(lb) or am != [1] * len(b):
            return float("inf")
        bad += sum(x != y for x, y in zip(a, b)) + sum(x != y for x, y in zip(la, lb))
    return float(bad)


def chunk_rows(budget: float = 1.0) -> Iterator[Row]:
    n = max(1, int(200 * budget))
    yield property_check("chunk: group_texts == run_clm group_texts", "transformers run_clm.py", "chunk",
                         token_batches(), measure_group_texts, n)
    yield property_check("chunk: group_texts(eos) == run_clm(docs+eos)", "transformers run_clm.py", "chunk",
                         token_batches(), measure_group_texts_eos, n)


def sft_rows(budget: float = 1.0) -> Iterator[Row]:
    n = max(1, int(60 * budget))
    yield property_check("sft: mask == apply_chat_template, bundled", "apply_chat_template+generation", "sft_mask",
                         sft_cases(("bundled",)), measure_sft, n)
    yield property_check("sft: mask == apply_chat_template, built", "apply_chat_template+generation", "sft_mask",
                         sft_cases(("gpt2_bpe", "metaspace_bpe")), measure_sft, n)


def rows(budget: float = 1.0) -> Iterator[Row]:
    yield from chunk_rows(budget)
    yield from sft_rows(budget)


# ---------------------------------------------------------------------------------------------
# Throughput (make bench): minillm vs the course's code, on the bundled samples
# ---------------------------------------------------------------------------------------------

def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(block_size: int = 512, map_batch: int = 1000, max_len: int = 512, repeat: int = 3) -> dict[str, float]:
    """Throughput on the bundled samples, best of `repeat`, one process: chunkers in tokens/s (the
    function alone on Python lists, and end to end through `datasets.map`, where the Arrow <-> Python
    conversions dominate), maskers in conversations/s (the course's loop vs `mask_batch`)."""
    import datasets

    datasets.disable_progress_bars()
    tok = tokenizer("bundled")
    docs = tok(list(iter_pretrain_texts(SAMPLE_PRETRAIN)))
    columns = {"input_ids": docs["input_ids"], "attention_mask": docs["attention_mask"]}
    n_tokens = sum(map(len, columns["input_ids"]))
    batches = [{k: v[i : i + map_batch] for k, v in columns.items()} for i in range(0, len(columns["input_ids"]), map_batch)]
    out: dict[str, float] = {"tokens": n_tokens}
    tok_s = lambda fn: n_tokens / _best(fn, repeat)
    out["chunk_fn_run_clm_tok_s"] = tok_s(lambda: [run_clm_group_texts(b, block_size) for b in batches])
    out["chunk_fn_course_tok_s"] = tok_s(lambda: [course_group_texts(b, block_size) for b in batches])
    out["chunk_fn_minillm_tok_s"] = tok_s(lambda: [group_texts(b, block_size, tok.eos_token_id) for b in batches])
    out["chunk_fn_minillm_streaming_tok_s"] = tok_s(lambda: list(Chunker(block_size, tok.eos_token_id).blocks(batches)))

    ds = datasets.Dataset.from_dict(columns)
    kw = dict(batched=True, batch_size=map_batch, load_from_cache_file=False)
    out["chunk_map_run_clm_tok_s"] = tok_s(lambda: ds.map(run_clm_group_texts, fn_kwargs={"block_size": block_size}, **kw))
    out["chunk_map_minillm_tok_s"] = tok_s(lambda: ds.map(
        group_texts, fn_kwargs={"block_size": block_size, "eos_token_id": tok.eos_token_id}, **kw))
    out["chunk_map_minillm_arrow_tok_s"] = tok_s(lambda: ds.with_format("arrow").map(
        group_texts, fn_kwargs={"block_size": block_size, "eos_token_id": tok.eos_token_id}, **kw))
    out["chunk_map_minillm_arrow_streaming_tok_s"] = tok_s(lambda: ds.with_format("arrow").map(
        Chunker(block_size, tok.eos_token_id, total_rows=len(ds)), with_indices=True, **kw))

    convs = list(iter_sft_conversations(SAMPLE_SFT))
    out["conversations"] = len(convs)
    out["sft_course_conv_s"] = len(convs) / _best(lambda: course_preprocess(convs, tok, max_len), repeat)
    out["sft_minillm_conv_s"] = len(convs) / _best(
        lambda: [mask_batch(convs[i : i + map_batch], tok, max_len) for i in range(0, len(convs), map_batch)], repeat)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="data throughput: minillm vs the course's code")
    ap.add_argument("--bench", action="store_true", help="(the only mode) print throughput as JSON")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    print(json.dumps({k: round(v) for k, v in bench(repeat=args.repeat).items()}, indent=2))


if __name__ == "__main__":
    main()

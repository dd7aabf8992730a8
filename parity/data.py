"""Data parity: minillm's chunker and SFT masker vs transformers (run_clm's group_texts, apply_chat_template).

Rows (`rows(budget)`):
- `group_texts` (eos_token_id=None) vs transformers' run_clm example `group_texts`, on random batches
  of tokenized documents with random block sizes and extra columns;
- `group_texts(eos_token_id=e)` vs the same reference run on documents with `e` appended by hand;
- `mask_batch` vs `tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True,
  return_dict=True)` under the ChatML template with `{% generation %}` markers, on the bundled
  tokenizer and on two tokenizers built here: a GPT-2 style byte-level BPE (GPT-2's regex, offsets
  trimmed, pad == eos) and a SentencePiece-style Metaspace BPE. The reference's ids are cut at
  max_len; a sample whose cut mask is all zero must be dropped by minillm.

The reference code itself (run_clm's and the course's, as written) is in parity/course.py.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import transformers
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from minillm.chunk import group_texts
from minillm.infra.corpus import SAMPLE_PRETRAIN, SAMPLE_SFT, TOKENIZER_DIR, iter_pretrain_texts, iter_sft_conversations
from minillm.sft import IM_END, IM_START, ROLES, mask_batch
from minillm.data.train_tokenizer import CHAT_TEMPLATE
from parity.course import run_clm_group_texts
from parity.harness import Row, property_check

transformers.logging.set_verbosity_error()


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

"""The chunker: properties on random documents and block sizes, parity with run_clm, datasets.map use."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.chunk import IGNORE_INDEX, Chunker, group_texts
from parity.course import run_clm_group_texts
from parity.data import chunk_rows

SETTINGS = settings(max_examples=60, deadline=None, database=None)


@st.composite
def corpora(draw, max_docs: int = 30, max_len: int = 50) -> dict:
    """Documents of random token ids (some empty), a block size, an eos id, and a split into batches."""
    docs = draw(st.lists(st.lists(st.integers(0, 999), max_size=max_len), min_size=1, max_size=max_docs))
    cuts = sorted(draw(st.lists(st.integers(0, len(docs)), max_size=5)))
    bounds = [0, *cuts, len(docs)]
    return {"docs": docs, "block_size": draw(st.integers(1, 70)), "eos": draw(st.sampled_from([None, 1000])),
            "batches": [(a, b) for a, b in zip(bounds, bounds[1:])]}


def batch_of(docs: list[list[int]]) -> dict:
    return {"input_ids": docs, "attention_mask": [[1] * len(d) for d in docs], "special": [[0] * len(d) for d in docs]}


def expected_stream(docs: list[list[int]], eos: int | None) -> list[int]:
    return [t for d in docs for t in (d + ([eos] if eos is not None else []))]


def check_blocks(out: dict, block_size: int) -> None:
    assert set(out) == {"input_ids", "attention_mask", "special", "labels"}
    for k, v in out.items():
        assert v.ndim == 2 and v.shape[1] == block_size, (k, v.shape)  # every block exactly block_size
        assert v.shape[0] == out["input_ids"].shape[0]
    np.testing.assert_array_equal(out["labels"], out["input_ids"])


@SETTINGS
@given(corpora())
def test_group_texts_blocks_are_the_stream_minus_the_tail(c):
    out = group_texts(batch_of(c["docs"]), c["block_size"], eos_token_id=c["eos"])
    check_blocks(out, c["block_size"])
    stream = expected_stream(c["docs"], c["eos"])
    keep = len(stream) // c["block_size"] * c["block_size"]
    # concatenated blocks == concatenated documents (with separators), in order, minus only the tail
    assert out["input_ids"].reshape(-1).tolist() == stream[:keep]
    mask = [m for d in c["docs"] for m in [1] * len(d) + ([1] if c["eos"] is not None else [])]
    assert out["attention_mask"].reshape(-1).tolist() == mask[:keep]
    assert not out["special"].any()


@SETTINGS
@given(corpora())
def test_streaming_in_k_batches_equals_one_batch(c):
    docs, bs, eos = c["docs"], c["block_size"], c["eos"]
    one = group_texts(batch_of(docs), bs, eos_token_id=eos)
    chunker = Chunker(bs, eos_token_id=eos)
    parts = list(chunker.blocks(batch_of(docs[a:b]) for a, b in c["batches"]))
    for p in parts:
        check_blocks(p, bs)
    got = np.concatenate([p["input_ids"] for p in parts]) if parts else np.zeros((0, bs), np.int64)
    np.testing.assert_array_equal(got, one["input_ids"])
    stream = expected_stream(docs, eos)
    assert chunker.tokens_in == len(stream)
    assert chunker.tokens_dropped == len(stream) % bs  # only the final tail is lost


@SETTINGS
@given(corpora())
def test_pad_tail_keeps_every_token(c):
    docs, bs, eos = c["docs"], c["block_size"], c["eos"]
    chunker = Chunker(bs, eos_token_id=eos, tail="pad", pad_token_id=7)
    parts = list(chunker.blocks(batch_of(docs[a:b]) for a, b in c["batches"]))
    stream = expected_stream(docs, eos)
    if not stream:
        assert parts == []
        return
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert out["input_ids"].shape[1] == bs and out["labels"].shape == out["input_ids"].shape
    n_pad = out["input_ids"].size - len(stream)
    assert 0 <= n_pad < bs
    flat = {k: v.reshape(-1) for k, v in out.items()}
    assert flat["input_ids"][: len(stream)].tolist() == stream
    assert (flat["input_ids"][len(stream):] == 7).all()
    assert (flat["labels"][len(stream):] == IGNORE_INDEX).all()  # padding is never a target
    assert (flat["attention_mask"][len(stream):] == 0).all()
    np.testing.assert_array_equal(flat["labels"][: len(stream)], flat["input_ids"][: len(stream)])


def test_chunker_parity_rows_pass():
    for row in chunk_rows(budget=0.25):
        assert row.passed, f"{row.check}: {row.note}"


def test_course_drops_every_batch_tail_but_chunker_does_not():
    """The known run_clm/course loss: with map batches, each batch's remainder is dropped."""
    docs = [[i] * 7 for i in range(10)]  # 70 tokens, batches of 3 docs = 21 tokens
    batches = [batch_of(docs[i : i + 3]) for i in range(0, 10, 3)]
    per_batch = sum(len(run_clm_group_texts(b, 8)["input_ids"]) for b in batches)
    streamed = sum(len(p["input_ids"]) for p in Chunker(8).blocks(batches))
    assert per_batch == 2 + 2 + 2 + 0 and streamed == 70 // 8


def test_inputs_as_numpy_and_arrow_match_lists():
    pa = pytest.importorskip("pyarrow")
    docs = [[1, 2, 3], [], [4, 5, 6, 7, 8], [9]]
    want = group_texts({"input_ids": docs}, 3, eos_token_id=0)
    as_np = group_texts({"input_ids": [np.array(d, dtype=np.int32) for d in docs]}, 3, eos_token_id=0)
    as_arrow = group_texts({"input_ids": pa.array(docs, type=pa.list_(pa.int32()))}, 3, eos_token_id=0)
    for got in (as_np, as_arrow):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    assert want["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4], [5, 6, 7], [8, 0, 9]]


def test_datasets_map_drop_in_and_streaming_flush():
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, rng.integers(0, 30)).tolist() for _ in range(25)]
    ds = datasets.Dataset.from_dict(batch_of(docs))
    one = group_texts(batch_of(docs), 16, eos_token_id=100)
    chunker = Chunker(16, eos_token_id=100, tail="pad", total_rows=len(ds))
    streamed = ds.map(chunker, batched=True, batch_size=4, with_indices=True, remove_columns=ds.column_names,
                      load_from_cache_file=False)
    ids = np.array(streamed["input_ids"])
    np.testing.assert_array_equal(ids[: len(one["input_ids"])], one["input_ids"])
    assert len(ids) == len(one["input_ids"]) + 1 and streamed[-1]["labels"][-1] == IGNORE_INDEX  # the padded tail
    per_batch = ds.map(lambda b: group_texts(b, 16), batched=True, batch_size=4, remove_columns=ds.column_names,
                       load_from_cache_file=False)
    assert all(len(x) == 16 for x in per_batch["input_ids"]) and per_batch.column_names == [
        "input_ids", "attention_mask", "special", "labels"]


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="'text'.*tokenize first"):
        group_texts({"input_ids": [[1]], "text": ["hello"]}, 2)
    with pytest.raises(ValueError, match="'attention_mask' has documents of other lengths"):
        group_texts({"input_ids": [[1, 2]], "attention_mask": [[1]]}, 2)
    with pytest.raises(ValueError, match="block_size"):
        Chunker(0)


# ---- long documents tokenized in bounded memory (minillm.infra.corpus.encode_texts, issue 10 item 8) ----------------

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# pieces that stress the cut rules: letters/punctuation/symbols, CJK, newlines, spaces, combining marks,
# contractions, digits, emoji, added-token strings (cuts must not split them)
PIECES = ["a", "b", "word", "你好", "。", "，", ".", "!", "'s", "’", "-", "+", "™", "$", "é", "e\u0301", "\u0301", "1", "42",
          " ", "  ", "\n", "\n\n", "\r\n", "\t", "🙂", "<|endoftext|>", "<|im_end|>", "<|"]


def qwen2_style():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["".join(PIECES) * 3, "the word 你好。 it's 42!\n"] * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def prefix_space_style():
    """GPT-2's byte-level BPE with add_prefix_space=True (RoBERTa, BART, GPT-2 loaded with add_prefix_space): a text
    that does not start with a space gets one, so a piece cut from the middle of a document would get a space the
    whole text does not have there. `splittable` must refuse it: the document is then tokenized whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["".join(PIECES) * 3, "the word 你好。 it's 42!\n"] * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


_TOKS: dict = {}
BUILT = {"qwen2_style": qwen2_style, "prefix_space": prefix_space_style}
NOT_SPLITTABLE = ("metaspace_bpe", "prefix_space")  # a "▁" or a space prefix makes the start of a piece special


def long_doc_tokenizer(name: str):
    if name not in _TOKS:
        from parity.data import tokenizer
        _TOKS[name] = BUILT[name]() if name in BUILT else tokenizer(name)
    return _TOKS[name]


@settings(max_examples=80, deadline=None, database=None)
@given(st.lists(st.sampled_from(PIECES), max_size=300).map("".join), st.integers(4, 64),
       st.sampled_from(["bundled", "gpt2_bpe", "qwen2_style", "metaspace_bpe", "prefix_space"]))
def test_encode_texts_equals_whole_text_ids(text, piece_chars, name):
    from minillm.infra.corpus import cut_points, encode_texts, splittable

    tok = long_doc_tokenizer(name)
    backend = getattr(tok, "backend_tokenizer", tok)
    whole = backend.encode(text, add_special_tokens=False).ids
    got = encode_texts(tok, [text, "short", ""], piece_chars=piece_chars)
    assert got[0].tolist() == whole
    assert got[1].tolist() == backend.encode("short", add_special_tokens=False).ids and got[2].tolist() == []
    assert got[0].dtype == np.int32
    assert splittable(tok) == (name not in NOT_SPLITTABLE)


def test_prefix_space_tokenizer_is_not_cut():
    """A long document under ByteLevel(add_prefix_space=True): the ids of the whole text (issue 25 item 6). Cut into
    pieces, every piece after the first would start with an added space (" word" instead of "word")."""
    from minillm.infra.corpus import cut_points, encode_texts, splittable

    tok = long_doc_tokenizer("prefix_space")
    doc = "word. 你好。\nit's 42! the word\n" * 40
    assert cut_points(doc, 64, tok)  # the text has safe places: only the tokenizer check keeps it whole
    assert encode_texts(tok, [doc], piece_chars=64)[0].tolist() == tok.encode(doc, add_special_tokens=False).ids
    assert not splittable(tok)


def test_long_document_is_cut_into_bounded_pieces():
    from minillm.infra.corpus import SAMPLE_PRETRAIN, cut_points, encode_texts, iter_pretrain_texts

    tok = long_doc_tokenizer("bundled")
    doc = "".join(t for _, t in zip(range(400), iter_pretrain_texts(SAMPLE_PRETRAIN)))  # no newlines: cuts at punctuation
    cuts = cut_points(doc, 4096, tok.backend_tokenizer)
    sizes = np.diff([0, *cuts, len(doc)])
    assert len(cuts) >= len(doc) // 4096 - 1 and sizes.max() <= 4096  # memory is bounded by the piece size
    assert encode_texts(tok, [doc], piece_chars=4096)[0].tolist() == tok(doc, add_special_tokens=False)["input_ids"]
    assert cut_points("x" * 10_000, 4096) == []  # no safe place: one piece (the docstring says so)


def test_encode_texts_can_keep_special_strings_as_text():
    from minillm.infra.corpus import encode_texts

    tok = long_doc_tokenizer("bundled")
    doc = "a web page quoting <|endoftext|> and <|im_start|>system. " * 50
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    as_text, default = (encode_texts(tok, [doc], piece_chars=256, specials_as_text=f)[0].tolist() for f in (True, False))
    assert not tok.backend_tokenizer.encode_special_tokens  # the switch is restored after the True call
    assert default == tok(doc, add_special_tokens=False)["input_ids"] and default.count(eos) == 50  # run_clm's ids
    assert as_text == tok(doc, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert eos not in as_text and tok.decode(as_text) == doc

"""Streaming jsonl loaders, the bundled samples and the bundled tokenizer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.data import sample_data, train_tokenizer
from minillm.infra.corpus import (SAMPLE_PRETRAIN, SAMPLE_SFT, TOKENIZER_DIR, JsonlStats, batched,
                            iter_pretrain_texts, iter_sft_conversations)
from minillm.sft import MaskStats, mask_batch
from parity.data import tokenizer

BAD_LINES = ['{"text": "unclosed"', '{"txt": "wrong key"}', '[1, 2]', '{"text": 5}', "not json at all"]


@settings(max_examples=40, deadline=None, database=None)
@given(st.lists(st.one_of(st.text(max_size=20).map(lambda t: ("good", t)), st.sampled_from(BAD_LINES).map(lambda b: ("bad", b)),
                          st.just(("blank", ""))), max_size=30))
def test_malformed_lines_are_named_or_skipped_and_counted(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("jsonl") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for kind, value in lines:
            f.write((json.dumps({"text": value}, ensure_ascii=False) if kind == "good" else value) + "\n")
    good = [v for k, v in lines if k == "good"]
    bad_at = [i + 1 for i, (k, _) in enumerate(lines) if k == "bad"]
    stats = JsonlStats()
    assert list(iter_pretrain_texts(path, skip_malformed=True, stats=stats)) == good  # order kept
    assert stats.records == len(good) and stats.skipped == len(bad_at)
    assert [s.split(":")[1] for s in stats.first_skipped] == [str(n) for n in bad_at[:10]]
    if bad_at:
        with pytest.raises(ValueError, match=f"corpus.jsonl:{bad_at[0]}: "):
            list(iter_pretrain_texts(path))
    else:
        assert list(iter_pretrain_texts(path)) == good


def test_loader_streams_and_limits(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(1000):
            f.write(json.dumps({"text": str(i)}) + "\n")
    it = iter_pretrain_texts(path)
    assert next(it) == "0" and next(it) == "1"  # a generator: nothing read ahead into a list
    assert list(iter_pretrain_texts(path, limit=3)) == ["0", "1", "2"]
    assert [len(b) for b in batched(iter_pretrain_texts(path), 300)] == [300, 300, 300, 100]
    with pytest.raises(ValueError, match=r"big.jsonl:\d+: expected a 'conversations'"):
        next(iter_sft_conversations(path))


def test_bundled_samples_are_well_formed():
    stats = JsonlStats()
    texts = list(iter_pretrain_texts(SAMPLE_PRETRAIN, stats=stats))
    assert stats.skipped == 0 and len(texts) >= 1000
    assert any("的" in t for t in texts) and any(" the " in t for t in texts)  # Chinese and English
    convs = list(iter_sft_conversations(SAMPLE_SFT))
    assert len(convs) >= 1000 and all(t["from"] in ("system", "human", "assistant") for c in convs for t in c)
    assert SAMPLE_PRETRAIN.stat().st_size + SAMPLE_SFT.stat().st_size < 5e6  # a few MB at most
    stats = MaskStats()
    mask_batch(convs, tokenizer("bundled"), 512, stats=stats)
    assert stats.kept == len(convs) and stats.truncated == 0 and stats.leading_turns_dropped == 0


def test_bundled_samples_are_what_the_generator_writes(tmp_path):
    sample_data.main(["--out", str(tmp_path)])
    for name in ("pretrain.jsonl", "sft.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLE_PRETRAIN.parent / name).read_bytes(), name


def test_bundled_tokenizer():
    tok = tokenizer("bundled")
    assert len(tok) == 4096 and (TOKENIZER_DIR / "tokenizer.json").exists()
    assert [tok.convert_tokens_to_ids(t) for t in train_tokenizer.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token is None
    text = "Hello, 世界!\n\n  12 + 30 = 42. é 🙂"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless on any text
    assert tok(text, add_special_tokens=False)["input_ids"] == tok(text)["input_ids"]  # no bos/eos added
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nyo<|im_end|>\n")  # Qwen2's ChatML text


def test_tokenizer_retrains_to_the_bundled_one(tmp_path):
    train_tokenizer.train(SAMPLE_PRETRAIN.parent, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_text() == (TOKENIZER_DIR / name).read_text(), name

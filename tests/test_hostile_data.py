"""Data lines that would exhaust the program (issue 19, class 5): what one jsonl line may cost is bounded.

Table-driven. Each row writes a file whose line 2 is the hostile one (lines 1 and 3 are good records) and reads
it the way a training script does: pretraining texts (train/pretrain.py's --streaming path), the token store's
builder (train/pretrain.py), SFT conversations (train/finetune.py). A row is "bad": the reader raises
ValueError("file:2: reason") with the exact reason, `skip_malformed` skips it and counts it with the same
sentence, and the store builder refuses it and builds nothing; or "ok": the line is read as any other. The
data file stays byte-identical, the reading is bounded by an alarm (no hang) and, for the long line, by a
tracemalloc peak far below the line's size (the 2 GB line of the report, here a 4 MB line over a 4 KB limit).
"""

from __future__ import annotations

import json
import tracemalloc

import pytest

from minillm.infra import corpus
from minillm.infra.corpus import JsonlStats, iter_pretrain_texts, iter_sft_conversations
from minillm.infra.store import build_store, is_complete

from test_hostile_files import no_hang  # noqa: E402,F401 (autouse: a hung reader fails the test)

LIMIT = 4096  # the patched corpus.MAX_LINE_BYTES of the long-line rows (the real one is 64 MiB)
DEEP = f"JSON nested more than {corpus.MAX_DEPTH} levels deep (minillm.infra.corpus.MAX_DEPTH)"
LONG = f"line longer than {LIMIT} bytes (minillm.infra.corpus.MAX_LINE_BYTES): not read"


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def text_line(text: str, extra: str = "") -> bytes:
    return ('{"text": ' + json.dumps(text) + extra + "}\n").encode()


def sft_line(value: str, extra: str = "") -> bytes:
    return ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": '
            + json.dumps(value) + "}]" + extra + "}\n").encode()


# (case, "text" | "sft", line 2, "bad" reason | None for "ok", patch MAX_LINE_BYTES to LIMIT)
ROWS = [
    ("nested 100,000 deep", "text", (nested(100_000) + "\n").encode(), DEEP, False),
    ("nested 100,000 deep inside a record", "text", text_line("x", ', "meta": ' + nested(100_000)), DEEP, False),
    ("sft nested 100,000 deep", "sft", sft_line("yo", ', "meta": ' + nested(100_000)), DEEP, False),
    ("nested 65 deep (parses, over the limit)", "text", text_line("x", ', "meta": ' + nested(64)), DEEP, False),
    ("nested 64 deep (at the limit)", "text", text_line("x", ', "meta": ' + nested(63)), None, False),
    ("many brackets, shallow", "text", text_line("x", ', "meta": [' + ",".join(["[]"] * 10_000) + "]"), None, False),
    ("100,000 brackets inside the text", "text", text_line("[{" * 100_000), None, False),
    ("line of 4 MB over a 4 KB limit", "text", text_line("x" * (4 << 20)), LONG, True),
    ("sft line of 4 MB over a 4 KB limit", "sft", sft_line("y" * (4 << 20)), LONG, True),
    ("line of exactly the limit", "text", text_line("z" * (LIMIT - len(text_line("")) + 1)), None, True),
    ("one byte over the limit", "text", text_line("z" * (LIMIT - len(text_line("")) + 2)), LONG, True),
]

GOOD = {"text": text_line("fine"), "sft": sft_line("fine")}
READERS = {"text": iter_pretrain_texts, "sft": iter_sft_conversations}


@pytest.mark.parametrize("case,kind,line,reason,patch", ROWS, ids=[r[0] for r in ROWS])
def test_one_line_cannot_exhaust_the_readers(tmp_path, monkeypatch, case, kind, line, reason, patch):
    if patch:
        monkeypatch.setattr(corpus, "MAX_LINE_BYTES", LIMIT)
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD[kind] + line + GOOD[kind])
    before = path.read_bytes()
    reader = READERS[kind]
    if reason is None:
        assert len(list(reader(path))) == 3
    else:
        tracemalloc.start()
        with pytest.raises(ValueError) as e:
            list(reader(path))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert str(e.value) == f"{path}:2: {reason}"
        if patch:  # the over-long line was never held: far less than its 4 MB
            assert peak < 512 << 10, peak
        stats = JsonlStats()
        assert len(list(reader(path, skip_malformed=True, stats=stats))) == 2  # lines 1 and 3
        assert stats.skipped == 1 and stats.first_skipped == [str(e.value)] and stats.lines == 3
    if kind == "text":  # train/pretrain.py's store builder reads the same way
        store = tmp_path / "s.store"
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(corpus.TOKENIZER_DIR / "tokenizer.json"))
        if reason is None:
            build_store(store, [str(path)], tok, 4, 0)
            assert is_complete(store)
        else:
            with pytest.raises(ValueError) as e:
                build_store(store, [str(path)], tok, 4, 0)
            assert str(e.value) == f"{path}:2: {reason}" and not store.exists()
    assert path.read_bytes() == before


def test_limits_are_documented_module_constants():
    assert corpus.MAX_LINE_BYTES == 64 << 20 and corpus.MAX_DEPTH == 64
    assert "MAX_LINE_BYTES" in corpus.__doc__ and "MAX_DEPTH" in corpus.__doc__


def test_a_long_last_line_without_newline(tmp_path, monkeypatch):
    """The over-long line is the file's last and has no newline: still passed over in pieces, then the end."""
    monkeypatch.setattr(corpus, "MAX_LINE_BYTES", LIMIT)
    path = tmp_path / "tail.jsonl"
    path.write_bytes(GOOD["text"] + text_line("w" * 100_000).rstrip(b"\n"))
    stats = JsonlStats()
    assert list(iter_pretrain_texts(path, skip_malformed=True, stats=stats)) == ["fine"]
    assert stats.first_skipped == [f"{path}:2: {LONG}"]

"""Streaming jsonl loaders for the real corpora, and the paths of the bundled samples.

The seq-monkey pretraining corpus is ~13 GB of `{"text": ...}` lines; BelleGroup SFT files are
`{"conversations": [{"from": ..., "value": ...}, ...]}` lines. Both are read line by line from a
buffered file, so memory stays flat whatever the file size; nothing is collected into a list
unless you ask for a batch (`batched`).

Bad input is never skipped silently: a line that is not valid JSON, or lacks the expected key,
raises `ValueError("file:line: ...")`. With `skip_malformed=True` it is skipped instead and counted
in the `JsonlStats` you pass (which also keeps the first few bad line numbers).

Bundled samples (original content, see minillm/sample_data.py): `SAMPLE_PRETRAIN`, `SAMPLE_SFT`,
and the tokenizer folder `TOKENIZER_DIR` (load it with `AutoTokenizer.from_pretrained(TOKENIZER_DIR)`).
This module is named `corpus` because `minillm/data/` is the folder holding those files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLE_PRETRAIN = DATA_DIR / "pretrain.jsonl"
SAMPLE_SFT = DATA_DIR / "sft.jsonl"
TOKENIZER_DIR = DATA_DIR / "tokenizer"

T = TypeVar("T")


@dataclass
class JsonlStats:
    """Counts for one or more passes over jsonl files."""

    lines: int = 0  # non-blank lines read
    records: int = 0  # records yielded
    blank: int = 0  # blank lines (ignored)
    skipped: int = 0  # malformed lines skipped (only with skip_malformed=True)
    first_skipped: list[str] = field(default_factory=list)  # "file:line: reason" for the first 10

    def __str__(self) -> str:
        s = f"{self.records} records from {self.lines} lines, {self.skipped} malformed skipped"
        return s + (f" (first: {self.first_skipped[0]})" if self.first_skipped else "")


def _bad(path: os.PathLike | str, lineno: int, reason: str, skip: bool, stats: JsonlStats) -> None:
    where = f"{path}:{lineno}: {reason}"
    if not skip:
        raise ValueError(where)
    stats.skipped += 1
    if len(stats.first_skipped) < 10:
        stats.first_skipped.append(where)


def iter_jsonl(
    path: os.PathLike | str,
    key: str | None = None,
    skip_malformed: bool = False,
    stats: JsonlStats | None = None,
    limit: int | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Iterator[Any]:
    """Yield each line's JSON object (or its `key` field), streaming; at most `limit` records.

    `check(value)` may return a reason why a value is malformed (handled like bad JSON).
    """
    stats = stats if stats is not None else JsonlStats()
    count = 0
    with open(path, "rb") as f:  # binary + json.loads(bytes): no separate decode step
        for lineno, line in enumerate(f, 1):
            if limit is not None and count >= limit:
                return
            if not line.strip():
                stats.blank += 1
                continue
            stats.lines += 1
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                _bad(path, lineno, f"malformed JSON ({e})", skip_malformed, stats)
                continue
            if key is not None:
                if not isinstance(obj, dict) or key not in obj:
                    found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    _bad(path, lineno, f"missing key {key!r} (found {found})", skip_malformed, stats)
                    continue
                obj = obj[key]
            reason = check(obj) if check is not None else None
            if reason is not None:
                _bad(path, lineno, reason, skip_malformed, stats)
                continue
            stats.records += 1
            count += 1
            yield obj


def _check_text(text: Any) -> str | None:
    return None if isinstance(text, str) else f"'text' is {type(text).__name__}, not a string"


def _conversation(record: Any) -> Any:
    return record.get("conversations", record.get("messages")) if isinstance(record, dict) else None


def _check_conversation(record: Any) -> str | None:
    conv = _conversation(record)
    if isinstance(conv, list) and all(isinstance(t, dict) for t in conv):
        return None
    return "expected a 'conversations' (or 'messages') list of turn objects"


def iter_pretrain_texts(path: os.PathLike | str = SAMPLE_PRETRAIN, **kw: Any) -> Iterator[str]:
    """The `text` of every line of a seq-monkey style jsonl file (keywords as `iter_jsonl`)."""
    return iter_jsonl(path, key="text", check=_check_text, **kw)


def iter_sft_conversations(path: os.PathLike | str = SAMPLE_SFT, **kw: Any) -> Iterator[list[dict]]:
    """The `conversations` (BelleGroup) or `messages` (OpenAI) list of every line of a jsonl file."""
    return map(_conversation, iter_jsonl(path, check=_check_conversation, **kw))


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` consecutive items (the last one shorter): feed tokenizers and the chunker."""
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch

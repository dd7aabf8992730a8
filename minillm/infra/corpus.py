"""Streaming jsonl loaders for the real corpora, and the paths of the bundled samples.

The seq-monkey pretraining corpus is ~13 GB of `{"text": ...}` lines; BelleGroup SFT files are
`{"conversations": [{"from": ..., "value": ...}, ...]}` lines. Both are read line by line from a
buffered file, so memory stays flat whatever the file size; nothing is collected into a list
unless you ask for a batch (`batched`).

Bad input is never skipped silently: a line that is not valid JSON, lacks the expected key, or holds
something that is not usable text raises `ValueError("file:line: ...")`. With `skip_malformed=True` it
is skipped instead and counted in the `JsonlStats` you pass (which also keeps the first few bad line
numbers). Usable text: a pretraining `text` must be a string, and every SFT turn needs a known role
and string content; neither may hold a lone surrogate (a JSON "\\ud800" escape: no tokenizer can
encode it). Any other string is used as is: an empty one (an empty document: in pretraining just its
EOS; an empty reply: the template renders it), NUL and control characters, special-token strings (the
SFT masker keeps those as text, see minillm.sft), huge documents (`encode_texts` tokenizes them in
bounded memory).

What one line may cost is bounded, so that no line can exhaust the program (issue 19): a line longer than
`MAX_LINE_BYTES` (64 MiB) is never read into memory (it is read in pieces of 64 KiB and passed over), and a
line whose JSON nests deeper than `MAX_DEPTH` (64) levels is malformed (a line of 100,000 `[` exhausts the
recursion of Python's JSON parser: that RecursionError is caught and reported the same way). Both are
malformed lines like any other: `file:line: reason`, or counted by `skip_malformed`. (A line within the
limit still costs more once parsed: about its size again as text, up to ~20x for a line of empty lists.)
Every reader of jsonl data goes through `read_lines` and `parse_record` (the token store's builder
included), so both training scripts get the same limits.

Bundled samples (original content, see minillm/data/sample_data.py): `SAMPLE_PRETRAIN`, `SAMPLE_SFT`,
and the tokenizer folder `TOKENIZER_DIR` (load it with `AutoTokenizer.from_pretrained(TOKENIZER_DIR)`).
This module is named `corpus` because `minillm/data/` is the folder holding those files.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from minillm.data import DATA_DIR, SAMPLE_PRETRAIN, SAMPLE_SFT, TOKENIZER_DIR  # noqa: F401 (re-exported)
from minillm.sft import conversation_problem, split_special_tokens, unicode_problem


T = TypeVar("T")

# The most one jsonl line may cost. Module constants: a corpus that needs more can raise them before reading.
MAX_LINE_BYTES = 64 << 20  # bytes in one line, its newline excluded (a seq-monkey line is a few KB)
MAX_DEPTH = 64  # nesting of [ and { in one line's JSON (an SFT record needs 3)
_SKIP_PIECE = 1 << 16  # bytes read at a time while passing over a line that is too long


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


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


def read_lines(f: Any, lineno: int = 0) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number, bytes consumed, the line or None) for each line of the binary file `f` from where it is.

    A line longer than MAX_LINE_BYTES is None: it is consumed in pieces of _SKIP_PIECE bytes and never held
    whole (a 2 GB line read as one `bytes` peaked at 4.7 GB RSS once parsed). `lineno`: the number of the
    line before the first one read (a resumed read starts in the middle of a file).
    """
    limit = MAX_LINE_BYTES  # read at call time: a test or a caller may have changed the module constant
    while line := f.readline(limit + 1):  # at most the limit and its newline
        lineno += 1
        if len(line) <= limit or line.endswith(b"\n"):
            yield lineno, len(line), line
            continue
        n = len(line)
        del line  # the piece read so far is not kept while the rest is passed over
        while piece := f.readline(_SKIP_PIECE):
            n += len(piece)
            if piece.endswith(b"\n"):
                break
        yield lineno, n, None


def too_long() -> str:
    """The reason given for a line `read_lines` passed over."""
    return f"line longer than {_mib(MAX_LINE_BYTES)} (minillm.infra.corpus.MAX_LINE_BYTES): not read"


def _nested_too_deep(obj: Any) -> bool:
    """Whether a parsed JSON value nests lists/objects more than MAX_DEPTH levels (a walk with its own stack:
    no recursion to exhaust)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def parse_record(line: bytes, key: str | None = None, check: Callable[[Any], str | None] | None = None
                 ) -> tuple[Any, str | None]:
    """One non-blank jsonl line: (its JSON object, or its `key` field; None) or (None, why it is malformed).
    `check(value)` may return a reason why a value is malformed. Also every other JSON file minillm reads
    itself (the token store's index and markers): one parser, one depth limit."""
    too_deep = f"JSON nested more than {MAX_DEPTH} levels deep (minillm.infra.corpus.MAX_DEPTH)"
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"malformed JSON ({e})"
    except RecursionError:  # json's C parser recurses once per level and stops at Python's recursion limit
        return None, too_deep
    # The walk only when the line could nest that deep: an ordinary record has a handful of brackets.
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and _nested_too_deep(obj):
        return None, too_deep
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            return None, f"missing key {key!r} (found {found})"
        obj = obj[key]
    reason = check(obj) if check is not None else None
    return (None, reason) if reason is not None else (obj, None)


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
        for lineno, _, line in read_lines(f):
            if limit is not None and count >= limit:
                return
            if line is not None and not line.strip():
                stats.blank += 1
                continue
            stats.lines += 1
            obj, reason = parse_record(line, key, check) if line is not None else (None, too_long())
            if reason is not None:
                _bad(path, lineno, reason, skip_malformed, stats)
                continue
            stats.records += 1
            count += 1
            yield obj


def check_text(text: Any) -> str | None:
    """Why a pretraining record's `text` cannot be used (not a string, bad Unicode), or None."""
    if not isinstance(text, str):
        return f"'text' is {'null' if text is None else 'a JSON ' + type(text).__name__}, not a string"
    return unicode_problem(text, "'text'")


def _conversation(record: Any) -> Any:
    return record.get("conversations", record.get("messages")) if isinstance(record, dict) else record


def iter_pretrain_texts(path: os.PathLike | str = SAMPLE_PRETRAIN, **kw: Any) -> Iterator[str]:
    """The `text` of every line of a seq-monkey style jsonl file (keywords as `iter_jsonl`)."""
    return iter_jsonl(path, key="text", check=check_text, **kw)


def iter_sft_conversations(path: os.PathLike | str = SAMPLE_SFT, **kw: Any) -> Iterator[list[dict]]:
    """The `conversations` (BelleGroup) or `messages` (OpenAI) list of every line of a jsonl file, each
    checked by `minillm.sft.conversation_problem` (a bad line: `file:line: turn j: why`)."""
    return map(_conversation, iter_jsonl(path, check=conversation_problem, **kw))


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` consecutive items (the last one shorter): feed tokenizers and the chunker."""
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


# ---- tokenizing long documents in bounded memory ------------------------------------------------------------
#
# A tokenizers Encoding keeps, per token, its string, offsets, word index and masks: ~100+ bytes. One 50 MB
# document tokenized in one call therefore peaks at several GB (issue 10 item 8). `encode_texts` cuts a long
# document into pieces of about `piece_chars` characters at places where the tokenizer's pre-tokenizer is
# known to start a new piece anyway, tokenizes the pieces a few at a time and keeps only their ids (int32):
# the ids are those of the whole text, in memory proportional to the piece size.
#
# Where it cuts, and why that is exact: byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, the bundled one)
# split text with a regex before BPE, and BPE never merges across those splits. Their regexes always end a
# piece (1) after a newline followed by a non-space character, and (2) between a letter and a following
# punctuation or symbol character ("你好" | "。", "word" | "."): no alternative spans either place, and the
# matching resumes there from the same state. Cuts never fall inside, or at the edge of, an added token's
# string. Tokenizers where the start of a text is special (a prefix space: ByteLevel(add_prefix_space=True),
# SentencePiece's Metaspace) or whose normalizer can change characters across a cut (NFKC: "™" -> "TM") are
# not cut: such a document is tokenized whole, as before (`splittable` says which).

_NEWLINE_CUT = re.compile(r"\n(?=\S)")
_LETTER_CUT = re.compile(r"[^\W\d_](?=[^\w\s])")
_SAFE_PRE_TOKENIZERS = {"Sequence", "Split", "ByteLevel", "Digits"}
_SPLITTABLE: dict[int, tuple[Any, bool]] = {}  # id(backend) -> (backend, verdict): to_str() is slow


def _backend(tokenizer: Any) -> Any:
    return getattr(tokenizer, "backend_tokenizer", tokenizer)  # an HF fast tokenizer's tokenizers.Tokenizer


def splittable(tokenizer: Any) -> bool:
    """Whether `encode_texts` may cut long texts for this tokenizer (see the comment above)."""
    backend = _backend(tokenizer)
    if id(backend) not in _SPLITTABLE:
        spec = json.loads(backend.to_str())

        def parts(node: Any) -> list[dict]:
            if not node:
                return []
            inner = node.get("pretokenizers") or node.get("normalizers")
            return [p for n in inner for p in parts(n)] if inner is not None else [node]

        pre = parts(spec.get("pre_tokenizer"))
        ok = (any(p["type"] == "ByteLevel" for p in pre)
              and all(p["type"] in _SAFE_PRE_TOKENIZERS and not p.get("add_prefix_space") for p in pre)
              and all(n["type"] == "NFC" for n in parts(spec.get("normalizer"))))
        _SPLITTABLE[id(backend)] = (backend, ok)
    return _SPLITTABLE[id(backend)][1]


def _added_strings(backend: Any) -> tuple[re.Pattern | None, int]:
    """A pattern matching any added token's string, and the longest one's length."""
    strings = {t.content for t in backend.get_added_tokens_decoder().values() if t.content}
    strings = sorted(strings, key=len, reverse=True)  # longest first: the regex takes the first alternative
    return (re.compile("|".join(map(re.escape, strings))), len(strings[0])) if strings else (None, 0)


def _cut_ok(text: str, c: int, added: re.Pattern | None, longest: int) -> bool:
    before, after = unicodedata.category(text[c - 1]), unicodedata.category(text[c])
    if text[c - 1] == "\n":
        if after[0] in "MZC":  # a combining mark or another space/control character: no cut
            return False
    elif not (before[0] == "L" and after[0] in "PS"):
        return False
    if added is not None:  # never inside or at the edge of an added token's string (lstrip/rstrip eat spaces)
        for m in added.finditer(text, max(0, c - longest - 1), c + longest + 1):
            if m.start() <= c <= m.end():
                return False
    return True


def cut_points(text: str, piece_chars: int, tokenizer: Any = None) -> list[int]:
    """Where `encode_texts` cuts `text`: pieces of at most about `piece_chars` characters (a piece may be
    longer when no safe place is found in its second half)."""
    added, longest = _added_strings(_backend(tokenizer)) if tokenizer is not None else (None, 0)
    cuts, start = [], 0
    while len(text) - start > piece_chars:
        lo, hi = start + piece_chars // 2, start + piece_chars
        found = None
        for pattern in (_NEWLINE_CUT, _LETTER_CUT):
            # the last acceptable place in the window: pieces as long as allowed
            found = next((m.end() for m in reversed(list(pattern.finditer(text, lo, hi)))
                          if _cut_ok(text, m.end(), added, longest)), None)
            if found is not None:
                break
        if found is None:  # nothing in this window: look further on (the piece grows)
            m = next((m for p in (_NEWLINE_CUT, _LETTER_CUT) for m in p.finditer(text, hi)
                      if _cut_ok(text, m.end(), added, longest)), None)
            if m is None:
                break
            found = m.end()
        cuts.append(found)
        start = found
    return cuts


def encode_texts(tokenizer: Any, texts: Sequence[str], piece_chars: int = 1 << 16, pieces_per_call: int = 16,
                 specials_as_text: bool = False) -> list[np.ndarray]:
    """Token ids (int32 arrays, no special tokens added) of each text, equal to `tokenizer(texts,
    add_special_tokens=False, split_special_tokens=specials_as_text)["input_ids"]`, with memory bounded by
    the piece size for long texts.

    `tokenizer`: an HF fast tokenizer or a tokenizers.Tokenizer. Texts of at most `piece_chars`
    characters go through one batched call; longer ones are cut (see `cut_points`) when `splittable`.
    `specials_as_text=True`: a special-token string inside a document (`<|endoftext|>` quoted in a web
    page) is tokenized as ordinary text instead of becoming the control id (run_clm's default is False).
    """
    with split_special_tokens(_backend(tokenizer), specials_as_text):
        return _encode_texts(_backend(tokenizer), texts, piece_chars, pieces_per_call)


def _encode_texts(backend: Any, texts: Sequence[str], piece_chars: int, pieces_per_call: int) -> list[np.ndarray]:
    # encode_batch_fast: the same ids without tracking character offsets (unused here), measured 1.3-1.4x faster
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    out: list[np.ndarray | None] = [None] * len(texts)
    short = [i for i, t in enumerate(texts) if len(t) <= piece_chars or not splittable(backend)]
    for i, enc in zip(short, encode([texts[i] for i in short], add_special_tokens=False)):
        out[i] = np.asarray(enc.ids, dtype=np.int32)
    for i, text in enumerate(texts):
        if out[i] is not None:
            continue
        bounds = [0, *cut_points(text, piece_chars, backend), len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        ids = []
        for k in range(0, len(pieces), pieces_per_call):  # a few pieces per call: parallel, still bounded
            ids += [np.asarray(e.ids, dtype=np.int32)
                    for e in encode(pieces[k:k + pieces_per_call], add_special_tokens=False)]
        out[i] = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    return out

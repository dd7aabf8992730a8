"""Pretraining chunker: concatenate tokenized documents and cut them into blocks of `block_size`.

Two entry points, both working on plain integer lists (any tokenizer's output) with numpy:

- `group_texts(examples, block_size, eos_token_id=None)` is stateless, a drop-in for
  `datasets.map(group_texts, batched=True)`. With `eos_token_id=None` it reproduces transformers'
  `examples/pytorch/language-modeling/run_clm.py` `group_texts` exactly (parity/data.py checks it):
  the remainder of every map batch (< block_size tokens) is dropped, a batch with fewer than
  `block_size` tokens yields no block.
- `Chunker` is the streaming version: it carries the remainder of one batch into the next, so only
  the final tail of the whole corpus is lost (`tail="drop"`) or emitted as one padded block whose
  padding has `labels == -100` and `attention_mask == 0` (`tail="pad"`).

How this differs from the course (chapter 6, "3.1.3 预训练数据处理"):
- The course's `group_texts` keeps a short block (`total_length < block_size`) when a map batch is
  short, so blocks are not all `block_size` long, and drops the tail of every other batch.
- The course inserts no separator between documents, so the model never sees where one ends. Here
  `eos_token_id` appends an end-of-document token to every document first (the training scripts
  turn it on by default); the appended position gets `attention_mask` 1, and 0 in any other column.
- The course concatenates with `itertools.chain` and slices Python lists token by token; here the
  columns are flattened once with numpy and reshaped, so the cost per token is C, not Python.

Speed: on Python lists the cost is converting the ints to numpy once; with
`ds.with_format("arrow").map(group_texts, batched=True, ...)` the columns arrive as Arrow arrays and
are flattened without copying (about 10x run_clm's `group_texts` end to end through datasets.map on
the bundled corpus, see `python -m parity.bench --only chunker`).

Blocks come back as 2-D numpy arrays (one row per block), which `datasets.map` stores as list
columns; `labels` is always a copy of `input_ids` (an input `labels` column is replaced).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np

IGNORE_INDEX = -100  # what transformers' cross-entropy ignores


def _flatten(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """A column of documents (lists / numpy arrays / pyarrow list array) -> (flat int64 tokens, lengths)."""
    if hasattr(column, "combine_chunks"):  # pyarrow ChunkedArray
        column = column.combine_chunks()
    if hasattr(column, "flatten") and hasattr(column, "value_lengths"):  # pyarrow ListArray: zero-copy
        flat = np.asarray(column.flatten(), dtype=np.int64)
        lengths = np.asarray(column.value_lengths().fill_null(0), dtype=np.int64)
        return flat, lengths
    if isinstance(column, (str, bytes)) or not isinstance(column, (Sequence, np.ndarray)):
        raise TypeError(f"expected a column of token lists, got {type(column).__name__}")
    lengths = np.fromiter((len(doc) for doc in column), dtype=np.int64, count=len(column))
    if len(column) and isinstance(column[0], (str, bytes)):
        raise TypeError("a text column reached the chunker: tokenize first and remove the text column")
    if len(column) and isinstance(column[0], np.ndarray):
        flat = np.concatenate(column).astype(np.int64, copy=False) if len(column) else np.zeros(0, np.int64)
    else:
        # chain.from_iterable + fromiter walks the Python ints in C, without a Python-level loop
        flat = np.fromiter(itertools.chain.from_iterable(column), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _with_separators(flat: np.ndarray, lengths: np.ndarray, value: int) -> np.ndarray:
    """Insert `value` after every document: [d0..., v, d1..., v, ...], vectorised."""
    out = np.empty(len(flat) + len(lengths), dtype=np.int64)
    sep_pos = np.cumsum(lengths + 1) - 1  # index of each document's separator in `out`
    is_sep = np.zeros(len(out), dtype=bool)
    is_sep[sep_pos] = True
    out[is_sep] = value
    out[~is_sep] = flat
    return out


def _concatenate(examples: Mapping[str, Any], eos_token_id: int | None) -> tuple[dict[str, np.ndarray], int]:
    """Flatten every token column of a batch, appending the end-of-document token when asked.
    Returns the flat columns and the number of documents."""
    if hasattr(examples, "column_names") and hasattr(examples, "column"):  # a pyarrow Table (format "arrow")
        examples = {name: examples.column(name) for name in examples.column_names}
    if "input_ids" not in examples:
        raise KeyError(f"the batch has no 'input_ids' column (columns: {sorted(examples)})")
    flat: dict[str, np.ndarray] = {}
    doc_lengths = None
    for name, column in examples.items():
        if name == "labels":
            continue  # rebuilt from input_ids below
        try:
            tokens, lengths = _flatten(column)
        except TypeError as e:
            raise TypeError(f"column {name!r}: {e}") from None
        if doc_lengths is None:
            doc_lengths = lengths
        elif not np.array_equal(lengths, doc_lengths):
            raise ValueError(f"column {name!r} has documents of other lengths than 'input_ids'")
        if eos_token_id is not None:
            value = eos_token_id if name == "input_ids" else (1 if name == "attention_mask" else 0)
            tokens = _with_separators(tokens, lengths, value)
        flat[name] = tokens
    return flat, len(doc_lengths)


def _blocks(flat: Mapping[str, np.ndarray], n_blocks: int, block_size: int) -> dict[str, np.ndarray]:
    out = {k: v[: n_blocks * block_size].reshape(n_blocks, block_size) for k, v in flat.items()}
    out["labels"] = out["input_ids"].copy()
    return out


def group_texts(examples: Mapping[str, Any], block_size: int, eos_token_id: int | None = None) -> dict[str, np.ndarray]:
    """Concatenate a batch of tokenized documents and split it into blocks of exactly `block_size`.

    `examples` maps column name -> list of documents (what `datasets.map(batched=True)` passes).
    The tail of the batch (< block_size tokens) is dropped, as in transformers' run_clm example.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    flat, _ = _concatenate(examples, eos_token_id)
    return _blocks(flat, len(flat["input_ids"]) // block_size, block_size)


@dataclass
class Chunker:
    """Streaming chunker: the remainder of each batch is carried into the next one.

    Use it either as a generator over batches, which also emits the final tail:

        chunker = Chunker(block_size=512, eos_token_id=tok.eos_token_id)
        for blocks in chunker.blocks(batches): ...

    or with `datasets.map`, telling it the number of rows so the last batch flushes the tail
    (single process only: with num_proc > 1 every worker would keep its own remainder):

        chunker = Chunker(512, eos_token_id=eos, total_rows=len(ds))
        ds.map(chunker, batched=True, with_indices=True, remove_columns=ds.column_names)
    """

    block_size: int
    eos_token_id: int | None = None
    tail: Literal["drop", "pad"] = "drop"
    pad_token_id: int = 0  # input_ids filler of the padded final block (its labels are -100)
    total_rows: int | None = None  # for datasets.map(with_indices=True): flush after this row
    rows_seen: int = field(default=0, init=False)
    tokens_in: int = field(default=0, init=False)  # including separators
    tokens_dropped: int = field(default=0, init=False)  # the final tail, when tail == "drop"
    _rest: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.tail not in ("drop", "pad"):
            raise ValueError(f"tail must be 'drop' or 'pad', got {self.tail!r}")

    def __call__(self, examples: Mapping[str, Any], indices: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Chunk one batch; the remainder waits for the next call (or `flush`)."""
        flat, n_docs = _concatenate(examples, self.eos_token_id)
        if self._rest:
            if set(self._rest) != set(flat):
                raise ValueError(f"columns changed between batches: {sorted(self._rest)} -> {sorted(flat)}")
            flat = {k: np.concatenate([self._rest[k], v]) for k, v in flat.items()}
        self.rows_seen += n_docs
        self.tokens_in += len(flat["input_ids"]) - len(self._rest.get("input_ids", ()))
        n_blocks = len(flat["input_ids"]) // self.block_size
        out = _blocks(flat, n_blocks, self.block_size)
        self._rest = {k: v[n_blocks * self.block_size :].copy() for k, v in flat.items()}
        last = indices is not None and self.total_rows is not None and len(indices) and indices[-1] == self.total_rows - 1
        if last:
            tail = self.flush()
            if tail:
                out = {k: np.concatenate([v, tail[k]]) for k, v in out.items()}
        return out

    def flush(self) -> dict[str, np.ndarray]:
        """The final tail: no block (`drop`, counted in `tokens_dropped`) or one padded block (`pad`)."""
        rest, self._rest = self._rest, {}
        n = len(rest.get("input_ids", ()))
        if n == 0 or self.tail == "drop":
            self.tokens_dropped += n
            empty = np.zeros((0, self.block_size), dtype=np.int64)
            return {k: empty.copy() for k in (*rest, "labels")} if rest else {}
        pad = self.block_size - n
        out = {}
        for k, v in rest.items():
            fill = self.pad_token_id if k == "input_ids" else 0
            out[k] = np.concatenate([v, np.full(pad, fill, dtype=np.int64)])[None, :]
        out["labels"] = np.concatenate([rest["input_ids"], np.full(pad, IGNORE_INDEX, dtype=np.int64)])[None, :]
        return out

    def blocks(self, batches: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, np.ndarray]]:
        """Chunk every batch in order, then the final tail; yields one dict of 2-D arrays per batch."""
        for batch in batches:
            out = self(batch)
            if len(out["input_ids"]):
                yield out
        tail = self.flush()
        if tail and len(tail["input_ids"]):
            yield tail

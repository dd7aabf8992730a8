"""Pretraining data on disk: a token store that every rank reads instead of holding the corpus in RAM.

In the spirit of nanoGPT's `train.bin` and Megatron's indexed datasets: one flat file of token ids
(`tokens.bin`, uint16 when the vocabulary fits, else uint32) and a small `index.json` (dtype, token and
document counts, block_size, eos, the source files with sizes and mtimes). The token stream is every
document's ids followed by EOS, in file order; block i is tokens[i*block_size : (i+1)*block_size], so the
blocks are exactly what `minillm.chunk.Chunker(block_size, eos_token_id)` (tail="drop") yields for the same
documents (tests/test_store.py checks it). The final tail (< block_size tokens) stays in the file, unused.

    build_store(path, files, tokenizer, block_size=512, eos_token_id=eos, workers=2)   # once
    train, val = store_splits(path, validation_split_percentage=5)                      # every rank
    train[0] -> {"input_ids": LongTensor(block_size), "labels": same}

Building, in bounded memory (peak RSS independent of the corpus size):
- documents stream from the jsonl files (minillm.infra.corpus readers: a bad line stops with file:line) in
  batches of at most `batch_docs` documents / `batch_chars` characters;
- a pool of `workers` tokenizer processes (tokenizers' own Rust threads off, one core each; 0: this process
  with the Rust threads) tokenizes them with `corpus.encode_texts` (a huge document is tokenized in pieces);
  at most 2 x workers batches are in flight, and results are written in submission order, so the store
  is byte-identical for any number of workers;
- each source file becomes a part (`<path>.partial/part-NNNNN.bin` + a `.json` marker written after it),
  so a killed build restarts without redoing finished files; when all are done the parts are joined into
  `tokens.bin`, `index.json` (with `"complete": true`) is written last, and the directory is renamed to
  `path`. A store that exists under `path` is therefore always complete; a killed build leaves only
  `<path>.partial`. An exclusive lock (`<path>.lock`, flock, removed by its holder
  at the end) keeps two builders apart;
- within a file, progress is committed every `segment_bytes` of source (the part's tokens fsynced, then
  `part-NNNNN.progress.json`: byte offset and line reached, tokens and documents so far, the file's size and
  mtime), so a build killed at 90% of one 13 GB file resumes there: tokens written after the last commit are
  truncated away, and a file changed since (size or mtime) is tokenized from the start, with a warning.

What is trusted (issue 19): nothing in the store's directory until it is checked. Its two files must be
regular files (a symlink, even one into the store, a FIFO or a device is refused: the builder writes neither,
and a `tokens.bin` linked to /etc/passwd once trained a run); `index.json` must be a JSON object whose every key
has the type and range the builder writes (`read_index`), and must agree with the run (`check_store`): the
tokenizer (a hash of its JSON), EOS, `specials_as_text`, block_size, the source files (path, size, mtime), the
dtype wide enough for the tokenizer's largest id (`max_token_id`: the largest id of its vocabulary, added tokens
included, not `get_vocab_size()`, which a WordLevel vocabulary with gaps or an added token can exceed), and
`tokens.bin`'s size. A store that disagrees is rebuilt by the building rank with a warning naming the file and
key; a waiting rank waits for the rebuilt one; a store holding a non-regular file, or files a store never
holds, is refused (`StoreError`, a ValueError: one sentence naming the file), and nothing is deleted. The
index also records `max_id`, the largest id actually stored: `check_ids_fit(dataset, vocab_size)` compares it
with the model's vocabulary before training (an id past the embedding would be an IndexError mid-run), and
every block read is checked against it (a `tokens.bin` changed after the build is refused, not trained on).
An OSError while building (a full disk) is a StoreError naming the file; the finished parts stay for a rerun.

Reading: `StoreDataset` reads a block with `os.pread` (one system call, block_size x 2 bytes). Not a long-lived
np.memmap: every page of a mapping a process has touched counts in its RSS (file-backed) until unmapped, so an
epoch of random access would grow each rank's RSS to the size of the file (nanoGPT re-creates its memmap every
batch for this reason). With pread the data sits once in the kernel's page cache, shared by all ranks on the
node, and a rank's RSS stays flat.

Why a flat file and not Arrow (`datasets`' cache), measured on one 120 MB generated corpus, 25M tokens, 2 workers
(parity/bench/preprocess.py, shared 2-core CPU): the course's load_dataset + map(tokenize, num_proc) + map(group_texts)
path wrote 18 bytes per token to disk (Arrow list columns input_ids, attention_mask and labels, plus the tokenized
intermediate) against 2 here, peaked at 1331 MB PSS over its processes against 367 MB, and a random
block read took 370 us through `with_format("torch")` against 50 us with pread. A fixed-size block needs no list
offsets, and the one column (labels = input_ids, attention all ones) is all a causal-LM block needs.

Distributed: `wait_for_store` (ranks that do not build poll for the finished directory, with a timeout and
a clear error) and `open_store(..., build=...)`. `StreamingBlocks` is the `--streaming` alternative: no
store, documents tokenized lazily, sharded over ranks x DataLoader workers.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import time
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from minillm.infra import corpus
from minillm.infra.files import file_identity, file_kind

STORE_VERSION = 2  # 2: the index records the tokenizer's hash, its largest id and the largest id stored
INDEX = "index.json"
TOKENS = "tokens.bin"


class StoreError(ValueError):
    """A token store that cannot be built or used as asked; the message is one sentence naming the file (and
    the index key). A ValueError, as the jsonl readers' `file:line` errors: a script catches both at once."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


_DTYPES = {np.dtype(np.uint16).str, np.dtype(np.uint32).str}  # the only dtypes a store is written in


def _backend(tokenizer: Any) -> Any:
    return getattr(tokenizer, "backend_tokenizer", tokenizer)  # HF fast tokenizer -> tokenizers.Tokenizer


def max_token_id(tokenizer: Any) -> int:
    """The largest id `tokenizer` can produce: the largest id in its vocabulary, added tokens included.

    Not `get_vocab_size() - 1`: that is a count, and a WordLevel vocabulary may have gaps ({"a": 0, "b": 70000}
    has 2 entries) and an added token any id, so sizing the dtype by the count let ids past 65,535 wrap in uint16.
    """
    return max(_backend(tokenizer).get_vocab(with_added_tokens=True).values(), default=-1)


def _tokenizer_hash(tokenizer: Any) -> str:
    return hashlib.sha256(_backend(tokenizer).to_str().encode()).hexdigest()[:16]


def _check_block_size(block_size: Any) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise StoreError(f"block_size must be an integer >= 1, got {block_size!r}")


# ---- tokenizing batches: in this process or in a pool of processes --------------------------------------------

_WORKER: dict[str, Any] = {}  # per tokenizer process: the tokenizer and settings, set once by _init_worker


def _init_worker(tokenizer_json: str, eos: int | None, dtype: str, specials_as_text: bool) -> None:
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_str(tokenizer_json), eos=eos, dtype=np.dtype(dtype),
                   specials_as_text=specials_as_text)


def _stream(ids: list[np.ndarray], eos: int | None, dtype: np.dtype) -> np.ndarray:
    """Documents' ids -> one flat array: d0, eos, d1, eos, ... (no eos when eos is None)."""
    if not ids:
        return np.zeros(0, dtype)
    if eos is None:
        return np.concatenate(ids).astype(dtype, copy=False)
    sep = np.array([eos], dtype=np.int32)
    return np.concatenate([x for a in ids for x in (a, sep)]).astype(dtype, copy=False)


def _tokenize_batch(batch: tuple[list[str], Any]) -> tuple[np.ndarray, int, Any, int]:
    """(the batch's token stream in the store's dtype, number of documents, the batch's position: passed on,
    the largest id in the batch before the cast to the dtype: -1 for none)."""
    texts, position = batch
    w = _WORKER
    ids = corpus.encode_texts(w["tok"], texts, specials_as_text=w["specials_as_text"])
    top = max((int(a.max()) for a in ids if len(a)), default=-1)
    return _stream(ids, w["eos"], w["dtype"]), len(texts), position, top


def _text_batches(path: str, batch_docs: int, batch_chars: int, offset: int = 0, line: int = 0
                  ) -> Iterator[tuple[list[str], tuple[int, int]]]:
    """The file's documents from byte `offset` (just after line `line`) on, in lists of at most batch_docs
    documents and about batch_chars characters, each with (byte offset, line) just after its last document.

    (Not corpus.iter_pretrain_texts: a resumed build seeks to a committed offset, and needs the offsets.)
    """
    batch, chars = [], 0
    with open(path, "rb") as f:
        f.seek(offset)
        for line, n_bytes, raw in corpus.read_lines(f, line):  # a line past corpus.MAX_LINE_BYTES is None
            offset += n_bytes
            if raw is not None and not raw.strip():  # blank lines are no documents (as in corpus.iter_jsonl)
                continue
            # iter_pretrain_texts' rules
            text, reason = (corpus.parse_record(raw, "text", corpus.check_text) if raw is not None
                            else (None, corpus.too_long()))
            if reason is not None:
                raise ValueError(f"{path}:{line}: {reason}")
            batch.append(text)
            chars += len(batch[-1])
            if len(batch) >= batch_docs or chars >= batch_chars:
                yield batch, (offset, line)
                batch, chars = [], 0
    if batch:
        yield batch, (offset, line)


def _ordered_map(fn: Callable, items: Iterator, pool: Any, in_flight: int) -> Iterator:
    """pool.imap in order with at most `in_flight` items submitted and not yet consumed.

    (Pool.imap itself reads its whole input ahead into the task queue: the corpus would end up in RAM.)
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _Tokenizers:
    """`workers` tokenizer processes, TOKENIZERS_PARALLELISM=false while they run; 0: this process, where
    tokenizers' own Rust threads parallelize each batch (the default of an HF tokenizer call)."""

    def __init__(self, tokenizer: Any, eos: int | None, dtype: np.dtype, workers: int, specials_as_text: bool):
        self.args = (_backend(tokenizer).to_str(), eos, dtype.str, specials_as_text)
        self.workers, self.pool = workers, None

    def __enter__(self) -> "_Tokenizers":
        self.old_env = os.environ.get("TOKENIZERS_PARALLELISM")
        if self.workers > 0:
            # One core per process: the Rust thread pool would otherwise oversubscribe the cores the pool uses.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            self.pool = get_context("fork").Pool(self.workers, initializer=_init_worker, initargs=self.args)
        else:
            _init_worker(*self.args)
        return self

    def map(self, batches: Iterator[tuple[list[str], Any]]) -> Iterator[tuple[np.ndarray, int, Any, int]]:
        if self.pool is None:
            return map(_tokenize_batch, batches)
        return _ordered_map(_tokenize_batch, batches, self.pool, 2 * self.workers)

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()
        _WORKER.clear()
        if self.old_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self.old_env


# ---- building ---------------------------------------------------------------------------------------------------

@dataclass
class BuildReport:
    documents: int = 0
    tokens: int = 0  # separators included
    files_built: int = 0
    files_reused: int = 0  # finished parts of an earlier, killed build
    documents_reused: int = 0  # in those parts and in committed segments of a file the killed build was in
    documents_tokenized: int = 0  # by this call
    seconds: float = 0.0


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _lock(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


# ---- what the store's directory holds, checked before anything in it is believed ------------------------------

def _own_file_problem(path: Path) -> str | None:
    """Why `path` is not a file the builder wrote (it writes plain regular files only), or None.
    lstat: nothing is followed or opened, so a symlink out of the store or a FIFO is found before it is read.
    Stricter than files.checked_file, which follows links that stay inside a checkpoint: the store refuses
    every link, since it never writes one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    if stat.S_ISLNK(mode):
        return f"is a symlink (to {os.readlink(path)}); the store's files are never links"
    if stat.S_ISREG(mode):
        return None
    return f"is {file_kind(mode)}, not a regular file"


def _open_new(path: Path, mode: str = "wb") -> Any:
    """Open a file of the store or its build for writing ("wb", "r+b" to resume, "a" for the lock), never
    through a symlink (O_NOFOLLOW) nor into a FIFO or device: one planted in `<store>.partial` would otherwise
    receive the tokens, and a symlinked tokens file is what a later read would trust."""
    flags = {"wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "r+b": os.O_RDWR, "a": os.O_WRONLY | os.O_CREAT,
             "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC}[mode]
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)  # O_NONBLOCK: a FIFO cannot block us
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StoreError(f"{path}: {_own_file_problem(path)}: refusing to write through it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError(f"{path}: {_own_file_problem(path)}: refusing to write into it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode)


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(the JSON value of a file the builder wrote, None) or (None, why it cannot be read), never raising.
    Parsed by corpus.parse_record, the jsonl readers' parser: the same size and nesting limits."""
    problem = _own_file_problem(path)
    if problem is not None:
        return None, problem
    size = path.stat().st_size
    if size > corpus.MAX_LINE_BYTES:  # an index is kilobytes: do not read a planted multi-GB file
        return None, f"is {size} bytes, more than an index can be ({corpus.MAX_LINE_BYTES})"
    return corpus.parse_record(path.read_bytes())


_RECORD_KEYS = {"source", "key", "n_tokens", "documents", "offset", "line", "max_id"}  # progress and done markers


def _read_record(path: Path) -> dict | None:
    """A progress or done marker (None: there is none); a damaged one ({} here) never matches, so its file
    is tokenized again."""
    if not os.path.lexists(path):
        return None
    d, problem = _read_json(path)
    return d if problem is None and isinstance(d, dict) and _RECORD_KEYS <= d.keys() else {}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is no count


# index.json's keys: (check of the value, what it must be). In order: a later check may rely on an earlier one.
_INDEX_RULES: list[tuple[str, Callable[[Any, dict], bool], str]] = [
    ("version", lambda v, i: v == STORE_VERSION, f"{STORE_VERSION} (a store of another version is rebuilt)"),
    ("complete", lambda v, i: v is True, "true (written last, by a finished build)"),
    ("tokenizer", lambda v, i: isinstance(v, str), "the tokenizer's hash, a string"),
    ("eos_token_id", lambda v, i: v is None or (_is_int(v) and v >= 0), "null or an id >= 0"),
    ("specials_as_text", lambda v, i: isinstance(v, bool), "true or false"),
    ("dtype", lambda v, i: v in _DTYPES, f"one of {sorted(_DTYPES)}"),
    ("max_token_id", lambda v, i: _is_int(v) and 0 <= v <= np.iinfo(np.dtype(i["dtype"])).max,
     "an id >= 0 that 'dtype' can hold"),
    ("block_size", lambda v, i: _is_int(v) and v >= 1, "an integer >= 1"),
    ("n_tokens", lambda v, i: _is_int(v) and v >= 0, "an integer >= 0"),
    ("n_blocks", lambda v, i: v == i["n_tokens"] // i["block_size"], "n_tokens // block_size"),
    ("documents", lambda v, i: _is_int(v) and 0 <= v <= i["n_tokens"], "an integer in [0, n_tokens]"),
    ("max_id", lambda v, i: _is_int(v) and -1 <= v <= i["max_token_id"] and (v >= 0) == (i["n_tokens"] > 0),
     "the largest id stored, at most max_token_id (-1 for no tokens)"),
    ("sources", lambda v, i: isinstance(v, list) and all(
        isinstance(s, dict) and isinstance(s.get("path"), str) and all(_is_int(s.get(k)) for k in
                                                                       ("size", "mtime_ns", "n_tokens"))
        for s in v) and sum(s["n_tokens"] for s in v) == i["n_tokens"],
     "a list of {path, size, mtime_ns, n_tokens} whose n_tokens add up to n_tokens"),
]


def _index_problem(path: Path) -> tuple[dict | None, str | None]:
    """(the index of the finished store at `path`, None) or (None, a sentence naming the file and key)."""
    index_path, tokens = path / INDEX, path / TOKENS
    index, problem = _read_json(index_path)
    if problem is None and not isinstance(index, dict):
        problem = f"is a JSON {type(index).__name__}, not an object"
    if problem is not None:
        return None, f"{index_path}: {problem}"
    for key, ok, expected in _INDEX_RULES:
        if key not in index:
            return None, f"{index_path}: no {key!r} key (not a finished store of this version)"
        if not ok(index[key], index):
            return None, f"{index_path}: {key!r} is {_short(index[key])}, expected {expected}"
    problem = _own_file_problem(tokens)
    if problem is not None:
        return None, f"{tokens}: {problem}"
    size, itemsize = tokens.stat().st_size, np.dtype(index["dtype"]).itemsize
    if size != index["n_tokens"] * itemsize:
        return None, (f"{tokens}: {size} bytes, but {index_path} says {index['n_tokens']} tokens ('n_tokens') of "
                      f"{itemsize} bytes ('dtype'): truncated or replaced")
    return index, None


def _short(value: Any, width: int = 120) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[:width] + "..."


def read_index(path: os.PathLike | str) -> dict:
    """The index of the finished store at `path`, every key checked for the type and range the builder writes
    and `tokens.bin` a regular file of the indexed size; else StoreError (FileNotFoundError: no index at all)."""
    path = Path(path)
    if not os.path.lexists(path / INDEX):
        raise FileNotFoundError(f"{path}: not a complete token store (no {INDEX}: never built, or a build that "
                                "has not finished)")
    index, problem = _index_problem(path)
    if problem is not None:
        raise StoreError(problem)
    return index


def is_complete(path: os.PathLike | str) -> bool:
    """Whether `path` holds a finished, well-formed store (`read_index` would accept it). Opens nothing that is
    not a regular file of the store."""
    return _index_problem(Path(path))[1] is None


def _expected(files: Sequence[str], tokenizer: Any, block_size: int, eos_token_id: int | None,
              specials_as_text: bool) -> dict:
    """What index.json must say for this run: every key that decides which ids are stored, how wide they are
    and how they are cut into blocks."""
    _check_block_size(block_size)
    top = max(max_token_id(tokenizer), -1 if eos_token_id is None else eos_token_id)
    if top >= 1 << 31:  # ids travel as int32 (corpus.encode_texts)
        raise StoreError(f"the tokenizer's largest id is {top}, more than a token store holds (2**31 - 1)")
    return {"tokenizer": _tokenizer_hash(tokenizer), "eos_token_id": eos_token_id,
            "specials_as_text": specials_as_text, "block_size": block_size, "max_token_id": top,
            "dtype": token_dtype(top + 1).str, "sources": [file_identity(f) for f in files]}


def _disagreement(path: Path, index: dict, expected: dict) -> str | None:
    """The first index key that disagrees with the run, as a sentence naming the file and key, or None."""
    for key, want in expected.items():
        have = index[key]
        if key == "sources":  # the index adds each file's token count
            have = [{k: s[k] for k in ("path", "size", "mtime_ns")} for s in have]
        if have != want:
            return f"{path / INDEX}: {key!r} is {_short(have)}, this run's is {_short(want)}"
    return None


def _store_problem(path: Path, expected: dict | None) -> str | None:
    index, problem = _index_problem(path)
    return problem if problem is not None or expected is None else _disagreement(path, index, expected)


def check_store(path: os.PathLike | str, files: Sequence[str], tokenizer: Any, block_size: int,
                eos_token_id: int | None, specials_as_text: bool = False) -> dict:
    """The index of the store at `path` if it is finished, well formed and agrees with this run (the files as
    they are now, the tokenizer, EOS, block_size...); else StoreError naming the file and the key."""
    index = read_index(path)
    problem = _disagreement(Path(path), index, _expected(files, tokenizer, block_size, eos_token_id,
                                                         specials_as_text))
    if problem is not None:
        raise StoreError(problem)
    return index


def _refuse_foreign(path: Path) -> None:
    """StoreError if the directory `path` holds anything a build does not write there (its two files, as
    regular files, and part-* leftovers of a build killed after its final rename): such a store is neither
    read nor replaced, and nothing in it is deleted."""
    if not os.path.lexists(path):
        return
    if not path.is_dir() or path.is_symlink():
        raise StoreError(f"{path}: {_own_file_problem(path) or 'is a file'}, where the token store's directory "
                         "belongs: move it away")
    for name in (INDEX, TOKENS):
        problem = _own_file_problem(path / name)
        if problem not in (None, "does not exist"):
            raise StoreError(f"{path / name}: {problem}: the store is not used; remove {path} to rebuild it")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in (INDEX, TOKENS) and not p.name.startswith("part-"))
    if foreign:
        raise StoreError(f"{path}: holds {', '.join(foreign[:5])}, which a token store never holds: the store is "
                         "not used and nothing in it deleted; move them away or remove the directory")


def _remove_store(path: Path) -> None:
    """Remove a store the builder is about to replace: only the names it writes (_refuse_foreign has checked
    that there is nothing else), then the directory."""
    if os.path.lexists(path):
        for p in path.iterdir():
            p.unlink()
        path.rmdir()


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an flock on the file `lock`, and remove the file on the way out (no `.lock` left beside a store).

    Removing is safe because every holder checks, once locked, that the path still names the file it locked:
    a waiter that locked a file the holder removed meanwhile retries on a new one, so two builders never
    hold "the" lock at once. A killed holder's lock dies with its process (the kernel drops flocks): a
    leftover file never blocks a rebuild.
    """
    while True:
        f = _open_new(lock, "a")
        fcntl.flock(f, fcntl.LOCK_EX)  # another builder of the same store: wait for it, then find it complete
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before unlocking: a waiter then sees its file gone and retries
        f.close()


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _open_new(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def _build_errors(path: Path) -> Iterator[None]:
    """An OSError while building (a full disk, a quota, a file-size limit) as one StoreError sentence naming
    the file; what the build finished stays in `<path>.partial`, and a rerun resumes from it."""
    try:
        yield
    except OSError as e:
        where = e.filename or _partial(path)
        raise StoreError(f"{where}: {e.strerror or e} while building the token store {path} (nothing installed "
                         f"there); free space, or fix the cause, and rerun: the build resumes from "
                         f"{_partial(path)}") from e


def build_store(path: os.PathLike | str, files: Sequence[str], tokenizer: Any, block_size: int,
                eos_token_id: int | None, workers: int = 0, batch_docs: int = 1000, batch_chars: int = 1 << 22,
                specials_as_text: bool = False, segment_bytes: int = 1 << 26,
                log: Callable[[str], None] | None = None) -> BuildReport:
    """Tokenize `files` into a store at `path` (a directory); nothing to do when it is already complete and
    agrees with this call (`check_store`); a store that disagrees is rebuilt, with a warning naming the key.

    `workers`: tokenizer processes (0: tokenize in this process). `tokenizer`: an HF fast tokenizer or a
    tokenizers.Tokenizer. Ids as `tokenizer(text, add_special_tokens=False)` (special-token strings in the
    text become their ids unless `specials_as_text`), EOS after every document when `eos_token_id` is set.
    A malformed jsonl line raises ValueError("file:line: ...") and leaves the finished parts for a rerun.
    `segment_bytes`: source bytes between two commits of a file's progress (what a killed build resumes from).
    """
    path, log = Path(path), log or (lambda s: None)
    expected = _expected(files, tokenizer, block_size, eos_token_id, specials_as_text)
    report, t0 = BuildReport(), time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(_lock(path)):
        _refuse_foreign(path)
        problem = _store_problem(path, expected)
        if problem is None:
            for leftover in path.glob("part-*"):  # a build killed just after its final rename left these
                leftover.unlink()
            return report
        if os.path.lexists(path / INDEX):  # a store was there: say why it is not used
            warnings.warn(f"{problem}: rebuilding the token store {path}")
            log(f"{problem}: rebuilding the token store {path}")
        with _build_errors(path):
            _build(path, files, tokenizer, expected, workers, batch_docs, batch_chars, specials_as_text,
                   segment_bytes, log, report)
    report.seconds = time.perf_counter() - t0
    return report


def _build(path: Path, files: Sequence[str], tokenizer: Any, expected: dict, workers: int, batch_docs: int,
           batch_chars: int, specials_as_text: bool, segment_bytes: int, log: Callable[[str], None],
           report: BuildReport) -> None:
    """build_store's work, under its lock: the parts, then tokens.bin, index.json, and the rename."""
    dtype, eos_token_id, top = np.dtype(expected["dtype"]), expected["eos_token_id"], expected["max_token_id"]
    sources = expected["sources"]
    key = hashlib.sha256(json.dumps([expected["tokenizer"], eos_token_id, dtype.str, specials_as_text])
                         .encode()).hexdigest()[:16]
    partial = _partial(path)
    partial.mkdir(exist_ok=True)
    if partial.is_symlink() or not partial.is_dir():
        raise StoreError(f"{partial}: {_own_file_problem(partial)}: the build's directory must be a plain directory")
    parts = []
    with _Tokenizers(tokenizer, eos_token_id, dtype, workers, specials_as_text) as toks:
        for i, (f, src) in enumerate(zip(files, sources)):
            part, marker = partial / f"part-{i:05d}.bin", partial / f"part-{i:05d}.json"
            done = _read_record(marker)
            if (done and done["source"] == src and done["key"] == key and _own_file_problem(part) is None
                    and part.stat().st_size == done["n_tokens"] * dtype.itemsize):
                report.files_reused += 1
                report.documents_reused += done["documents"]
                log(f"{f}: reusing {part} ({done['n_tokens']} tokens) from an earlier build")
            else:
                tmp, progress = part.with_name(part.name + ".tmp"), part.with_suffix(".progress.json")
                done = _read_record(progress)
                resume = (bool(done) and done["source"] == src and done["key"] == key
                          and _own_file_problem(tmp) is None
                          and tmp.stat().st_size >= done["n_tokens"] * dtype.itemsize)
                if resume:
                    report.documents_reused += done["documents"]
                    log(f"{f}: resuming at byte {done['offset']} (line {done['line']}: {done['documents']} "
                        f"documents, {done['n_tokens']} tokens committed by an earlier build)")
                else:
                    if done is not None:
                        warnings.warn(f"{f}: the earlier build's progress ({progress}) is for another version "
                                      "of the file (size or mtime changed), another tokenizer, or its tokens "
                                      "are gone: tokenizing the file from the start")
                    # the old record goes before the tokens file is emptied: left in place, a later build
                    # under the record's tokenizer would resume onto this build's tokens
                    progress.unlink(missing_ok=True)
                    done = {"source": src, "key": key, "n_tokens": 0, "documents": 0, "offset": 0, "line": 0,
                            "max_id": -1}
                with _open_new(tmp, "r+b" if resume else "wb") as out:
                    out.truncate(done["n_tokens"] * dtype.itemsize)  # drop tokens written after the last commit
                    out.seek(0, os.SEEK_END)
                    committed = done["offset"]
                    batches = _text_batches(f, batch_docs, batch_chars, done["offset"], done["line"])
                    for flat, n_docs, (offset, line), batch_top in toks.map(batches):
                        if batch_top > top:  # never written: it would have wrapped in the dtype
                            raise StoreError(f"{f}: the tokenizer produced id {batch_top} (before line {line}), "
                                             f"above the largest id of its vocabulary, {top}: not stored")
                        out.write(flat.tobytes())  # (tokens,) of the batch, documents in order, EOS after each
                        done.update(n_tokens=done["n_tokens"] + len(flat), documents=done["documents"] + n_docs,
                                    offset=offset, line=line, max_id=max(done["max_id"], batch_top))
                        report.documents_tokenized += n_docs
                        if offset - committed >= segment_bytes:  # commit: the tokens are on disk, then say so
                            out.flush()
                            os.fsync(out.fileno())
                            _fsync_write(progress, json.dumps(done))
                            committed = offset
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, part)
                _fsync_write(marker, json.dumps(done))  # the part counts as finished only from here on
                progress.unlink(missing_ok=True)
                report.files_built += 1
                log(f"{f}: {done['n_tokens']} tokens")
            parts.append((part, done))
    n_tokens = sum(d["n_tokens"] for _, d in parts)
    tokens = partial / TOKENS
    if len(parts) == 1:
        os.replace(parts[0][0], tokens)  # one source file: its part is the token file, no copy
    else:
        with _open_new(tokens) as out:
            for part, _ in parts:
                with open(part, "rb") as src_f:  # a regular file of this build (checked or written above)
                    shutil.copyfileobj(src_f, out, 1 << 22)
            out.flush()
            os.fsync(out.fileno())
    has_eos = eos_token_id is not None and n_tokens > 0
    index = {"version": STORE_VERSION, "dtype": dtype.str, "n_tokens": n_tokens, "block_size": expected["block_size"],
             "n_blocks": n_tokens // expected["block_size"], "eos_token_id": eos_token_id,
             "documents": sum(d["documents"] for _, d in parts),
             "tokenizer": expected["tokenizer"], "max_token_id": top,
             "max_id": max([d["max_id"] for _, d in parts] + [eos_token_id if has_eos else -1]),
             "specials_as_text": specials_as_text,
             "sources": [{**s, "n_tokens": d["n_tokens"]} for s, (_, d) in zip(sources, parts)],
             "complete": True}
    _fsync_write(partial / INDEX, json.dumps(index, indent=1))  # the completeness marker: written last
    _remove_store(path)  # an incomplete or disagreeing store under the final name (checked: only its own files)
    os.replace(partial, path)  # the store appears complete, or not at all
    for leftover in path.glob("part-*"):  # kept until now: a kill before the rename still resumes from them
        leftover.unlink()
    report.documents, report.tokens = index["documents"], n_tokens


def wait_for_store(path: os.PathLike | str, timeout_s: float = 6 * 3600, poll_s: float = 1.0,
                   expected: dict | None = None) -> None:
    """Block until another process (the building rank) has finished the store at `path` (and, given
    `expected` from `_expected`, one that agrees with this run: the builder replaces one that does not)."""
    path, t0 = Path(path), time.monotonic()
    while (problem := _store_problem(path, expected)) is not None:
        _refuse_foreign(path)  # the builder refuses such a store too: no point waiting for it
        if time.monotonic() - t0 > timeout_s:
            state = "a partial build exists" if _partial(path).exists() else "no build has started"
            raise TimeoutError(f"waited {timeout_s:.0f}s for the token store {path} to be built by the main "
                               f"process ({state}: {_partial(path)}; last seen: {problem}); if that process died, "
                               "rerun, and the build resumes from its finished files")
        time.sleep(poll_s)


def open_store(path: os.PathLike | str, files: Sequence[str], tokenizer: Any, block_size: int,
               eos_token_id: int | None, build: bool, workers: int = 0, timeout_s: float = 6 * 3600,
               log: Callable[[str], None] | None = None) -> "StoreDataset":
    """The store's dataset on every rank: the rank with `build=True` builds it (if needed), the others wait.
    Either way the store agrees with the arguments (`check_store`), or this raises StoreError."""
    if build:
        build_store(path, files, tokenizer, block_size, eos_token_id, workers=workers, log=log)
    else:
        wait_for_store(path, timeout_s, expected=_expected(files, tokenizer, block_size, eos_token_id, False))
    return StoreDataset(path, block_size=block_size)


# ---- reading ----------------------------------------------------------------------------------------------------

class StoreDataset(torch.utils.data.Dataset):
    """Blocks [start, stop) of a store as causal-LM examples {"input_ids", "labels"} (int64, labels = input_ids).

    Deterministic: item i is the same block in every process and every run on the same store, so a
    seeded sampler's resume (the Trainer skips the batches it has trained) lands on the same next block.
    `block_size`: the run's; a store of another is refused (by default the index's is taken).
    Every block read is checked against the index: a short read (the file shrank) or an id above `max_id`
    (the file was changed after the build) is a StoreError, not a batch.
    """

    def __init__(self, path: os.PathLike | str, start: int = 0, stop: int | None = None,
                 block_size: int | None = None):
        self.path = Path(path)
        self.index = read_index(self.path)
        if block_size is not None:
            _check_block_size(block_size)
            if block_size != self.index["block_size"]:
                raise StoreError(f"{self.path / INDEX}: 'block_size' is {self.index['block_size']}, this run's is "
                                 f"{block_size}")
        self.dtype = np.dtype(self.index["dtype"])
        self.block_size = self.index["block_size"]
        self.max_id, self.max_id_from = self.index["max_id"], f"{self.path / INDEX} ('max_id')"
        n = self.index["n_blocks"]
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise ValueError(f"blocks [{start}, {stop}) outside the store's {n} blocks")
        self.start, self.stop = start, stop
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return self.stop - self.start

    def block(self, i: int) -> np.ndarray:
        """Token ids of block i, (block_size,) in the store's dtype."""
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} of {len(self)}")
        if self._pid != os.getpid():  # first use in this process (a DataLoader worker gets its own descriptor)
            self._fd, self._pid = os.open(self.path / TOKENS, os.O_RDONLY | os.O_NOFOLLOW), os.getpid()
        nbytes = self.block_size * self.dtype.itemsize
        buf = os.pread(self._fd, nbytes, (self.start + i) * nbytes)
        ids = np.frombuffer(buf, self.dtype)
        if len(buf) != nbytes or ids.max() > self.max_id:  # one pass over block_size ids: cheap beside a step
            found = f"{len(buf)} of {nbytes} bytes" if len(buf) != nbytes else f"id {ids.max()}"
            raise StoreError(f"{self.path / TOKENS}: block {self.start + i} holds {found}, not what "
                             f"{self.path / INDEX} records ('n_tokens', 'max_id' {self.max_id}): the file changed after the build; remove "
                             f"{self.path} to rebuild it")
        return ids

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.block(i).astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}

    def __getstate__(self) -> dict:  # spawned DataLoader workers: reopen the file there
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)


def check_ids_fit(data: "StoreDataset | StreamingBlocks", vocab_size: int) -> None:
    """Refuse, before training, data whose token ids reach past the model's embedding (`vocab_size` rows):
    otherwise the first batch holding such an id ends in an IndexError deep in the embedding, mid-run.

    A store's largest id is the one its index records (`max_id`, counted at build time; every block read is
    checked against it); a stream's is the tokenizer's largest (`max_token_id`, EOS included)."""
    if data.max_id >= vocab_size:
        raise StoreError(f"{data.max_id_from}: token ids go up to {data.max_id}, past the model's vocabulary of "
                         f"{vocab_size} (ids 0..{vocab_size - 1}): train with the tokenizer the model was made for, "
                         f"or a model with vocab_size >= {data.max_id + 1}")


def split_sizes(n_blocks: int, validation_split_percentage: float) -> tuple[int, int]:
    """(validation, train) block counts: run_clm's `train[:p%]` / `train[p%:]`, datasets' rounding."""
    if not 0 <= validation_split_percentage < 100:
        raise ValueError(f"validation_split_percentage must be in [0, 100), got {validation_split_percentage}")
    n_val = int(round(validation_split_percentage * n_blocks / 100.0))
    if validation_split_percentage > 0 and (n_val == 0 or n_val == n_blocks):
        raise ValueError(f"validation_split_percentage={validation_split_percentage} of {n_blocks} blocks leaves "
                         f"{n_val} for validation and {n_blocks - n_val} for training")
    return n_val, n_blocks - n_val


def store_splits(path: os.PathLike | str, validation_split_percentage: float = 0
                 ) -> tuple[StoreDataset, StoreDataset | None]:
    """(train, validation) from one store, as run_clm splits a dataset without a validation file:
    the first p% of blocks validate, the rest train (contiguous, so no document straddles the two
    except at the one boundary block). p = 0: (all blocks, None)."""
    full = StoreDataset(path)
    n_val, _ = split_sizes(len(full), validation_split_percentage)
    if n_val == 0:
        return full, None
    return StoreDataset(path, n_val, len(full)), StoreDataset(path, 0, n_val)


# ---- streaming: no store, sharded over ranks x DataLoader workers ----------------------------------------------

class StreamingBlocks(torch.utils.data.IterableDataset):
    """Blocks produced lazily from the jsonl files (`--streaming`): one pass per epoch, nothing on disk.

    Documents are taken in windows of `window_docs`; each window is tokenized and cut into blocks on its
    own (its tail, < block_size tokens, is dropped: as run_clm's group_texts per map batch), so the set of
    blocks does not depend on how the work is split. Window w belongs to shard w % S of the S = world_size x
    DataLoader workers shards (shard = rank x workers + worker id): every block is yielded exactly once per
    epoch across all ranks and workers, and each shard tokenizes only its own windows (it still reads and
    parses every line, which costs a few % of tokenizing).

    Under the HF Trainer keep rank=0, world_size=1: accelerate already splits an IterableDataset over ranks
    (rank 0 reads and dispatches batches by default); the DataLoader workers are split here.
    """

    def __init__(self, files: Sequence[str], tokenizer: Any, block_size: int, eos_token_id: int | None,
                 window_docs: int = 1000, rank: int = 0, world_size: int = 1, specials_as_text: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        _check_block_size(block_size)
        self.files, self.tokenizer, self.block_size, self.eos = list(files), tokenizer, block_size, eos_token_id
        self.window_docs, self.rank, self.world_size, self.specials_as_text = window_docs, rank, world_size, specials_as_text

    @property
    def max_id(self) -> int:
        """The largest id a block can hold (for check_ids_fit): the tokenizer's largest, or EOS."""
        return max(max_token_id(self.tokenizer), -1 if self.eos is None else self.eos)

    max_id_from = "the tokenizer (its largest id, added tokens included)"

    def shard(self) -> tuple[int, int]:
        """(this shard's number, number of shards) in the calling process."""
        info = torch.utils.data.get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * n_workers + worker, self.world_size * n_workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        shard, n_shards = self.shard()
        texts = (t for f in self.files for t in corpus.iter_pretrain_texts(f))
        for w, window in enumerate(corpus.batched(texts, self.window_docs)):
            if w % n_shards != shard:
                continue
            ids = corpus.encode_texts(self.tokenizer, window, specials_as_text=self.specials_as_text)
            flat = _stream(ids, self.eos, np.dtype(np.int64))
            n = len(flat) // self.block_size
            for row in flat[: n * self.block_size].reshape(n, self.block_size):  # (n, block_size)
                ids_t = torch.from_numpy(row.copy())
                yield {"input_ids": ids_t, "labels": ids_t.clone()}

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

import fcntl
import hashlib
import json
import os
import shutil
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

STORE_VERSION = 1
INDEX = "index.json"
TOKENS = "tokens.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _backend(tokenizer: Any) -> Any:
    return getattr(tokenizer, "backend_tokenizer", tokenizer)  # HF fast tokenizer -> tokenizers.Tokenizer


def _file_identity(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


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


def _tokenize_batch(batch: tuple[list[str], Any]) -> tuple[np.ndarray, int, Any]:
    """(the batch's token stream in the store's dtype, number of documents, the batch's position: passed on)."""
    texts, position = batch
    w = _WORKER
    ids = corpus.encode_texts(w["tok"], texts, specials_as_text=w["specials_as_text"])
    return _stream(ids, w["eos"], w["dtype"]), len(texts), position


def _text_batches(path: str, batch_docs: int, batch_chars: int, offset: int = 0, line: int = 0
                  ) -> Iterator[tuple[list[str], tuple[int, int]]]:
    """The file's documents from byte `offset` (just after line `line`) on, in lists of at most batch_docs
    documents and about batch_chars characters, each with (byte offset, line) just after its last document.

    (Not corpus.iter_pretrain_texts: a resumed build seeks to a committed offset, and needs the offsets.)
    """
    batch, chars = [], 0
    with open(path, "rb") as f:
        f.seek(offset)
        for line, raw in enumerate(f, line + 1):
            offset += len(raw)
            if not raw.strip():  # blank lines are no documents (as in corpus.iter_jsonl)
                continue
            text, reason = corpus.parse_record(raw, "text", corpus.check_text)  # iter_pretrain_texts' rules
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

    def map(self, batches: Iterator[tuple[list[str], Any]]) -> Iterator[tuple[np.ndarray, int, Any]]:
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


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_RECORD_KEYS = {"source", "key", "n_tokens", "documents", "offset", "line"}  # a part's progress and done markers


def _read_record(path: Path) -> dict | None:
    """A progress or done marker; a damaged one ({} here) never matches, so its file is tokenized again."""
    d = _read_json(path)
    return d if d is None or (isinstance(d, dict) and _RECORD_KEYS <= d.keys()) else {}


def is_complete(path: os.PathLike | str) -> bool:
    """Whether `path` holds a finished store (index written last, token file of the indexed size)."""
    path = Path(path)
    index = _read_json(path / INDEX)
    if not index or not index.get("complete") or index.get("version") != STORE_VERSION:
        return False
    try:
        return (path / TOKENS).stat().st_size == index["n_tokens"] * np.dtype(index["dtype"]).itemsize
    except OSError:
        return False


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an flock on the file `lock`, and remove the file on the way out (no `.lock` left beside a store).

    Removing is safe because every holder checks, once locked, that the path still names the file it locked:
    a waiter that locked a file the holder removed meanwhile retries on a new one, so two builders never
    hold "the" lock at once. A killed holder's lock dies with its process (the kernel drops flocks): a
    leftover file never blocks a rebuild.
    """
    while True:
        f = open(lock, "a")
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
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_store(path: os.PathLike | str, files: Sequence[str], tokenizer: Any, block_size: int,
                eos_token_id: int | None, workers: int = 0, batch_docs: int = 1000, batch_chars: int = 1 << 22,
                specials_as_text: bool = False, segment_bytes: int = 1 << 26,
                log: Callable[[str], None] | None = None) -> BuildReport:
    """Tokenize `files` into a store at `path` (a directory); nothing to do when it is already complete.

    `workers`: tokenizer processes (0: tokenize in this process). `tokenizer`: an HF fast tokenizer or a
    tokenizers.Tokenizer. Ids as `tokenizer(text, add_special_tokens=False)` (special-token strings in the
    text become their ids unless `specials_as_text`), EOS after every document when `eos_token_id` is set.
    A malformed jsonl line raises ValueError("file:line: ...") and leaves the finished parts for a rerun.
    `segment_bytes`: source bytes between two commits of a file's progress (what a killed build resumes from).
    """
    path, log = Path(path), log or (lambda s: None)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    report, t0 = BuildReport(), time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(_lock(path)):
        if is_complete(path):
            for leftover in path.glob("part-*"):  # a build killed just after its final rename left these
                leftover.unlink()
            return report
        vocab = _backend(tokenizer).get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(max(vocab, (eos_token_id or 0) + 1))
        sources = [_file_identity(f) for f in files]
        key = hashlib.sha256(json.dumps([_backend(tokenizer).to_str(), eos_token_id, dtype.str, specials_as_text])
                             .encode()).hexdigest()[:16]
        partial = _partial(path)
        partial.mkdir(exist_ok=True)
        parts = []
        with _Tokenizers(tokenizer, eos_token_id, dtype, workers, specials_as_text) as toks:
            for i, (f, src) in enumerate(zip(files, sources)):
                part, marker = partial / f"part-{i:05d}.bin", partial / f"part-{i:05d}.json"
                done = _read_record(marker)
                if (done and done["source"] == src and done["key"] == key and part.exists()
                        and part.stat().st_size == done["n_tokens"] * dtype.itemsize):
                    report.files_reused += 1
                    report.documents_reused += done["documents"]
                    log(f"{f}: reusing {part} ({done['n_tokens']} tokens) from an earlier build")
                else:
                    tmp, progress = part.with_name(part.name + ".tmp"), part.with_suffix(".progress.json")
                    done = _read_record(progress)
                    resume = (bool(done) and done["source"] == src and done["key"] == key and tmp.exists()
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
                        done = {"source": src, "key": key, "n_tokens": 0, "documents": 0, "offset": 0, "line": 0}
                    with open(tmp, "r+b" if resume else "wb") as out:
                        out.truncate(done["n_tokens"] * dtype.itemsize)  # drop tokens written after the last commit
                        out.seek(0, os.SEEK_END)
                        committed = done["offset"]
                        batches = _text_batches(f, batch_docs, batch_chars, done["offset"], done["line"])
                        for flat, n_docs, (offset, line) in toks.map(batches):
                            out.write(flat.tobytes())  # (tokens,) of the batch, documents in order, EOS after each
                            done.update(n_tokens=done["n_tokens"] + len(flat), documents=done["documents"] + n_docs,
                                        offset=offset, line=line)
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
            with open(tokens, "wb") as out:
                for part, _ in parts:
                    with open(part, "rb") as src_f:
                        shutil.copyfileobj(src_f, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
        index = {"version": STORE_VERSION, "dtype": dtype.str, "n_tokens": n_tokens, "block_size": block_size,
                 "n_blocks": n_tokens // block_size, "eos_token_id": eos_token_id,
                 "documents": sum(d["documents"] for _, d in parts),
                 "vocab_size": vocab, "specials_as_text": specials_as_text,
                 "sources": [{**s, "n_tokens": d["n_tokens"]} for s, (_, d) in zip(sources, parts)],
                 "complete": True}
        _fsync_write(partial / INDEX, json.dumps(index, indent=1))  # the completeness marker: written last
        if path.exists():  # an incomplete leftover under the final name (not written by this code): replace it
            shutil.rmtree(path)
        os.replace(partial, path)  # the store appears complete, or not at all
        for leftover in path.glob("part-*"):  # kept until now: a kill before the rename still resumes from them
            leftover.unlink()
        report.documents, report.tokens = index["documents"], n_tokens
    report.seconds = time.perf_counter() - t0
    return report


def wait_for_store(path: os.PathLike | str, timeout_s: float = 6 * 3600, poll_s: float = 1.0) -> None:
    """Block until another process (the building rank) has finished the store at `path`."""
    path, t0 = Path(path), time.monotonic()
    while not is_complete(path):
        if time.monotonic() - t0 > timeout_s:
            state = "a partial build exists" if _partial(path).exists() else "no build has started"
            raise TimeoutError(f"waited {timeout_s:.0f}s for the token store {path} to be built by the main "
                               f"process ({state}: {_partial(path)}); if that process died, rerun, and the build "
                               "resumes from its finished files")
        time.sleep(poll_s)


def open_store(path: os.PathLike | str, files: Sequence[str], tokenizer: Any, block_size: int,
               eos_token_id: int | None, build: bool, workers: int = 0, timeout_s: float = 6 * 3600,
               log: Callable[[str], None] | None = None) -> "StoreDataset":
    """The store's dataset on every rank: the rank with `build=True` builds it (if needed), the others wait."""
    if build:
        build_store(path, files, tokenizer, block_size, eos_token_id, workers=workers, log=log)
    else:
        wait_for_store(path, timeout_s)
    return StoreDataset(path)


# ---- reading ----------------------------------------------------------------------------------------------------

class StoreDataset(torch.utils.data.Dataset):
    """Blocks [start, stop) of a store as causal-LM examples {"input_ids", "labels"} (int64, labels = input_ids).

    Deterministic: item i is the same block in every process and every run on the same store, so a
    seeded sampler's resume (the Trainer skips the batches it has trained) lands on the same next block.
    """

    def __init__(self, path: os.PathLike | str, start: int = 0, stop: int | None = None,
                 block_size: int | None = None):
        self.path = Path(path)
        if not is_complete(self.path):
            raise FileNotFoundError(f"{self.path}: not a complete token store (no {INDEX} marked complete, or "
                                    f"{TOKENS} of another size)")
        self.index = json.loads((self.path / INDEX).read_text())
        self.dtype = np.dtype(self.index["dtype"])
        self.block_size = block_size or self.index["block_size"]
        n = self.index["n_tokens"] // self.block_size
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
            self._fd, self._pid = os.open(self.path / TOKENS, os.O_RDONLY), os.getpid()
        nbytes = self.block_size * self.dtype.itemsize
        buf = os.pread(self._fd, nbytes, (self.start + i) * nbytes)
        return np.frombuffer(buf, self.dtype)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.block(i).astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}

    def __getstate__(self) -> dict:  # spawned DataLoader workers: reopen the file there
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)


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
        self.files, self.tokenizer, self.block_size, self.eos = list(files), tokenizer, block_size, eos_token_id
        self.window_docs, self.rank, self.world_size, self.specials_as_text = window_docs, rank, world_size, specials_as_text

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

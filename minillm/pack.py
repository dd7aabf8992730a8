"""Packed training: several conversations (or documents) per row, each attending only to itself.

Why: real SFT sets are long-tailed (most chats short, a few long). Padding every sample to `max_len` (the
course) or to the batch's longest (transformers' DataCollatorForSeq2Seq) spends much of the compute on pad
tokens. Packing fills rows of `max_len` tokens with whole conversations instead.

How a packed row is made (exactly transformers' `DataCollatorWithFlattening` row, then padded):

    conversation A (3 tokens)      conversation B (2 tokens)   padding (its own "document")
    input_ids    a0   a1   a2        b0   b1                    pad  pad
    position_ids  0    1    2         0    1                      0    1
    labels     -100   a1   a2      -100   b1                   -100 -100

- `position_ids` restart at 0 for every conversation. With no attention_mask and no cache, both minillm's
  CausalLM and transformers' causal LMs (`use_cache=False`; with a cache transformers does not look for
  packing) start a new document wherever the position does not grow by 1, and each token attends only within
  its own document: every conversation computes what it would alone (parity/model.py checks it, <= 1e-6).
- The first label of each conversation is -100: otherwise the last token of A would be trained to predict b0,
  across the boundary. (The masker already gives it -100; the packer enforces it for any input.)
- Padding (when rows of a batch differ in length) is one more document with labels -100: it changes nothing.
- The loss: the model's loss is a sum over learned tokens divided by `num_items_in_batch`, which the HF Trainer
  counts over the whole optimizer step (all micro-batches, shifted labels). A packed step therefore learns
  from exactly the tokens of the unpacked step over the same conversations, with the same denominator: same
  loss, same gradients (tests/test_pack.py, both implementations, any batch x accumulation split).

Bin packing (`pack_rows`): shuffle all samples, take them `buffer` at a time, and put each, in the shuffled
order, into the open row of its window whose free space it fills most tightly (best fit; a new row when none
has room); then shuffle that window's rows. Measured on the bundled long-tailed chat mix (2,000 chats of 1-12
turn pairs, mean 73 tokens, max 330; rows of 512; parity/bench/sft_epoch.py):

    real tokens / row capacity    buffer 16: 0.799   64: 0.938   256: 0.969   1000: 0.976   all: 0.979
    best-fit *decreasing* (longest first) packs tighter (0.810 / 0.947 / 0.979 / 0.989 / 0.989) but builds
    length-stratified rows (conversations per row: sd 4.1 vs 1.8; rows of one long chat plus fillers, rows of
    only one-turn chats), and one epoch (HF Trainer, tiny model) ended at a held-out loss of 1.383-1.396 (3 seeds)
    against 1.286-1.309 for the shuffled order: it is available (`decreasing=True`), not the default.

The cost in ordering randomness: a conversation shares a row (and a step) only with conversations of its
own window, and best fit pairs long with short ones; which conversations form a window and the order of rows
are uniformly shuffled. Rows are fixed for a run (a map-style dataset needs a fixed length); the Trainer's
sampler reshuffles the order of rows every epoch.

Pretraining (`document_positions`): EOS-separated documents in a block get positions restarting after each
EOS and the first label of each document -100, so attention stops at each EOS (as Llama 3 trains) and each
document's loss terms are those it has alone.

Streaming (`StreamingPacker`): an IterableDataset over any re-iterable source, sharded over ranks x DataLoader
workers round-robin before any work is done on an item, so each item is read, transformed and packed by
exactly one shard.
"""

from __future__ import annotations

import bisect
import random
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Which samples go into which row
# ---------------------------------------------------------------------------------------------
def best_fit(lengths: Sequence[int], max_len: int, decreasing: bool = False) -> list[list[int]]:
    """Indices into `lengths` grouped into rows of at most `max_len` tokens: in the given order (or longest first,
    `decreasing`), each into the open row whose free space it fills most tightly, a new row when none has room."""
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted: bisect finds the tightest row with room
    rows: list[list[int]] = []
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if decreasing else range(len(lengths))
    for i in order:
        n = lengths[i]
        if not 0 < n <= max_len:
            raise ValueError(f"sample {i} has {n} tokens; packing needs 1..max_len={max_len} (truncate first)")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = max_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def pack_rows(lengths: Sequence[int], max_len: int, buffer: int = 1000, seed: int = 0,
              decreasing: bool = False) -> list[list[int]]:
    """Rows of sample indices: shuffle, best fit over windows of `buffer` samples (in the shuffled order, or
    longest first with `decreasing`), rows shuffled per window (module docstring). Every index appears in exactly
    one row."""
    if buffer < 1:
        raise ValueError(f"buffer must be >= 1, got {buffer}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    for start in range(0, len(order), buffer):
        window = order[start:start + buffer]
        packed = [[window[j] for j in row] for row in best_fit([lengths[i] for i in window], max_len, decreasing)]
        rng.shuffle(packed)
        rows += packed
    return rows


def efficiency(lengths: Sequence[int], rows: Sequence[Sequence[int]], max_len: int) -> float:
    """Real tokens / row capacity (rows x max_len)."""
    return sum(lengths[i] for row in rows for i in row) / (len(rows) * max_len)


# ---------------------------------------------------------------------------------------------
# Building rows and batches
# ---------------------------------------------------------------------------------------------
def pack_samples(samples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, list[int]]:
    """Masked samples ({"input_ids", "labels"}) -> one row: ids and labels concatenated, position_ids restarting at 0
    per sample, each sample's first label -100 (transformers' DataCollatorWithFlattening row)."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for k, s in enumerate(samples):
        n = len(s["input_ids"])
        if len(s["labels"]) != n:
            raise ValueError(f"sample {k}: {n} input_ids but {len(s['labels'])} labels")
        if n == 0:
            raise ValueError(f"sample {k} is empty")
        ids += list(s["input_ids"])
        labels += [IGNORE_INDEX, *s["labels"][1:]]
        pos += range(n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


class PackedDataset(torch.utils.data.Dataset):
    """A map-style dataset of packed rows over a map-style dataset of masked samples (e.g. finetune.py's
    SFTDataset). Rows are chosen once (`pack_rows`, seeded); `lengths` (tokens per sample) avoids reading every
    sample to measure it."""

    def __init__(self, samples: Any, max_len: int, buffer: int = 1000, seed: int = 0,
                 lengths: Sequence[int] | None = None, decreasing: bool = False):
        self.samples = samples
        if lengths is None:
            lengths = [len(samples[i]["input_ids"]) for i in range(len(samples))]
        if len(lengths) != len(samples):
            raise ValueError(f"{len(lengths)} lengths for {len(samples)} samples")
        self.lengths = [int(n) for n in lengths]
        self.max_len = max_len
        self.rows = pack_rows(self.lengths, max_len, buffer, seed, decreasing)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return pack_samples([self.samples[j] for j in self.rows[i]])

    def efficiency(self) -> float:
        return efficiency(self.lengths, self.rows, self.max_len)


class PackedCollator:
    """Packed rows -> {"input_ids", "position_ids", "labels"} tensors (B, W), no attention_mask (its absence is
    what makes both models look for document boundaries in position_ids; transformers needs use_cache=False).

    Rows shorter than W (the longest row, rounded up to `pad_to_multiple_of`, or `pad_to` when given: fixed-width
    batches, which accelerate's batch dispatching of an IterableDataset needs) are filled with one padding
    document: `pad_token_id`, positions 0, 1, ..., labels -100. A plain sample without position_ids is one
    document."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, pad_to: int | None = None):
        self.pad_token_id, self.pad_to_multiple_of, self.pad_to = pad_token_id, pad_to_multiple_of, pad_to

    def __call__(self, rows: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("empty batch")
        width = max(1, *(len(r["input_ids"]) for r in rows))  # >= 1: a batch of empty rows is one pad token wide
        if self.pad_to is not None:
            if width > self.pad_to:
                raise ValueError(f"a row of {width} tokens does not fit pad_to={self.pad_to}")
            width = self.pad_to
        elif self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(rows)
        ids = np.full((B, width), self.pad_token_id, dtype=np.int64)
        labels = np.full((B, width), IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros((B, width), dtype=np.int64)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            if len(r["labels"]) != n:
                raise ValueError(f"row {b}: {n} input_ids but {len(r['labels'])} labels")
            ids[b, :n] = r["input_ids"]
            labels[b, :n] = r["labels"]
            pos[b, :n] = r["position_ids"] if "position_ids" in r else np.arange(n)
            pos[b, n:] = np.arange(width - n)  # the padding: a document of its own
            if "position_ids" not in r:
                labels[b, 0] = IGNORE_INDEX
        return {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos),
                "labels": torch.from_numpy(labels)}


# ---------------------------------------------------------------------------------------------
# Pretraining: attention stops at each EOS
# ---------------------------------------------------------------------------------------------
def document_positions(input_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) blocks of EOS-separated documents -> (position_ids, labels), both (B, T).

    Positions count from 0 at the block's start and again after every EOS (the EOS ends its document), so with
    no attention_mask and no cache the models attend only within each document. labels = input_ids with each
    document's first token -100 (after an EOS; a block's first token is never a target anyway): predicting it
    from the previous document is exactly what the mask forbids. Each document then contributes the loss terms
    it has when run alone."""
    B, T = input_ids.shape
    after_eos = torch.zeros_like(input_ids, dtype=torch.bool)
    after_eos[:, 1:] = input_ids[:, :-1] == eos_token_id  # (B, T): a document starts here
    idx = torch.arange(T, device=input_ids.device).expand(B, T)
    start = torch.where(after_eos, idx, torch.zeros_like(idx)).cummax(dim=-1).values  # (B, T): own document's start
    labels = input_ids.masked_fill(after_eos, IGNORE_INDEX)
    return idx - start, labels


class DocumentMaskCollator:
    """For pretraining blocks ({"input_ids"} of equal length): {"input_ids", "position_ids", "labels"} with
    positions restarting after each EOS (`document_positions`), no attention_mask."""

    def __init__(self, eos_token_id: int):
        self.eos_token_id = eos_token_id

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.stack([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])  # (B, T)
        pos, labels = document_positions(ids, self.eos_token_id)
        return {"input_ids": ids, "position_ids": pos, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------
class StreamingPacker(torch.utils.data.IterableDataset):
    """Packed rows from a re-iterable `source` (a list, or an object whose __iter__ reads the files afresh).

    Shards: item i of the source belongs to shard i mod (world x workers), shard = rank x workers + worker id
    (DataLoader workers are found with get_worker_info), so every item is handled by exactly one shard. Each
    shard gathers `batch` of its items, turns them into masked samples with `transform` (e.g. minillm.sft's
    masker; it may drop items, which it should count), and packs every `buffer` samples as `pack_rows` does.
    A shard's last window is packed as it is: nothing is dropped or repeated.

    `rank`/`world`: the process's place among the data-parallel ranks. Under the HF Trainer, accelerate
    already splits an IterableDataset between processes (rank 0 reads and dispatches batches, by default), so
    pass rank=0, world=1 there; shard by rank here only when each process iterates its own DataLoader.

    `rows_multiple_of`: each shard ends its pass with empty rows ({} lists: all padding, labels -100, nothing
    learned) up to a multiple of this many rows. accelerate's dispatcher concatenates `world` loader batches and
    cuts them into equal slices: a short batch mid-stream (a DataLoader worker's last) loses its odd rows, and a
    last batch that does not divide by `world` is completed with rows of the epoch's first batch, learned twice.
    With every shard's row count a multiple of per_device_batch x world, every batch it sees is full.
    """

    def __init__(self, source: Iterable[Any], max_len: int, transform: Callable[[list], list[dict]] | None = None,
                 batch: int = 1000, buffer: int = 1000, seed: int = 0, rank: int = 0, world: int = 1,
                 rows_multiple_of: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..world-1 (world={world})")
        if rows_multiple_of < 1:
            raise ValueError(f"rows_multiple_of must be >= 1, got {rows_multiple_of}")
        self.source, self.max_len, self.transform = source, max_len, transform
        self.batch, self.buffer, self.seed, self.rank, self.world = batch, buffer, seed, rank, world
        self.rows_multiple_of = rows_multiple_of
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """A different shuffle each epoch (accelerate calls this on the dataset)."""
        self.epoch = epoch

    def _shard(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        return self.rank * workers + worker, self.world * workers

    def _samples(self, shard: int, shards: int) -> Iterator[dict]:
        items: list = []
        for i, item in enumerate(self.source):
            if i % shards == shard:
                items.append(item)
                if len(items) == self.batch:
                    yield from (self.transform(items) if self.transform else items)
                    items = []
        if items:
            yield from (self.transform(items) if self.transform else items)

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        shard, shards = self._shard()
        seed = hash((self.seed, self.epoch, shard)) & 0xFFFFFFFF  # ints hash to themselves: reproducible
        window: list[dict] = []
        rows = 0
        for sample in self._samples(shard, shards):
            window.append(sample)
            if len(window) == self.buffer:
                for row in self._pack(window, seed):
                    rows += 1
                    yield row
                seed, window = seed + 1, []
        if window:
            for row in self._pack(window, seed):
                rows += 1
                yield row
        for _ in range(-rows % self.rows_multiple_of):
            yield {"input_ids": [], "labels": [], "position_ids": []}  # PackedCollator fills it with padding

    def _pack(self, window: list[dict], seed: int) -> Iterator[dict[str, list[int]]]:
        rows = pack_rows([len(s["input_ids"]) for s in window], self.max_len, len(window), seed)
        for row in rows:
            yield pack_samples([window[j] for j in row])

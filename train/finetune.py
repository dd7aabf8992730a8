"""Supervised fine-tuning (full or LoRA), as the course's chapter-6 finetune.py, with --impl minillm|hf.

    deepspeed --num_gpus 2 train/finetune.py --impl minillm --model_name_or_path out/pretrain \
        --train_files minillm/data/sft.jsonl --max_len 256 --use_lora --lora_r 8 \
        --deepspeed ds_configs/zero2.json --output_dir out/sft
    python train/finetune.py      # no arguments: bundled SFT data on a random tiny model

Data: BelleGroup-style conversations rendered in ChatML, only the assistant replies (and their
<|im_end|>) labelled (minillm.sft); dropped or truncated samples are counted and logged. The masked
samples are cached; batches are padded per batch by minillm.sft.SFTCollator (labels -100 by position).
--packing packs the masked conversations into rows of --max_len tokens instead (minillm.pack: best fit over a
shuffled buffer of --packing_buffer conversations, positions restarting per conversation, each conversation's
first label -100, no attention_mask, so both implementations attend within each conversation only). The Trainer
divides the summed loss by the learned tokens of the whole optimizer step (num_items_in_batch), so a packed step
learns exactly what the unpacked step over the same conversations learns. Evaluation stays unpacked.
With --streaming --packing the rows are packed on the fly (minillm.pack.StreamingPacker) and padded to --max_len.
--peft lora|prefix|prompt|adapter (--use_lora is --peft lora): the chapter's efficient fine-tuning methods,
minillm's hand-written ones for --impl minillm, peft's for --impl hf (train/peft_methods.py; Houlsby adapters
are minillm's only). The adapter is saved in peft's format (adapter_config.json + adapter_model.safetensors)
either way, with the tokenizer files alongside; `python -m minillm.generate --model BASE --adapter OUT` chats.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from transformers import set_seed

from minillm.infra import corpus
from minillm.infra.files import model_fingerprint
from minillm.infra.store import split_sizes
from minillm.pack import PackedCollator, PackedDataset, StreamingPacker
from minillm.sft import MaskStats, SFTCollator, mask_batch

from train.args import DataTrainingArguments, ModelArguments, TrainingArguments, check_args, fail, parse_args
from train.caches import cache_path, cached, read_or_fail
from train.doctor import end_of_run_warning
from train.models import build_model, load_tokenizer, tokenizer_dir
from train.peft_methods import PeftArguments, add_peft, check_fits
from train.run import (ProcessGroupTimeout, check_resume, find_resume_checkpoint, reporting_lost_ranks, run_record,
                       setup_logging)
from train.trainer import Trainer, train_and_save

logger = logging.getLogger("minillm.train")

BATCH_CONVERSATIONS = 1000


def build_samples(files: list[str], tokenizer, max_len: int) -> dict[str, torch.Tensor]:
    """Masked samples, stored flat (one int32 tensor per column plus row offsets) for a compact cache."""
    stats = MaskStats()
    ids, labels = [], []
    for batch in corpus.batched(read_or_fail(corpus.iter_sft_conversations, files), BATCH_CONVERSATIONS):
        out = mask_batch(batch, tokenizer, max_len, stats=stats)
        ids += out["input_ids"]
        labels += out["labels"]
    logger.info(f"SFT data from {files}: {stats}")
    if not ids:
        raise SystemExit(f"finetune.py: error: no trainable sample in {files} ({stats})")
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    return {"input_ids": torch.from_numpy(np.concatenate(ids).astype(np.int32)),
            "labels": torch.from_numpy(np.concatenate(labels).astype(np.int32)),
            "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))}


class SFTDataset(torch.utils.data.Dataset):
    """Conversations [start, start + n) of the cached samples (n: all the rest, or at most `limit`)."""

    def __init__(self, samples: dict[str, torch.Tensor], limit: int | None = None, start: int = 0):
        self.samples, self.start = samples, start
        rest = len(samples["offsets"]) - 1 - start
        self.n = rest if limit is None else min(limit, rest)

    def __len__(self) -> int:
        return self.n

    def lengths(self) -> list[int]:
        offsets = self.samples["offsets"][self.start:self.start + self.n + 1]
        return (offsets[1:] - offsets[:-1]).tolist()

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        i += self.start
        a, b = self.samples["offsets"][i].item(), self.samples["offsets"][i + 1].item()
        return {"input_ids": self.samples["input_ids"][a:b].tolist(), "labels": self.samples["labels"][a:b].tolist()}


class StreamingSFT(torch.utils.data.IterableDataset):
    def __init__(self, files: list[str], tokenizer, max_len: int):
        self.files, self.tokenizer, self.max_len = files, tokenizer, max_len

    def __iter__(self):
        for batch in corpus.batched(read_or_fail(corpus.iter_sft_conversations, self.files), BATCH_CONVERSATIONS):
            out = mask_batch(batch, self.tokenizer, self.max_len)
            for ids, labels in zip(out["input_ids"], out["labels"]):
                yield {"input_ids": ids, "labels": labels}


class Conversations:
    """The raw conversations of `files`, read afresh on every iteration (a StreamingPacker source)."""

    def __init__(self, files: list[str]):
        self.files = files

    def __iter__(self):
        return read_or_fail(corpus.iter_sft_conversations, self.files)


def mask_conversations(batch: list, tokenizer, max_len: int) -> list[dict[str, list[int]]]:
    """StreamingPacker's transform (module level: DataLoader workers pickle it). Drops are logged per batch."""
    stats = MaskStats()
    out = mask_batch(batch, tokenizer, max_len, stats=stats)
    if stats.kept < stats.conversations:
        logger.warning(f"streamed SFT batch: {stats}")
    return [{"input_ids": i, "labels": l} for i, l in zip(out["input_ids"], out["labels"])]


def streaming_packer(files, tokenizer, data_args, training_args) -> StreamingPacker:
    """Packed rows streamed from `files`. accelerate dispatches an IterableDataset (rank 0 reads, every rank gets
    its slice), so the packer itself is not sharded by rank; each shard's rows are completed with empty rows to
    a multiple of per-device batch x ranks, which keeps accelerate from dropping or repeating rows."""
    if training_args.accelerator_config.dispatch_batches is False:
        fail("--streaming --packing needs accelerate's batch dispatching (the default): with dispatch_batches "
             "false every rank would read and train on the whole stream")
    return StreamingPacker(Conversations(files), data_args.max_len,
                           transform=functools.partial(mask_conversations, tokenizer=tokenizer,
                                                       max_len=data_args.max_len),
                           batch=BATCH_CONVERSATIONS, buffer=data_args.packing_buffer, seed=training_args.seed,
                           rows_multiple_of=training_args.per_device_train_batch_size * training_args.world_size)


def packed(ds: SFTDataset, data_args, training_args) -> PackedDataset:
    rows = PackedDataset(ds, data_args.max_len, data_args.packing_buffer, training_args.seed, lengths=ds.lengths())
    logger.info(f"Packed {len(ds)} conversations into {len(rows)} rows of {data_args.max_len} tokens "
                f"(real tokens / row capacity {rows.efficiency():.3f}; buffer {data_args.packing_buffer})")
    return rows


def dataset(files, tokenizer, data_args, training_args, limit=None, desc="train", validation_split: float = 0):
    """The masked conversations of `files`, and with `validation_split` > 0 the first that % of them held out
    (run_clm's `train[:N%]` / `train[N%:]`, rounded as minillm.infra.store.split_sizes): (train, validation or None)."""
    if data_args.streaming:
        return StreamingSFT(files, tokenizer, data_args.max_len), None
    path = cache_path(data_args, "sft", files, tokenizer, max_len=data_args.max_len)
    samples = cached(path, lambda: build_samples(files, tokenizer, data_args.max_len), training_args,
                     desc=f"masking {desc} conversations")
    if not validation_split:
        return SFTDataset(samples, limit), None
    try:
        n_val, _ = split_sizes(len(samples["offsets"]) - 1, validation_split)
    except ValueError as e:
        fail(f"--validation_split_percentage: {e}")
    logger.info(f"--validation_split_percentage {validation_split:g}: conversations [0, {n_val}) of {files} "
                "validate, the rest train")
    return SFTDataset(samples, limit, start=n_val), SFTDataset(samples, start=0, limit=n_val)


def main() -> None:
    model_args, data_args, peft_args, training_args = parse_args(
        (ModelArguments, DataTrainingArguments, PeftArguments, TrainingArguments), default_output_dir="out/sft")
    check_args(model_args, data_args, training_args, default_train=str(corpus.SAMPLE_SFT), peft_args=peft_args)
    if data_args.document_mask:
        fail("--document_mask is for pretrain.py; finetune.py's --packing keeps conversations apart")
    setup_logging(training_args)
    checkpoint = find_resume_checkpoint(training_args)
    record = run_record("finetune.py", model_args, data_args, {"max_len": data_args.max_len}, peft_args)
    check_resume(training_args, checkpoint, record)
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args)
    model = build_model(model_args, tokenizer, training_args.seed)
    if err := check_fits(model.config, peft_args, data_args.max_len):
        fail(err)
    model = add_peft(model, model_args.impl, peft_args, training_args.seed, tokenizer, tokenizer_dir(model_args))

    eval_dataset = None
    if data_args.streaming and data_args.packing:
        train_dataset = streaming_packer(data_args.train_files, tokenizer, data_args, training_args)
    else:
        split = 0 if data_args.validation_files else data_args.validation_split_percentage
        train_dataset, eval_dataset = dataset(data_args.train_files, tokenizer, data_args, training_args,
                                              data_args.max_train_samples, validation_split=split)
    if data_args.validation_files:
        eval_dataset, _ = dataset(data_args.validation_files, tokenizer, data_args, training_args, desc="validation")
    n_train = None if data_args.streaming else len(train_dataset)
    if n_train is not None:
        logger.info(f"Training on {n_train} conversations (<= {data_args.max_len} tokens each)")
        if data_args.packing:
            train_dataset = packed(train_dataset, data_args, training_args)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if data_args.packing:  # no attention_mask: documents are told apart by position_ids (use_cache is off)
        collator = PackedCollator(pad, pad_to=data_args.max_len if data_args.streaming else None)
    else:
        collator = SFTCollator(pad_token_id=pad)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=collator, base_model_path=model_args.model_name_or_path, run_record=record,
                      callbacks=[ProcessGroupTimeout()])
    with reporting_lost_ranks(training_args):
        train_and_save(trainer, checkpoint, tokenizer, n_train)
    if os.environ.get("RANK", "0") == "0":
        record_base(training_args.output_dir, model_args.model_name_or_path)
        if warning := end_of_run_warning(training_args.output_dir):
            print(warning, flush=True)


BASE_RECORD = "minillm_base.json"  # beside adapter_config.json: which base the adapter was trained on


def record_base(output_dir: str, base: str | None) -> None:
    """Write minillm_base.json beside a saved adapter: the base model's path and fingerprint
    (minillm.infra.files.model_fingerprint), so the chat can warn when the adapter is loaded on another base.
    peft ignores the file."""
    out = Path(output_dir)
    if not base or not (out / "adapter_config.json").is_file():
        return
    (out / BASE_RECORD).write_text(json.dumps({"base_model": os.path.abspath(base),
                                               "fingerprint": model_fingerprint(base)}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Pretraining, as the course's chapter-6 pretrain.py, with either implementation (--impl minillm|hf).

    deepspeed --num_gpus 2 train/pretrain.py --impl minillm --config_name tiny \
        --train_files minillm/data/pretrain.jsonl --block_size 128 --per_device_train_batch_size 8 \
        --deepspeed ds_configs/zero2.json --output_dir out/pretrain
    torchrun --nproc_per_node 2 train/pretrain.py ...      # same run, torch's launcher
    python train/pretrain.py                                 # no arguments: bundled data, tiny model

Data: every document is tokenized and followed by EOS, the stream is cut into blocks of
`block_size` tokens (minillm.chunk; only the final tail is dropped), and the blocks are cached
(keyed by the files, the tokenizer and block_size) so a second run skips preprocessing.
`--streaming` reads and chunks lazily instead (no cache; needs --max_steps).
`--document_mask`: attention stops at each EOS, as Llama 3 trains (minillm.pack.DocumentMaskCollator: positions
restart after each EOS, no attention_mask, each document's first label -100); off by default.
"""

from __future__ import annotations

import math
import os
import sys
from multiprocessing import Pool

import numpy as np
import torch
from transformers import default_data_collator, set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `common` next to this file, under any launcher
from common import (  # noqa: E402
    DataTrainingArguments, ModelArguments, Trainer, TrainingArguments, build_model, cache_path, cached, check_args,
    check_resume, fail, find_resume_checkpoint, load_tokenizer, logger, parse_args, read_or_fail, run_record,
    setup_logging, train_and_save,
)

from minillm import corpus  # noqa: E402
from minillm.chunk import Chunker  # noqa: E402
from minillm.pack import DocumentMaskCollator  # noqa: E402

BATCH_DOCS = 1000  # documents tokenized per call (and per worker task)


def _tokenize(args: tuple) -> list[list[int]]:
    tokenizer, texts = args
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def doc_batches(files: list[str], tokenizer, workers: int | None):
    """Token-id lists of the documents, BATCH_DOCS at a time (in parallel with --preprocessing_num_workers)."""
    def text_batches():
        batch = []
        for text in read_or_fail(corpus.iter_pretrain_texts, files):
            batch.append(text)
            if len(batch) == BATCH_DOCS:
                yield batch
                batch = []
        if batch:
            yield batch

    if workers and workers > 1:
        with Pool(workers) as pool:
            yield from pool.imap(_tokenize, ((tokenizer, b) for b in text_batches()))
    else:
        yield from map(_tokenize, ((tokenizer, b) for b in text_batches()))


def build_blocks(files: list[str], tokenizer, block_size: int, workers: int | None) -> torch.Tensor:
    chunker = Chunker(block_size=block_size, eos_token_id=tokenizer.eos_token_id)
    blocks = [b["input_ids"] for b in chunker.blocks({"input_ids": ids} for ids in doc_batches(files, tokenizer, workers))]
    blocks = np.concatenate(blocks) if blocks else np.zeros((0, block_size), np.int64)
    logger.info(f"{len(blocks)} blocks of {block_size} tokens from {chunker.tokens_in} tokens "
                f"(EOS after each document; {chunker.tokens_dropped} tail tokens dropped)")
    if len(blocks) == 0:
        raise SystemExit(f"pretrain.py: error: {files} hold fewer than block_size={block_size} tokens")
    return torch.from_numpy(blocks.astype(np.int32))


class BlockDataset(torch.utils.data.Dataset):
    """Rows of a (N, block_size) token tensor as causal-LM examples (labels = input_ids)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i].long()
        return {"input_ids": ids, "labels": ids.clone()}


class StreamingBlocks(torch.utils.data.IterableDataset):
    """The same blocks, produced lazily from the files (one pass per epoch, no cache)."""

    def __init__(self, files: list[str], tokenizer, block_size: int):
        self.files, self.tokenizer, self.block_size = files, tokenizer, block_size

    def __iter__(self):
        chunker = Chunker(block_size=self.block_size, eos_token_id=self.tokenizer.eos_token_id)
        for blocks in chunker.blocks({"input_ids": ids} for ids in doc_batches(self.files, self.tokenizer, None)):
            for row in blocks["input_ids"]:
                ids = torch.from_numpy(row.astype(np.int64))
                yield {"input_ids": ids, "labels": ids.clone()}


def dataset(files, tokenizer, block_size, data_args, training_args, limit=None, desc="train"):
    if data_args.streaming:
        return StreamingBlocks(files, tokenizer, block_size)
    path = cache_path(data_args, "pretrain", files, tokenizer, block_size=block_size, eos=tokenizer.eos_token_id)
    blocks = cached(path, lambda: build_blocks(files, tokenizer, block_size, data_args.preprocessing_num_workers),
                    training_args, desc=f"chunking {desc} data")
    if limit is not None:
        blocks = blocks[:limit]
    return BlockDataset(blocks)


def main() -> None:
    model_args, data_args, training_args = parse_args(
        (ModelArguments, DataTrainingArguments, TrainingArguments), default_output_dir="out/pretrain")
    check_args(model_args, data_args, training_args, default_train=str(corpus.SAMPLE_PRETRAIN))
    if data_args.packing:
        fail("--packing is for finetune.py; pretraining blocks are full already (--document_mask keeps their "
             "documents apart)")
    setup_logging(training_args)
    checkpoint = find_resume_checkpoint(training_args)
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args)
    model = build_model(model_args, tokenizer, training_args.seed)
    max_pos = getattr(model.config, "max_position_embeddings", 2048)
    block_size = data_args.block_size or min(512, max_pos)
    if block_size > max_pos:
        fail(f"--block_size {block_size} exceeds the model's max_position_embeddings {max_pos}")
    record = run_record("pretrain.py", model_args, data_args, {"block_size": block_size})
    check_resume(training_args, checkpoint, record)

    train_dataset = dataset(data_args.train_files, tokenizer, block_size, data_args, training_args,
                            data_args.max_train_samples)
    eval_dataset = None
    if data_args.validation_files:
        eval_dataset = dataset(data_args.validation_files, tokenizer, block_size, data_args, training_args,
                               desc="validation")
    if not data_args.streaming:
        logger.info(f"Training on {len(train_dataset)} blocks of {block_size} tokens from {data_args.train_files}")

    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=DocumentMaskCollator(tokenizer.eos_token_id) if data_args.document_mask
                      else default_data_collator, run_record=record)
    train_and_save(trainer, checkpoint, tokenizer, None if data_args.streaming else len(train_dataset),
                   eval_extra=lambda m: m.update(perplexity=math.exp(min(m["eval_loss"], 50))))

if __name__ == "__main__":
    main()

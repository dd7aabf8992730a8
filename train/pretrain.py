"""Pretraining, as the course's chapter-6 pretrain.py, with either implementation (--impl minillm|hf).

    deepspeed --num_gpus 2 train/pretrain.py --impl minillm --config_name tiny \
        --train_files minillm/data/pretrain.jsonl --block_size 128 --per_device_train_batch_size 8 \
        --deepspeed ds_configs/zero2.json --output_dir out/pretrain
    torchrun --nproc_per_node 2 train/pretrain.py ...      # same run, torch's launcher
    python train/pretrain.py                                 # no arguments: bundled data, tiny model

Data: every document is tokenized and followed by EOS, the stream is cut into blocks of
`block_size` tokens (only the final tail is dropped), and the ids are written once into a token store on
disk (minillm.infra.store: tokens.bin + index.json, keyed by the files, the tokenizer and block_size) that every
rank reads block by block: a rank's memory does not grow with the corpus, and a second run skips
preprocessing. The main process of each node builds it (--preprocessing_num_workers tokenizer processes;
a killed build resumes from its finished files), the node's other ranks wait for it.
`--validation_split_percentage N` (without --validation_files): the first N% of the blocks validate, as run_clm.
`--streaming` reads and chunks lazily instead (no store; needs --max_steps), split over DataLoader workers.
`--document_mask`: attention stops at each EOS, as Llama 3 trains (minillm.pack.DocumentMaskCollator: positions
restart after each EOS, no attention_mask, each document's first label -100); off by default.
"""

from __future__ import annotations

import logging
import math
import os

from transformers import default_data_collator, set_seed

from minillm.infra import corpus
from minillm.infra.store import StoreDataset, StreamingBlocks, check_ids_fit, is_complete, open_store, store_splits
from minillm.pack import DocumentMaskCollator

from train.args import DataTrainingArguments, ModelArguments, TrainingArguments, check_args, fail, parse_args
from train.caches import cache_path, remove_dead_temporaries
from train.doctor import end_of_run_warning
from train.models import build_model, load_tokenizer
from train.run import (ProcessGroupTimeout, check_resume, find_resume_checkpoint, reporting_lost_ranks, run_record,
                       setup_logging)
from train.trainer import Trainer, train_and_save

logger = logging.getLogger("minillm.train")


def dataset(files: list[str], tokenizer, block_size: int, data_args: DataTrainingArguments,
            training_args: TrainingArguments, validation_split: float = 0, desc: str = "train"):
    """(blocks, the first `validation_split`% of them held out or None) of `files`.

    A token store on disk that every rank reads (minillm.infra.store): the main process of each node builds it
    (or reuses it), the node's other ranks wait for it and read the same file. --streaming: blocks made
    lazily, no store (rank 0 of 1: accelerate splits an iterable dataset over the ranks itself; the
    DataLoader workers are split by StreamingBlocks).
    """
    eos = tokenizer.eos_token_id
    if data_args.streaming:
        return StreamingBlocks(files, tokenizer, block_size, eos), None
    path = cache_path(data_args, "pretrain", files, tokenizer, block_size=block_size, eos=eos).with_suffix(".store")
    builder = training_args.local_process_index == 0
    if builder:
        remove_dead_temporaries(path.parent)
        if is_complete(path):
            logger.info(f"{desc} data: using the token store {path}")
        elif path.exists():  # a finished store always has its index: this one was damaged, and can be rebuilt
            logger.warning(f"{desc} data: the token store {path} is unreadable (incomplete or truncated); rebuilding it")
        else:
            logger.info(f"{desc} data: tokenizing {len(files)} file(s) into the token store {path}")
    try:
        full = open_store(path, files, tokenizer, block_size, eos, build=builder,
                          workers=data_args.preprocessing_num_workers or 0, log=logger.info)
        if len(full) == 0:
            fail(f"{files} hold fewer than block_size={block_size} tokens ({full.index['n_tokens']} in all)")
        logger.info(f"{desc} data: {len(full)} blocks of {block_size} tokens from {full.index['n_tokens']} tokens "
                    f"({full.index['documents']} documents, EOS after each; the last "
                    f"{full.index['n_tokens'] % block_size} tokens unused)")
        train, val = store_splits(path, validation_split)
    except (ValueError, TimeoutError) as e:  # a malformed line (file:line), a split that leaves nothing, a dead builder
        fail(str(e))
    if val is not None:
        logger.info(f"--validation_split_percentage {validation_split:g}: blocks [0, {len(val)}) validate, "
                    f"[{len(val)}, {len(full)}) train")
    return train, val


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

    train_dataset, eval_dataset = dataset(data_args.train_files, tokenizer, block_size, data_args, training_args,
                                          0 if data_args.validation_files else data_args.validation_split_percentage)
    if data_args.max_train_samples is not None and not data_args.streaming:
        t = train_dataset
        train_dataset = StoreDataset(t.path, t.start, min(t.stop, t.start + data_args.max_train_samples))
    if data_args.validation_files:
        eval_dataset, _ = dataset(data_args.validation_files, tokenizer, block_size, data_args, training_args,
                                  desc="validation")
    for data in (train_dataset, eval_dataset):  # an id past the embedding would crash mid-run: refuse it now
        if data is not None:
            try:
                check_ids_fit(data, model.config.vocab_size)
            except ValueError as e:
                fail(str(e))
    if not data_args.streaming:
        logger.info(f"Training on {len(train_dataset)} blocks of {block_size} tokens from {data_args.train_files}")

    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=DocumentMaskCollator(tokenizer.eos_token_id) if data_args.document_mask
                      else default_data_collator, run_record=record, callbacks=[ProcessGroupTimeout()])
    with reporting_lost_ranks(training_args):
        train_and_save(trainer, checkpoint, tokenizer, None if data_args.streaming else len(train_dataset),
                       eval_extra=lambda m: m.update(perplexity=math.exp(min(m["eval_loss"], 50))))
    if os.environ.get("RANK", "0") == "0" and (warning := end_of_run_warning(training_args.output_dir)):
        print(warning, flush=True)

if __name__ == "__main__":
    main()

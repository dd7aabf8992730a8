"""Supervised fine-tuning (full or LoRA), as the course's chapter-6 finetune.py, with --impl minillm|hf.

    deepspeed --num_gpus 2 train/finetune.py --impl minillm --model_name_or_path out/pretrain \
        --train_files minillm/data/sft.jsonl --max_len 256 --use_lora --lora_r 8 \
        --deepspeed ds_configs/zero2.json --output_dir out/sft
    python train/finetune.py      # no arguments: bundled SFT data on a random tiny model

Data: BelleGroup-style conversations rendered in ChatML, only the assistant replies (and their
<|im_end|>) labelled (minillm.sft); dropped or truncated samples are counted and logged. The masked
samples are cached; batches are padded per batch by minillm.sft.SFTCollator (labels -100 by position).
LoRA: minillm.lora for --impl minillm, peft for --impl hf; the adapter is saved in peft's format
(adapter_config.json + adapter_model.safetensors) either way, with the tokenizer files alongside.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from transformers import set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `common` next to this file, under any launcher
from common import (  # noqa: E402
    DataTrainingArguments, LoraArguments, ModelArguments, Trainer, TrainingArguments, add_lora, build_model,
    cache_path, cached, check_args, check_resume, find_resume_checkpoint, load_tokenizer, logger,
    parse_args, read_or_fail, run_record, setup_logging, train_and_save,
)

from minillm import corpus  # noqa: E402
from minillm.sft import MaskStats, SFTCollator, mask_batch  # noqa: E402

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
    def __init__(self, samples: dict[str, torch.Tensor], limit: int | None = None):
        self.samples = samples
        self.n = len(samples["offsets"]) - 1 if limit is None else min(limit, len(samples["offsets"]) - 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, list[int]]:
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


def dataset(files, tokenizer, data_args, training_args, limit=None, desc="train"):
    if data_args.streaming:
        return StreamingSFT(files, tokenizer, data_args.max_len)
    path = cache_path(data_args, "sft", files, tokenizer, max_len=data_args.max_len)
    samples = cached(path, lambda: build_samples(files, tokenizer, data_args.max_len), training_args,
                     desc=f"masking {desc} conversations")
    return SFTDataset(samples, limit)


def main() -> None:
    model_args, data_args, lora_args, training_args = parse_args(
        (ModelArguments, DataTrainingArguments, LoraArguments, TrainingArguments), default_output_dir="out/sft")
    check_args(model_args, data_args, training_args, default_train=str(corpus.SAMPLE_SFT), lora_args=lora_args)
    setup_logging(training_args)
    checkpoint = find_resume_checkpoint(training_args)
    record = run_record("finetune.py", model_args, data_args, {"max_len": data_args.max_len}, lora_args)
    check_resume(training_args, checkpoint, record)
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args)
    model = build_model(model_args, tokenizer, training_args.seed)
    if lora_args.use_lora:
        model = add_lora(model, model_args, lora_args, training_args.seed)

    train_dataset = dataset(data_args.train_files, tokenizer, data_args, training_args, data_args.max_train_samples)
    eval_dataset = None
    if data_args.validation_files:
        eval_dataset = dataset(data_args.validation_files, tokenizer, data_args, training_args, desc="validation")
    if not data_args.streaming:
        logger.info(f"Training on {len(train_dataset)} conversations (<= {data_args.max_len} tokens each)")

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=SFTCollator(pad_token_id=pad), base_model_path=model_args.model_name_or_path, run_record=record)
    train_and_save(trainer, checkpoint, tokenizer, None if data_args.streaming else len(train_dataset))

if __name__ == "__main__":
    main()

"""Evaluation during training (train/trainer.py): eval loss, perplexity and bits per byte, for both --impl.

What is equal, and where: the Trainer's eval_bpb counts nats and bytes of the target tokens (nanochat's definition);
minillm.evaluate's bits_per_byte is lm-eval's loglikelihood_rolling one (a document's log-likelihood over its UTF-8
bytes). On rows that both read the same way (one document per row, after the prefix token, shorter than the
model's length: one rolling window) the two are the same number, checked here within 1e-5 relative. pretrain.py's
validation blocks are not such rows: they concatenate documents (a token there also sees the documents before it)
and a block starts mid-document with no context, so a run's logged eval_bpb differs from the held-out task's
bits_per_byte by that much, not by its accounting.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from minillm.config import ModelConfig
from minillm.data import DATA_DIR, TOKENIZER_DIR
from minillm.evaluate import HeldOutBits, encoder_for, evaluate_task, read_task, token_bytes
from parity.model import random_model
from train.models import hf_model_from
from train.plots import save_loss_plot
from train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
DOCS = [json.loads(line)["text"] for line in (DATA_DIR / "eval" / "heldout.jsonl").read_text().splitlines()[:12]]


def pad_rows(rows: list[dict]) -> dict:
    """Right-pad input_ids (labels -100 there, attention_mask 0): the Trainer's batches of unequal documents."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = [r["input_ids"] + [3] * (T - len(r["input_ids"])) for r in rows]
    labels = [r["input_ids"] + [-100] * (T - len(r["input_ids"])) for r in rows]
    mask = [[1] * len(r["input_ids"]) + [0] * (T - len(r["input_ids"])) for r in rows]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


@pytest.mark.parametrize("impl", ["minillm", "hf"])
def test_eval_bpb_equals_minillm_evaluate(tmp_path, impl):
    model = random_model(ModelConfig.preset("tiny", pad_token_id=3, eos_token_id=0), 0).eval()
    enc = encoder_for(TOKENIZER_DIR, model.config.max_position_embeddings)
    rows = [[enc.prefix] + enc.encode(d) for d in DOCS]
    assert all(len(r) <= model.config.max_position_embeddings for r in rows)  # one rolling window each
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\n"
                                     "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_target: text\n")
    reference = evaluate_task(model, enc, read_task(tmp_path / "t.yaml"))["metrics"]["bits_per_byte"][0]

    args = transformers.TrainingArguments(str(tmp_path / "run"), per_device_eval_batch_size=5, report_to=[],
                                          use_cpu=True)
    trainer = Trainer(model=model if impl == "minillm" else hf_model_from(model), args=args,
                      eval_dataset=[{"input_ids": r} for r in rows], data_collator=pad_rows)
    trainer.token_bytes = token_bytes(enc.tok)
    metrics = trainer.evaluate()
    assert metrics["eval_bpb"] == pytest.approx(reference, rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-12)
    logged = [e for e in trainer.state.log_history if "eval_bpb" in e]
    assert logged and logged[-1]["eval_bpb"] == metrics["eval_bpb"]  # in the logs, hence on loss.png


def test_token_bytes_are_the_texts_bytes():
    """Summed over a document's tokens, token_bytes gives its UTF-8 length (Chinese tokens split characters);
    special tokens count nothing."""
    enc = encoder_for(TOKENIZER_DIR, 1024)
    tb = token_bytes(enc.tok)
    for d in DOCS:
        assert sum(tb[i] for i in enc.encode(d)) == len(d.encode("utf-8"))
    assert tb[enc.tok.token_to_id("<|endoftext|>")] == tb[enc.tok.token_to_id("<|im_end|>")] == 0


def test_held_out_bits_leaves_out_ignored_and_special_labels():
    bits = HeldOutBits([0, 1, 2, 3])
    logits = torch.zeros(1, 4, 4)  # uniform: every target costs ln 4 nats
    rows = bits.per_row(logits, torch.tensor([[2, 0, -100, 3]]))  # targets 0 (special: 0 bytes), -100, 3 (3 bytes)
    bits.add(rows)
    assert bits.tokens == 1 and bits.bytes == 3 and bits.nats == pytest.approx(math.log(4))
    assert bits.bpb() == pytest.approx(math.log(4) / 3 / math.log(2))


def test_loss_png_has_a_bits_per_byte_panel(tmp_path):
    history = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 21)]
    history += [{"step": 10, "eval_loss": 4.0, "eval_perplexity": 54.6, "eval_bpb": 3.1},
                {"step": 20, "eval_loss": 3.5, "eval_perplexity": 33.1, "eval_bpb": 2.7}]
    save_loss_plot(history, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0

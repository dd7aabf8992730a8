"""train/pretrain.py on minillm.infra.store (issue 12): the main process writes one token store that the other rank
reads, a second run reuses it without tokenizing, --validation_split_percentage evaluates on the first blocks,
--streaming with DataLoader workers trains on every block once.

One 2-rank torchrun launch (~25 s of start-up) builds the store; the other runs are in-process. That a training
rank's memory does not grow with the corpus is tests/test_store.py's (test_reading_rss_stays_flat: reading
every block by pread leaves RSS flat; test_build_memory_does_not_grow_with_the_corpus for the builder).
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import math
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from minillm.infra.store import StoreDataset, StreamingBlocks, is_complete, split_sizes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import ROOT, TRAIN, _cmd, _env  # noqa: E402

BLOCK = 32
ARGS = ["--block_size", str(BLOCK), "--per_device_train_batch_size", "2", "--disable_tqdm", "true",
        "--logging_steps", "1", "--report_to", "none", "--learning_rate", "1e-2", "--seed", "3",
        "--save_strategy", "no"]


def _main(argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["pretrain.py", *argv])
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")  # the script sets it to 1 for the whole process
    importlib.import_module("train.pretrain").main()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """2,100 short documents (3 windows of StreamingBlocks' 1,000, so both of 2 workers get some), ~400 blocks."""
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran past old red barns near quiet water".split()
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(2, 8)))}) + "\n"
                            for _ in range(2100)))
    return path


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, data):
    """A 2-rank torchrun pretrain (3 steps, 2 tokenizer processes) into a fresh cache."""
    tmp = tmp_path_factory.mktemp("ranks")
    cache, out, log = tmp / "cache", tmp / "o", tmp / "run.log"
    cmd = _cmd("pretrain.py", ["--train_files", str(data), "--output_dir", str(out), "--cache_dir", str(cache),
                               "--max_steps", "3", "--preprocessing_num_workers", "2", *ARGS])
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(cache), cwd=ROOT, timeout=600)
    assert rc == 0, "pretrain.py failed:\n" + "".join(log.read_text().splitlines(True)[-40:])
    return types.SimpleNamespace(cache=cache, out=out, log=log.read_text())


def test_two_ranks_share_one_store_built_once(two_ranks):
    [store] = list(two_ranks.cache.glob("pretrain-*.store"))
    assert is_complete(store) and not list(two_ranks.cache.glob("*.partial")) and not list(two_ranks.cache.glob("*.pt"))
    assert two_ranks.log.count("into the token store") == 1  # built by rank 0 only
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in two_ranks.log
    n = len(StoreDataset(store))
    assert json.loads((two_ranks.out / "train_results.json").read_text())["train_samples"] == n > 300


def test_second_run_reuses_the_store_and_validates_on_the_first_blocks(two_ranks, data, tmp_path, monkeypatch,
                                                                       caplog):
    """Same files, tokenizer and block_size: the store is read, not rebuilt; --validation_split_percentage 10
    evaluates on blocks [0, 10%) and trains on the rest."""
    [store] = list(two_ranks.cache.glob("pretrain-*.store"))
    before = (store / "tokens.bin").stat().st_mtime_ns
    out = tmp_path / "o"
    caplog.set_level(logging.INFO, logger="minillm.train")
    _main(["--train_files", str(data), "--output_dir", str(out), "--cache_dir", str(two_ranks.cache),
           "--max_steps", "2", "--validation_split_percentage", "10", *ARGS], monkeypatch)
    assert f"train data: using the token store {store}" in caplog.text and "into the token store" not in caplog.text
    assert (store / "tokens.bin").stat().st_mtime_ns == before and len(list(two_ranks.cache.iterdir())) == 1  # no lock left
    full = StoreDataset(store)
    n_val, n_train = split_sizes(len(full), 10)
    assert json.loads((out / "train_results.json").read_text())["train_samples"] == n_train
    from minillm.model import CausalLM

    model = CausalLM.from_pretrained(out).eval()

    def loss(start: int, stop: int) -> float:
        x = torch.stack([StoreDataset(store, start, stop)[i]["input_ids"] for i in range(stop - start)])
        with torch.no_grad():
            return model(input_ids=x, labels=x).loss.item()

    got = json.loads((out / "eval_results.json").read_text())
    assert abs(got["eval_loss"] - loss(0, n_val)) < 1e-5, (got, loss(0, n_val))
    assert abs(got["eval_loss"] - loss(n_val, 2 * n_val)) > 1e-3  # other blocks would give another loss
    assert abs(got["perplexity"] - math.exp(got["eval_loss"])) < 1e-3 * got["perplexity"]


def test_split_flag_is_checked_and_recorded(data, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="--validation_split_percentage needs the token store"):
        _main(["--streaming", "--max_steps", "1", "--validation_split_percentage", "5", "--output_dir",
               str(tmp_path / "a")], monkeypatch)
    with pytest.raises(SystemExit, match=r"--validation_split_percentage must be in \[0, 100\), got 100"):
        _main(["--validation_split_percentage", "100", "--output_dir", str(tmp_path / "b")], monkeypatch)
    from train import safety
    from train.args import DataTrainingArguments, ModelArguments
    from train.run import run_record

    records = [run_record("pretrain.py", ModelArguments(),
                          DataTrainingArguments(train_files=[str(data)], validation_split_percentage=p),
                          {"block_size": BLOCK}) for p in (0, 10)]
    assert records[0]["validation_split"] is None  # a record from before the flag still matches
    assert [c.split(":")[0] for c in safety.compare_run_record(*records)] == ["validation_split"]


def test_streaming_with_two_dataloader_workers_trains_on_every_block_once(data, tmp_path, monkeypatch):
    """One epoch of --streaming with --dataloader_num_workers 2 trains on exactly the blocks of one unsharded
    pass, each once (before StreamingBlocks split the workers, each worker yielded every block)."""
    from train.args import ModelArguments
    from train.models import load_tokenizer
    from train.trainer import Trainer

    tok = load_tokenizer(ModelArguments())  # the script's tokenizer (EOS set)
    ds = StreamingBlocks([str(data)], tok, BLOCK, tok.eos_token_id)
    per_worker = []
    for w in range(2):  # what each DataLoader worker yields
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda w=w: types.SimpleNamespace(num_workers=2, id=w))
        per_worker.append([tuple(b["input_ids"].tolist()) for b in ds])
    monkeypatch.undo()
    assert all(per_worker) and not set(per_worker[0]) & set(per_worker[1])
    batch = 64
    steps = sum(math.ceil(len(p) / batch) for p in per_worker)  # one epoch: each worker makes its own batches

    seen = []
    step = Trainer.training_step

    def recording_step(self, model, inputs, *args, **kwargs):
        seen.extend(tuple(r) for r in inputs["input_ids"].tolist())
        return step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", recording_step)
    _main(["--train_files", str(data), "--streaming", "--dataloader_num_workers", "2", "--max_steps", str(steps),
           "--output_dir", str(tmp_path / "o"), "--cache_dir", str(tmp_path / "cache"), *ARGS,
           "--per_device_train_batch_size", str(batch)], monkeypatch)
    assert len(seen) == sum(map(len, per_worker)) > 500
    assert collections.Counter(seen) == collections.Counter(per_worker[0] + per_worker[1])
    assert not (tmp_path / "cache").exists()

"""finetune.py --packing and pretrain.py --document_mask end to end (minillm.pack's machinery in the scripts).

What is checked here, at script level (tests/test_pack.py checks the packing core itself: packed step = padded
step and gradient accumulation splits, <= 1e-6, for both implementations):
- a packed 2-rank ZeRO-2 run gives the same loss curve for both implementations (<= 1e-5, as tests/test_train.py);
- the first packed step's loss and gradient norm equal the unpacked step's over the same conversations (both
  implementations, and through peft's LoRA for hf);
- --streaming --packing on 2 ranks with 2 DataLoader workers each feeds every conversation exactly once per
  epoch through accelerate's dispatcher (which otherwise drops or repeats rows at a short batch);
- --document_mask: both implementations agree and the mask changes the loss;
- bad combinations are refused by name, and a changed --packing is flagged on resume.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "train"
LOSS_TOL = 1e-5  # fp32 loss curves over many steps, as tests/test_train.py
STEP_TOL = 1e-6  # one step, packed vs unpacked: the same tokens and denominator, other matmul shapes
COMMON = ["--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1", "--seed", "7"]


def _env(cache: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MINILLM_CACHE": str(cache),
           "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    return env


def _torchrun(script: Path, args: list[str], cache: Path, log: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(script), *args]
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(cache), cwd=ROOT)
    assert rc == 0, f"{script.name} failed (exit {rc}):\n" + "".join(log.read_text().splitlines(True)[-40:])


def _log_history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def _losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in _log_history(out) if "loss" in e}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One preprocessed-data cache for the in-process runs (masking the bundled SFT set once)."""
    return str(tmp_path_factory.mktemp("cache"))


def _main(script: str, argv: list[str], monkeypatch) -> None:
    import importlib

    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")  # the scripts set it to 1 for the whole process
    importlib.import_module("train." + script.removesuffix(".py")).main()


# ---- 2 ranks, ZeRO-2: the two implementations' packed loss curves ------------------------------------------

PACKED_SFT = ["--packing", "--max_len", "64", "--max_train_samples", "200", "--per_device_train_batch_size", "2",
              "--max_steps", "8", "--learning_rate", "3e-3", *COMMON,
              "--deepspeed", str(ROOT / "ds_configs" / "zero2.json")]


def test_packed_finetune_two_ranks_both_impls_agree(tmp_path):
    for impl in ("minillm", "hf"):
        _torchrun(TRAIN / "finetune.py", ["--impl", impl, "--output_dir", str(tmp_path / impl), *PACKED_SFT],
                  tmp_path / "cache", tmp_path / f"{impl}.log")
    a, b = _losses(tmp_path / "minillm"), _losses(tmp_path / "hf")
    assert a.keys() == b.keys() and len(a) == 8
    worst = max(abs(a[s] - b[s]) for s in a)
    print(f"packed 2-rank ZeRO-2 loss curves, minillm vs hf: max |diff| {worst:.3g} over {len(a)} steps")
    assert worst <= LOSS_TOL, f"packed loss curves differ by {worst:.3g}: {a} vs {b}"
    assert a[8] < a[1] - 0.3, f"the loss did not go down: {a[1]} -> {a[8]}"
    log = (tmp_path / "minillm.log").read_text()
    rows = int(log.split("Packed 200 conversations into ")[1].split()[0])
    assert rows < 200  # conversations really shared rows
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in log
    record = json.loads((tmp_path / "minillm" / "run.json").read_text())
    assert record["packing"] == {"packing": True, "buffer": 1000, "document_mask": False}


# ---- one step, packed = unpacked (in-process, single process) --------------------------------------------

@pytest.mark.parametrize("impl,lora", [("minillm", []), ("hf", ["--use_lora"])])
def test_first_packed_step_equals_unpacked_step(impl, lora, cache, tmp_path, monkeypatch):
    """12 conversations in one step: as 12 padded rows, or packed into fewer rows. The Trainer divides by the
    learned tokens of the step either way, so loss and gradient norm agree. (hf through peft's LoRA: the packed
    path must survive the wrapper; the bare hf model is covered by the 2-rank curves above.)"""
    first = []
    for packing in ([], ["--packing"]):
        out = tmp_path / f"p{len(packing)}"
        _main("finetune.py", ["--impl", impl, *lora, *packing, "--output_dir", str(out), "--max_len", "64",
                              "--max_train_samples", "12", "--per_device_train_batch_size", "12", "--max_steps", "1",
                              "--learning_rate", "1e-3", "--cache_dir", cache, *COMMON],
              monkeypatch)
        first.append(next(e for e in _log_history(out) if "loss" in e))
    unpacked, packed = first
    print(f"{impl}{' LoRA' if lora else ''}: first step loss {unpacked['loss']} unpacked vs {packed['loss']} packed, "
          f"grad norm {unpacked['grad_norm']} vs {packed['grad_norm']}")
    assert abs(packed["loss"] - unpacked["loss"]) <= STEP_TOL, (packed, unpacked)
    assert abs(packed["grad_norm"] - unpacked["grad_norm"]) <= STEP_TOL * unpacked["grad_norm"], (packed, unpacked)


def test_packed_step_differs_when_conversations_attend_across(cache, tmp_path, monkeypatch):
    """The check above can fail: the same packed rows with positions counting through the row (no restart,
    one document per row) give another loss."""
    import torch

    from train import finetune
    from train.args import DataTrainingArguments, ModelArguments, TrainingArguments
    from train.models import build_model, load_tokenizer

    from minillm.pack import PackedCollator

    tok = load_tokenizer(ModelArguments())
    data_args = DataTrainingArguments(train_files=[str(ROOT / "minillm" / "data" / "sft.jsonl")], max_len=64,
                                      packing=True, cache_dir=cache)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", seed=7)
    rows = finetune.packed(finetune.dataset(data_args.train_files, tok, data_args, args, 12)[0], data_args, args)
    batch = PackedCollator(tok.pad_token_id)([rows[i] for i in range(len(rows))])
    model = build_model(ModelArguments(), tok, 7)
    with torch.no_grad():
        apart = model(**batch).loss
        T = batch["input_ids"].shape[1]
        across = model(input_ids=batch["input_ids"], labels=batch["labels"],
                       position_ids=torch.arange(T).expand_as(batch["input_ids"])).loss
    assert abs(apart - across) > 100 * STEP_TOL  # measured 4e-4 on this random-init model (near-uniform logits)


# ---- streaming: every conversation once per epoch, 2 ranks x 2 workers --------------------------------------

_COUNT_SCRIPT = r'''
import json, sys
from train import finetune
from train.args import DataTrainingArguments, ModelArguments, TrainingArguments
from train.models import build_model, load_tokenizer
from train.trainer import Trainer
from minillm.pack import PackedCollator

data, out = sys.argv[1], sys.argv[2]
args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, dataloader_num_workers=2, use_cpu=True,
                         max_steps=100, report_to="none", seed=3)
data_args = DataTrainingArguments(train_files=[data], max_len=64, packing=True, streaming=True, packing_buffer=8)
tok = load_tokenizer(ModelArguments())
trainer = Trainer(model=build_model(ModelArguments(), tok, 3), args=args,
                  train_dataset=finetune.streaming_packer([data], tok, data_args, args),
                  data_collator=PackedCollator(tok.pad_token_id, pad_to=64))
loader = trainer.get_train_dataloader()
epochs = []
for epoch in range(2):
    docs, shapes = [], []
    for b in loader:  # accelerate's dispatcher: rank 0 reads, each rank gets its slice
        shapes.append(list(b["input_ids"].shape))
        for ids, pos, labels in zip(b["input_ids"], b["position_ids"], b["labels"]):
            starts = (pos == 0).nonzero().flatten().tolist()
            for a, z in zip(starts, [*starts[1:], len(ids)]):
                if (labels[a:z] != -100).any():  # a conversation (padding learns nothing)
                    docs.append(ids[a:z].tolist())
    epochs.append({"docs": docs, "shapes": shapes})
json.dump(epochs, open(f"{out}/rank{args.process_index}.json", "w"))
'''


def test_streaming_packing_two_ranks_two_workers_sees_each_conversation_once(tmp_path, monkeypatch):
    lines = (ROOT / "minillm" / "data" / "sft.jsonl").read_text().splitlines(True)[:37]  # 37: no even split
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(lines))
    script = tmp_path / "count.py"
    script.write_text(_COUNT_SCRIPT)
    _torchrun(script, [str(data), str(tmp_path)], tmp_path / "cache", tmp_path / "count.log")

    from train import finetune
    from train.args import ModelArguments
    from train.models import load_tokenizer

    from minillm.infra import corpus

    tok = load_tokenizer(ModelArguments())
    expected = Counter(tuple(s["input_ids"]) for s in
                       finetune.mask_conversations(list(corpus.iter_sft_conversations(data)), tok, 64))
    assert sum(expected.values()) == 37
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    orders = []
    for epoch in range(2):
        seen = Counter(tuple(d) for r in ranks for d in r[epoch]["docs"])
        assert seen == expected, f"epoch {epoch}: repeated {seen - expected}, missing {expected - seen}"
        assert all(s == [2, 64] for r in ranks for s in r[epoch]["shapes"])  # full, fixed-width batches
        assert len(ranks[0][epoch]["shapes"]) == len(ranks[1][epoch]["shapes"]) > 0
        orders.append(ranks[0][epoch]["docs"])
    assert orders[0] != orders[1]  # each epoch reshuffles


def test_streaming_packing_trains_single_process(tmp_path, monkeypatch):
    out = tmp_path / "o"
    _main("finetune.py", ["--streaming", "--packing", "--max_len", "64", "--per_device_train_batch_size", "2",
                          "--max_steps", "3", "--learning_rate", "1e-3", "--output_dir", str(out), *COMMON],
          monkeypatch)
    assert len(_losses(out)) == 3 and (out / "model.safetensors").exists()


# ---- pretraining: --document_mask ------------------------------------------------------------------------

def test_pretrain_document_mask_both_impls_agree_and_mask_matters(cache, tmp_path, monkeypatch):
    curves = {}
    for impl, mask in (("minillm", ["--document_mask"]), ("hf", ["--document_mask"]), ("minillm", [])):
        out = tmp_path / f"{impl}{len(mask)}"
        _main("pretrain.py", ["--impl", impl, *mask, "--output_dir", str(out), "--max_steps", "3", "--block_size",
                              "128", "--per_device_train_batch_size", "2", "--learning_rate", "3e-3",
                              "--cache_dir", cache, *COMMON], monkeypatch)
        curves[impl, len(mask)] = _losses(out)
    a, b, plain = curves["minillm", 1], curves["hf", 1], curves["minillm", 0]
    assert a.keys() == b.keys() and len(a) == 3
    worst = max(abs(a[s] - b[s]) for s in a)
    print(f"--document_mask minillm vs hf: max |diff| {worst:.3g}; first loss masked {a[1]} vs plain {plain[1]}")
    assert worst <= LOSS_TOL, (a, b)
    assert abs(a[1] - plain[1]) > 1e-3, "the document mask changed nothing: no EOS inside a block?"
    assert json.loads((tmp_path / "minillm1" / "run.json").read_text())["packing"]["document_mask"] is True


# ---- refused combinations, resume record -----------------------------------------------------------------

@pytest.mark.parametrize("script,argv,msg", [
    ("finetune.py", ["--document_mask"], "--document_mask is for pretrain.py"),
    ("pretrain.py", ["--packing"], "--packing is for finetune.py"),
    ("finetune.py", ["--packing", "--use_cache", "true"], "need --use_cache false"),
    ("finetune.py", ["--packing", "--packing_buffer", "0"], "--packing_buffer must be >= 1"),
])
def test_bad_packing_flags_are_refused(script, argv, msg, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=msg):
        _main(script, [*argv, "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--learning_rate", "1e-3",
                       "--cache_dir", str(tmp_path / "cache")], monkeypatch)


def test_changed_packing_is_flagged_on_resume(monkeypatch):
    from train import safety
    from train.args import DataTrainingArguments, ModelArguments
    from train.run import run_record

    def record(**kw):
        return run_record("finetune.py", ModelArguments(), DataTrainingArguments(train_files=None, **kw), {"max_len": 64})

    assert record()["packing"] is None  # an unpacked run matches a record written before --packing existed
    changes = safety.compare_run_record(record(), record(packing=True))
    assert len(changes) == 1 and changes[0].startswith("packing: null ->")
    assert safety.compare_run_record(record(packing=True), record(packing=True, packing_buffer=8))

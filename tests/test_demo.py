"""train/demo.py's DPO and evaluation stages, piece by piece (the whole demo is `make demo`, minutes): the reply kinds
of the SFT-vs-DPO table, the bits-per-byte standard error, the evaluation table of several models (run from another
working directory, as `python /path/to/train/demo.py` would be), the preference table."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from minillm.config import ModelConfig
from minillm.data import TOKENIZER_DIR
from minillm.data.sample_dpo import taught_pairs
from minillm.model import CausalLM
from train import demo


def test_reply_kinds():
    taught = demo.answers_by_shape()
    question, preferred = "What is Tortor known for?", "Tortor is known for its silk and its hot springs."
    reply = lambda text, match=False: {"question": question, "reply": text, "match": match}  # noqa: E731
    assert (question, preferred) in taught_pairs() and demo.reply_kind(reply(preferred, True), taught) == "preferred"
    # the taught answer to another question of the same shape: what the rejected answers are (sample_dpo.py)
    assert demo.reply_kind(reply("Lorlidus is known for its boats and its clock tower."), taught) == "rejected-style"
    assert demo.reply_kind(reply("88 plus 90 is 100."), taught) == "other"  # fluent, but no answer the data teaches
    assert demo.reply_kind(reply("Hello!"), taught) == "other"  # taught, but for a question of another shape


def test_bpb_stderr_is_the_ratio_estimators():
    items = [{"loglikelihood": -math.log(2) * b, "bytes": y} for b, y in ((10, 20), (30, 40), (5, 50), (8, 8))]
    bits, nbytes = [10, 30, 5, 8], [20, 40, 50, 8]
    r = sum(bits) / sum(nbytes)
    n = len(items)
    expected = math.sqrt(sum((b - r * y) ** 2 for b, y in zip(bits, nbytes)) / (n - 1) / n) / (sum(nbytes) / n)
    assert math.isclose(demo.bpb_stderr(items), expected, rel_tol=1e-12)
    same_rate = [{"loglikelihood": -math.log(2) * y / 2, "bytes": y} for y in (10, 20, 30)]
    assert demo.bpb_stderr(same_rate) < 1e-12  # every document at 0.5 bits per byte: no spread


def test_evaluation_table_of_several_models_from_another_directory(tmp_path, monkeypatch):
    models = {}
    for name, seed in (("first", 0), ("second", 1)):
        torch.manual_seed(seed)
        models[name] = tmp_path / name
        CausalLM(ModelConfig.preset("tiny")).save_pretrained(models[name])
        for f in Path(TOKENIZER_DIR).iterdir():  # the tokenizer files the demo's saved models carry
            shutil.copy(f, models[name] / f.name)
    monkeypatch.chdir(tmp_path)  # the bundled task files name their data relative to the checkout
    md, metrics = demo.evaluation(models)
    lines = md.splitlines()
    assert lines[0].startswith("| model | sample_heldout: bits per byte") and "sample_mc: acc_norm" in lines[0]
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| first", "| second", "| chance"]
    for name in models:
        bpb = metrics[name]["sample_heldout"]["bits_per_byte"]
        acc = metrics[name]["sample_mc"]["acc"]
        assert 0 < bpb[0] and bpb[2] == metrics["first"]["sample_heldout"]["bits_per_byte"][2]  # chance: the vocab's
        assert 0 <= acc[0] <= 1 and acc[1] > 0 and math.isclose(acc[2], 0.25)  # 4 choices each
    assert " ± " in lines[2] and "300 questions, 200 held-out documents" in md


def test_preference_table_rows():
    row = {"pairs": "held-out pairs", "n": 48, "likelier pretrained": 0.375, "likelier SFT": 0.75,
           "likelier DPO": 0.708, "accuracy SFT": 0.6875, "accuracy DPO": 0.52, "margin SFT": 0.284,
           "margin DPO": -0.125}
    md = demo.preference_table([row])
    assert md.splitlines()[2] == "| held-out pairs | 48 | 0.38 | 0.75 | 0.71 | 0.69 | 0.52 | +0.284 | -0.125 |"


def test_kind_changes_put_rejected_style_to_preferred_first():
    pairs = [("rejected-style", "other"), ("rejected-style", "other"), ("other", "other"), ("preferred", "other"),
             ("rejected-style", "preferred"), ("preferred", "preferred")]
    changes = demo.kind_changes(pairs)
    assert list(changes.items()) == [("rejected-style -> preferred", 1), ("rejected-style -> other", 2),
                                     ("preferred -> other", 1)]  # unchanged kinds are not changes
    assert demo.kind_changes([("other", "other")]) == {}

"""minillm.evaluate: lm-eval's tokenisation rules (against lm-eval's own code), the context-once scorer against whole
rows, metrics, the task reader's sentences for bad input, the bundled eval data and train/evaluate.py's CLI.
The full comparison with lm-eval's hf model is `python -m parity.eval`."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean_stderr as lm_mean_stderr
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from minillm.config import ModelConfig
from minillm.data import DATA_DIR, TOKENIZER_DIR
from minillm.data.sample_eval import check_split
from minillm.evaluate import TaskError, encoder_for, evaluate_task, mean_stderr, read_task, score_choices, score_rows
from parity.model import random_model

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
ENC = encoder_for(TOKENIZER_DIR, 40)
TEXT = st.lists(st.sampled_from(list("ab cd  \n河边的小镇,.") + ["the ", "river ", "<|endoftext|>"]),
                max_size=12).map("".join)


class Reference(TemplateLM):
    """lm-eval's TemplateLM (its _encode_pair and empty-context rule) over our tokenizer; returns the requests."""
    tok_encode = lambda self, s, add_special_tokens=None, **kw: ENC.encode(s, add_special_tokens)
    eot_token_id = 0
    _loglikelihood_tokens = lambda self, reqs, **kw: reqs
    loglikelihood_rolling = generate_until = lambda self, *a, **kw: None


@settings(max_examples=150)
@given(TEXT, TEXT.filter(lambda s: s != ""))
def test_pair_is_lm_evals(context, continuation):
    (_, ctx, cont), = Reference().loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)], True)
    assert ENC.pair(context, continuation) == (ctx, cont)


@settings(max_examples=100)
@given(st.lists(st.integers(4, 4095), max_size=130), st.integers(1, 40))
def test_rolling_windows_are_lm_evals(tokens, max_len):
    enc = type(ENC)(ENC.tok, 0, max_len)
    enc.encode = lambda s, add_special_tokens=None: tokens
    ref = [tuple(map(list, w)) for w in map(make_disjoint_window, get_rolling_token_windows(tokens, 0, max_len, 1))]
    assert enc.rolling_windows("") == ref


def test_mean_stderr_is_lm_evals():
    xs = [1.0, 0.0, 0.0, 1.0, 1.0]
    assert mean_stderr(xs) == pytest.approx(lm_mean_stderr(xs), rel=1e-12)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny", pad_token_id=3, eos_token_id=0, max_position_embeddings=40)
    return random_model(cfg, 0).eval()


@settings(max_examples=8)
@given(st.lists(st.tuples(st.lists(st.integers(4, 4095), min_size=1, max_size=45),
                          st.lists(st.lists(st.integers(4, 4095), min_size=1, max_size=8), min_size=1, max_size=4)),
                min_size=1, max_size=6), st.integers(1, 4))
def test_context_once_path_equals_whole_rows(model, items, batch_size):
    """Contexts read once (their choices side by side after them) = each row read whole; long ones truncated alike."""
    cached = score_choices(model, items, 40, batch_size)
    whole = iter(score_rows(model, [(c, k) for c, ks in items for k in ks], 40, 3))
    for per in cached:
        for ll, greedy in per:
            ll2, greedy2 = next(whole)
            assert abs(ll - ll2) <= 1e-6 * max(1.0, abs(ll2)) and greedy == greedy2


def test_a_choice_written_twice_scores_the_same(model):
    """lm-eval scores a repeated request once (one logits row): equal log-likelihoods, argmax on the first."""
    (a, b, c, d), = score_choices(model, [([5, 6, 7], [[8, 9], [10], [8, 9], [10]])], 40)
    assert a == c and b == d


def write(tmp_path: Path, yaml_text: str, rows: list[dict]) -> Path:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    path = tmp_path / "t.yaml"
    path.write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\ntest_split: test\n"
                    + yaml_text, encoding="utf-8")
    return path


MC = "output_type: multiple_choice\ndoc_to_text: \"Q: {{q}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
ROW = {"q": "which?", "choices": ["a", "bb"], "answer": 1}


def test_metrics_on_a_task(tmp_path, model):
    rows = [ROW, {"q": "河边", "choices": ["醒得很早", "早"], "answer": "早"}, {"q": "", "choices": ["x"], "answer": 0}]
    task = read_task(write(tmp_path, MC + "metric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: acc_bytes\n",
                           rows))
    out = evaluate_task(model, ENC, task, batch_size=2)
    lls = [item["loglikelihoods"] for item in out["items"]]
    golds = [1, 1, 0]
    argmax = lambda xs: max(range(len(xs)), key=lambda i: (xs[i], -i))
    acc = [float(argmax(l) == g) for l, g in zip(lls, golds)]
    norm = [float(argmax([x / len(c) for x, c in zip(l, r["choices"])]) == g) for l, r, g in zip(lls, rows, golds)]
    by = [float(argmax([x / len(c.encode()) for x, c in zip(l, r["choices"])]) == g) for l, r, g in zip(lls, rows, golds)]
    assert out["metrics"]["acc"][0] == sum(acc) / 3 and out["metrics"]["acc_norm"][0] == sum(norm) / 3
    assert out["metrics"]["acc_bytes"][0] == sum(by) / 3
    assert out["metrics"]["acc"][2] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)  # chance
    assert out["items"][0]["context"] == "Q: which?"
    per_choice = evaluate_task(model, ENC, task, batch_size=2, context_once=False)
    assert [i["is_greedy"] for i in per_choice["items"]] == [i["is_greedy"] for i in out["items"]]


def test_rolling_metrics(tmp_path, model):
    texts = ["the river town wakes up early " * 6, "河边的小镇醒得很早", "a"]
    task = read_task(write(tmp_path, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: text\n",
                           [{"text": t} for t in texts]))
    out = evaluate_task(model, ENC, task)
    ll = sum(i["loglikelihood"] for i in out["items"])
    nbytes = sum(len(t.encode()) for t in texts)
    assert out["metrics"]["bits_per_byte"][0] == pytest.approx(-ll / nbytes / math.log(2), rel=1e-12)
    assert out["metrics"]["word_perplexity"][0] == pytest.approx(math.exp(-ll / sum(len(re.split(r"\s+", t)) for t in texts)), rel=1e-12)
    assert out["items"][0]["tokens"] > 40  # several windows
    one = read_task(write(tmp_path, "output_type: loglikelihood_rolling\ndoc_to_target: text\n", [{"text": texts[0]}]))
    windows = ENC.rolling_windows(texts[0])
    assert evaluate_task(model, ENC, one)["items"][0]["loglikelihood"] == pytest.approx(
        sum(ll for ll, _ in score_rows(model, windows, 40)), rel=1e-6)


@pytest.mark.parametrize("yaml_text,rows,match", [
    (MC + "process_docs: !function utils.process\n", [ROW], r"t\.yaml:11: process_docs is a !function"),
    (MC.replace("answer\n", "!function utils.target\n"), [ROW], r"t\.yaml:10: doc_to_target is a !function"),
    (MC + "process_docs: x\n", [ROW], r"t\.yaml:11: key 'process_docs' is outside the lm-eval subset"),
    (MC + "num_fewshot: 5\n", [ROW], r"t\.yaml:11: num_fewshot must be 0"),
    ("output_type: generate_until\n", [ROW], r"t\.yaml:7: output_type 'generate_until' is not supported"),
    (MC.replace("{{q}}", "{{question}}"), [ROW], r"t\.yaml:8: doc_to_text refers to field 'question', which "
                                                  r".*d\.jsonl:1 does not have \(fields: q, choices, answer\)"),
    (MC.replace("{{q}}", "{{ q | upper }}"), [ROW], r"t\.yaml:8: doc_to_text uses Jinja beyond"),
    (MC, [ROW, {**ROW, "choices": []}], r"d\.jsonl:2 \(task .*\): the choice list is \[\]"),
    (MC, [{**ROW, "answer": 2}], r"d\.jsonl:1 \(task .*\): the gold index 2 is out of range for 2 choices"),
    (MC, [{**ROW, "answer": "c"}], r"the answer 'c' is not one of the choices"),
    (MC + "metric_list:\n  - metric: exact_match\n", [ROW], r"t\.yaml:11: metric 'exact_match' is not supported"),
    # no delimiter: the tokenizer merges "之后是星期二" across the join, so the choice tokenizes to nothing after the
    # context (lm-eval's HFLM asserts len(continuation_enc) > 0 on it)
    (MC.replace("Q: {{q}}", "{{q}}") + "target_delimiter: \"\"\n",
     [ROW, {"q": "星期日之后是", "choices": ["星期二", "星期一"], "answer": 1}],
     r"d\.jsonl:2 \(task .*\), choice 0 '星期二': tokenizes to nothing after the context"),
])
def test_bad_input_is_a_sentence(tmp_path, model, yaml_text, rows, match):
    with pytest.raises(TaskError, match=match):
        evaluate_task(model, ENC, read_task(write(tmp_path, yaml_text, rows)))


def test_bundled_eval_data():
    mc, text = read_task(DATA_DIR / "eval" / "sample_mc.yaml"), read_task(DATA_DIR / "eval" / "heldout.yaml")
    items = [mc.item(i) for i in range(len(mc.docs))]
    assert len(items) >= 300 and {d["lang"] for d in mc.docs} == {"en", "zh"}
    trained = {json.loads(l)["text"] for l in (DATA_DIR / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()}
    assert len(text.docs) >= 200 and not trained & {d["text"] for d in text.docs}


def test_bundled_choices_split_where_lm_eval_splits():
    """Every bundled choice's tokens follow its question's tokens unchanged (no merge across the join)."""
    mc = read_task(DATA_DIR / "eval" / "sample_mc.yaml")
    check_split(mc.docs, mc.target_delimiter)


def test_bundled_task_hf_equals_minillm(tmp_path, monkeypatch):
    """train/evaluate.py --impl hf (lm-eval's own HFLM) and --impl minillm on the bundled sample_mc task: the same
    acc/acc_norm and per-item log-likelihoods (lm-eval reads the YAML's data_files from the repository root)."""
    from train.evaluate import main

    monkeypatch.chdir(ROOT)
    d = tmp_path / "model"
    random_model(ModelConfig.preset("tiny", pad_token_id=3, eos_token_id=0), 0).eval().save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / f, d / f)
    res = {}
    for impl in ("hf", "minillm"):
        assert main(["--model", str(d), "--tasks", str(DATA_DIR / "eval" / "sample_mc.yaml"), "--impl", impl,
                     "--batch_size", "32", "--output_dir", str(tmp_path / impl)]) == 0
        res[impl] = json.loads((tmp_path / impl / "results.json").read_text())["tasks"]["sample_mc"]
    for m in ("acc", "acc_norm"):
        assert res["hf"]["metrics"][m]["value"] == res["minillm"]["metrics"][m]["value"]
    assert res["hf"]["metrics"]["acc"]["chance"] == res["minillm"]["metrics"]["acc"]["chance"] == 0.25
    for a, b in zip(res["hf"]["items"], res["minillm"]["items"], strict=True):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], rel=1e-5) and a["gold"] == b["gold"]


def test_cli(tmp_path, model, capsys):
    from train.evaluate import main

    d = tmp_path / "model"
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / f, d / f)
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "the river town wakes up early"}\n', encoding="utf-8")
    task = write(tmp_path, MC, [ROW] * 3)
    assert main(["--model", str(d), "--tasks", str(task), "--validation_files", str(val),
                 "--output_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "acc_norm" in out and "bits_per_byte" in out and "chance" in out
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(res["tasks"]["t"]["items"]) == 3 and "loglikelihoods" in res["tasks"]["t"]["items"][0]
    bad = write(tmp_path, MC + "process_docs: x\n", [ROW])
    assert main(["--model", str(d), "--tasks", str(bad), "--output_dir", str(tmp_path / "out")]) == 2
    assert "key 'process_docs'" in capsys.readouterr().err

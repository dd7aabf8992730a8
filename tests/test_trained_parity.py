"""`parity.checkpoint.compare` on checkpoints the project's own training scripts write.

Random weights rarely predict eos; a trained model does, and then generation stops mid-batch, which is
where an unequal stopping rule shows. So the runs here are short but trained to a peaked model on a tiny
corpus of short documents (eos every ~6 tokens) and short chat replies (<|im_end|> every ~6 tokens), and each
test checks that rows really stopped at eos. One session fixture trains everything in-process, single
process (no DeepSpeed): pretrain.py with --impl minillm and hf, then LoRA finetune.py with both impls on the
minillm base. LoRA is checked as an adapter (minillm load_adapter vs peft PeftModel) and merged
(minillm merge_and_unload / peft merge_and_unload -> save_pretrained -> a plain checkpoint).
"""

from __future__ import annotations

import importlib
import itertools
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from parity import checkpoint as pc

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--max_steps", "30", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8", "--seed", "1",
          "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
NAMES = ["Ada", "Bo", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal"]
OBJECTS = ["tea", "a cat", "bread", "the sea", "a lamp", "rice"]
CHAT = "<|im_start|>user\nWhat does Ada like?<|im_end|>\n<|im_start|>assistant\n"


def _train(script: str, argv: list[str], tmp: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setenv("MINILLM_CACHE", str(tmp / "cache"))
        # the scripts make every torch.load in the process weights-only: undo that for the rest of the session
        mp.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
        mp.syspath_prepend(str(ROOT / "train"))
        mp.setattr(sys, "argv", [script, *argv, "--cache_dir", str(tmp / "cache")])
        importlib.import_module(script.removesuffix(".py")).main()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_all(tmp_path_factory.mktemp("trained"))
    finally:
        torch.set_num_threads(threads)


def _train_all(tmp: Path) -> Path:
    with open(tmp / "pre.jsonl", "w") as f:
        for n, v, o in itertools.product(NAMES, ["likes", "sees", "buys", "finds"], OBJECTS):
            f.write(json.dumps({"text": f"{n} {v} {o}."}) + "\n")
    with open(tmp / "sft.jsonl", "w") as f:
        for n, o in itertools.product(NAMES, OBJECTS):
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"What does {n} like?"},
                                                  {"from": "assistant", "value": f"{n} likes {o}."}]}) + "\n")
    for impl in ("minillm", "hf"):
        _train("pretrain.py", ["--impl", impl, "--config_name", "tiny", "--train_files", str(tmp / "pre.jsonl"),
                               "--block_size", "32", "--output_dir", str(tmp / f"pre-{impl}"), *COMMON], tmp)
    for impl in ("minillm", "hf"):
        _train("finetune.py", ["--impl", impl, "--model_name_or_path", str(tmp / "pre-minillm"), "--use_lora",
                               "--lora_target_modules", "all-linear", "--train_files", str(tmp / "sft.jsonl"),
                               "--max_len", "64", "--output_dir", str(tmp / f"lora-{impl}"), *COMMON], tmp)
    return tmp


def _check(rows, min_stops: int = 1) -> None:
    assert all(r.passed for r in rows), "\n" + pc.format_table(rows)
    gen = next(r for r in rows if r.check.startswith("greedy generate"))
    stopped = int(re.search(r"(\d+)/\d+ rows stopped at eos", gen.note).group(1))
    assert stopped >= min_stops, f"too few rows stopped at eos, the eos rule was not exercised: {gen.note}"


def _im_end(path: Path) -> int:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id("<|im_end|>")


@pytest.mark.parametrize("impl", ["minillm", "hf"])
def test_pretrained_checkpoint_passes_with_eos_stops(trained, impl):
    _check(pc.compare(str(trained / f"pre-{impl}"), new_tokens=24, prompts=["Ada likes", "Eve"]), min_stops=2)


def test_the_old_rule_would_have_failed(trained):
    """What issue 9 saw: transformers with eos suppressed (min_new_tokens) vs minillm stopping at eos differ on
    this checkpoint, so the passing test above is not passing by luck of never meeting eos."""
    from transformers import AutoModelForCausalLM

    from minillm import CausalLM

    path = trained / "pre-minillm"
    ours, ref = CausalLM.from_pretrained(path).eval(), AutoModelForCausalLM.from_pretrained(path).eval()
    eos, pad = pc.generation_rules(ref)
    ids, mask = pc.prompt_batch(ours.config.vocab_size, [[i] for i in range(4, 8)], 4, 0, pad)
    with torch.no_grad():
        a = ours.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=pad)
        b = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, min_new_tokens=16,
                         pad_token_id=pad)
        ga, gb = pc.greedy_both(ours, ref, ids, mask, 16, eos, pad)
    assert pc.token_mismatches(a, b) > 0
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("impl", ["minillm", "hf"])
def test_lora_adapter_passes_minillm_vs_peft(trained, impl):
    base, adapter = trained / "pre-minillm", trained / f"lora-{impl}"
    rows = pc.compare(str(base), adapter=str(adapter), new_tokens=24, prompts=[CHAT], eos=[_im_end(base)])
    assert any(r.check.startswith("LoRA merged") for r in rows)
    _check(rows)


@pytest.mark.parametrize("impl", ["minillm", "hf"])
def test_merged_lora_checkpoint_passes(trained, impl, tmp_path):
    """The adapter merged into its base and saved as a plain checkpoint, by minillm (minillm's adapter) or by
    peft (peft's adapter): an ordinary checkpoint that both libraries load to the same model."""
    base, adapter, out = trained / "pre-minillm", trained / f"lora-{impl}", tmp_path / "merged"
    if impl == "minillm":
        from minillm import CausalLM
        from minillm.peft import load_adapter, merge_and_unload
        model = CausalLM.from_pretrained(base)
        load_adapter(model, adapter)
        merge_and_unload(model).save_pretrained(out)
    else:
        import peft
        from transformers import AutoModelForCausalLM
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        model.merge_and_unload().save_pretrained(out)
    shutil.copy(base / "tokenizer.json", out / "tokenizer.json")
    _check(pc.compare(str(out), new_tokens=24, prompts=[CHAT], eos=[_im_end(base)]))


def test_adapter_given_as_the_model_is_named(trained, capsys):
    adapter = trained / "lora-hf"
    with pytest.raises(SystemExit) as e:
        pc.main([str(adapter)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert "is a LoRA adapter" in err and f"base model {base}" in err and f"--adapter {adapter}" in err


def test_cli_with_adapter_exits_zero(trained, capsys):
    base = trained / "pre-minillm"
    rc = pc.main([str(base), "--adapter", str(trained / "lora-minillm"), "--eos", "<|im_end|>", "--new-tokens", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "LoRA merged" in out and "eos [2]" in out


def test_generation_config_json_sets_eos_and_nothing_else(trained, tmp_path):
    """A checkpoint's generation_config.json (as published chat models ship) gives the eos ids both sides stop
    at; its sampling and repetition settings, which minillm's generate does not have, are not applied (strong
    values here, so that applying them on the transformers side would change tokens)."""
    d = tmp_path / "with-generation-config"
    shutil.copytree(trained / "pre-minillm", d)
    (d / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "top_k": 3, "temperature": 0.6, "repetition_penalty": 100.0, "no_repeat_ngram_size": 1,
         "eos_token_id": [0, 2]}))
    rows = pc.compare(str(d), new_tokens=24, prompts=["Ada likes", "Eve"])
    assert "eos [0, 2]" in rows[2].note
    _check(rows, min_stops=2)
    # without eos the rows run on into repeated tokens, where a repetition penalty would show
    _check(pc.compare(str(d), new_tokens=24, prompts=["Ada likes", "Eve"], eos=[]), min_stops=0)

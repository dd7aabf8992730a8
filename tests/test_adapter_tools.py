"""The user-facing tools with every adapter type: the chat CLI's loader (minillm.generate.load_chat) and
`python -m parity.checkpoint BASE --adapter DIR`, on prompt tuning, prefix tuning (with and without
prefix_projection), LoRA on embed_tokens and Houlsby adapters.

Each adapter is built on a tiny random model, its trainable tensors perturbed so that it changes the greedy
reply, saved with peft_format.save_adapter next to the base (save_pretrained + the bundled tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from minillm import ModelConfig
from minillm import peft as peft_format
from minillm.peft import houlsby as ha
from minillm import generate as mg
from minillm import generation as gen
from minillm.peft.lora import LoraConfig, apply_lora
from minillm.peft.prefix import PrefixTuningConfig, PrefixTuningLM
from minillm.peft.prompt import PromptTuningConfig, PromptTuningLM
from minillm.sft import chatml_prompt_ids
from parity import checkpoint as pc
from parity import model as pm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "minillm" / "data" / "tokenizer" / "tokenizer.json"
KINDS = ["prompt", "prefix", "prefix-proj", "lora-embed", "houlsby"]
PEFT_KINDS = ["prompt", "prefix", "prefix-proj", "lora-embed"]  # the ones peft loads
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hi"}]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _base():
    # eos 0 is never produced by chance often enough to matter; pad 3 as in tests/test_generate.py
    cfg = ModelConfig.preset("tiny", vocab_size=4096, hidden_size=32, head_dim=8, intermediate_size=48, pad_token_id=3,
                             eos_token_id=0)
    return pm.random_model(cfg, 0).eval()


def adapted(kind: str):
    """The base model with a `kind` adapter whose trainable tensors are perturbed (so it matters)."""
    model = _base()
    if kind == "prompt":
        model = PromptTuningLM(model, PromptTuningConfig(num_virtual_tokens=3))
    elif kind.startswith("prefix"):
        model = PrefixTuningLM(model, PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=kind.endswith("proj"),
                                                         encoder_hidden_size=16))
    elif kind == "lora-embed":
        apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"]),
                   verbose=False)
    else:
        ha.apply_adapters(model, ha.HoulsbyConfig(bottleneck=8, train_norms=True), verbose=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """{"base": base dir, kind: adapter dir for each kind}; the in-memory adapted models are rebuilt by `adapted`."""
    root = tmp_path_factory.mktemp("adapters")
    out = {"base": root / "base"}
    _base().save_pretrained(out["base"])
    shutil.copy(TOKENIZER, out["base"] / "tokenizer.json")
    for kind in KINDS:
        out[kind] = root / kind
        peft_format.save_adapter(adapted(kind), out[kind], base_model_name_or_path=str(out["base"]))
    return out


def _greedy_ids(model, tok, n: int = 12) -> list[int]:
    ids = torch.tensor([chatml_prompt_ids(tok, MESSAGES)])
    return gen.generate(model, ids, max_new_tokens=n, eos_token_id=mg.stop_ids(model, tok))[0, ids.shape[1]:].tolist()


# ---- the chat CLI's loader --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_chat_loader_reply_equals_the_adapted_model(dirs, kind):
    model, tok, _ = mg.load_chat(str(dirs["base"]), str(dirs[kind]))
    if kind == "lora-embed":  # merged: a plain model again, its embedding table updated
        assert type(model).__name__ == "CausalLM" and not any("lora" in n for n, _ in model.named_parameters())
    elif kind != "houlsby":
        assert type(model).__name__ == ("PromptTuningLM" if kind == "prompt" else "PrefixTuningLM")
    if kind == "prefix-proj":
        assert not model.project  # a saved projected prefix is its table: it loads without the MLP
    mine = adapted(kind)
    got = _greedy_ids(model, tok)
    assert got == _greedy_ids(mine, tok)
    assert got != _greedy_ids(_base(), tok), "the adapter does not change the reply: the test would prove nothing"
    text = mg.reply(model, tok, MESSAGES, 12)  # the chat's own path: streaming through TextStream
    assert text and text == mg.reply(mine, tok, MESSAGES, 12)


def test_chat_cli_with_a_prefix_adapter(dirs, capsys):
    assert mg.main(["--model", str(dirs["base"]), "--adapter", str(dirs["prefix"]), "--prompt", "hi",
                    "--max_new_tokens", "6"]) == 0
    model, tok, _ = mg.load_chat(str(dirs["base"]), str(dirs["prefix"]))
    assert capsys.readouterr().out == f"user: hi\nassistant: {mg.reply(model, tok, MESSAGES, 6)}\n"


@pytest.mark.parametrize("kind,name", [("prefix", "prefix-tuning adapter"), ("prompt", "prompt-tuning adapter"),
                                       ("houlsby", "Houlsby adapter"), ("lora-embed", "LoRA adapter")])
def test_adapter_given_as_the_model_names_its_type(dirs, kind, name):
    with pytest.raises(SystemExit) as e:
        mg.main(["--model", str(dirs[kind])])
    assert str(e.value.code) == (f"python -m minillm.generate: error: --model {dirs[kind]} is a {name}, not a model; "
                                 f"its adapter_config.json names the base model {dirs['base']}: load it with "
                                 f"python -m minillm.generate --model {dirs['base']} --adapter {dirs[kind]}")


def test_model_given_as_the_adapter_is_named(dirs, tmp_path):
    with pytest.raises(SystemExit) as e:
        mg.main(["--model", str(dirs["base"]), "--adapter", str(dirs["base"]), "--prompt", "hi"])
    msg = str(e.value.code)
    assert f"--adapter {dirs['base']} is a model (config.json + weights), not an adapter" in msg
    assert "prefix-tuning adapter" in msg and "\n" not in msg
    with pytest.raises(SystemExit) as e:
        pc.main([str(dirs["base"]), "--adapter", str(tmp_path)])
    assert e.value.code == 2


# ---- parity.checkpoint --adapter ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_parity_checkpoint_passes_on_every_adapter_type(dirs, kind, capsys):
    rc = pc.main([str(dirs["base"]), "--adapter", str(dirs[kind]), "--new-tokens", "6"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "FAIL" not in out and "SKIP" not in out and out.count("PASS") >= 3, out
    assert ("LoRA merged" in out) == (kind == "lora-embed")
    if kind == "houlsby":
        assert "peft cannot load" in out and "paper equations" in out


@pytest.mark.parametrize("kind", KINDS)
def test_parity_checkpoint_fails_when_minillm_loads_the_adapter_wrong(dirs, kind, monkeypatch, capsys):
    """A mutant loader (the adapter's tensors slightly off after loading, on minillm's side only): rows fail.
    The Houlsby reference reads the file, not minillm's modules, so it catches it too."""
    load = peft_format.load_adapter

    def off(model, save_dir, **kw):
        model = load(model, save_dir, **kw)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora" in n or "adapter." in n or n in ("prompt_encoder.weight", "embedding.weight"):
                    p.mul_(1.01)
        return model

    monkeypatch.setattr(peft_format, "load_adapter", off)
    rc = pc.main([str(dirs["base"]), "--adapter", str(dirs[kind]), "--new-tokens", "6"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out, out


@pytest.mark.parametrize("kind", ["lora-embed", "prefix", "houlsby"])
def test_parity_checkpoint_in_bfloat16(dirs, kind):
    """A bf16 base: generate's KV cache takes the base's dtype, not that of an adapter's fp32 tensors (LoRA's
    lora_embedding_A/B come first in parameters()); Houlsby has no bf16 reference and says so (SKIP)."""
    rows = pc.compare(str(dirs["base"]), dtype=torch.bfloat16, new_tokens=6, adapter=str(dirs[kind]))
    verdicts = {r.verdict for r in rows}
    assert verdicts == ({"SKIP"} if kind == "houlsby" else {"PASS"}), pc.format_table(rows)
    if kind == "houlsby":
        assert "no reference for bfloat16" in rows[0].note


@pytest.mark.parametrize("kind", KINDS)
def test_parity_checkpoint_rows_that_stop_at_eos(dirs, kind):
    """Both rows stop at eos, at different steps (eos ids taken from the adapted model's own run without eos):
    the stopping rule on both sides (for prompt/prefix: applied to peft_greedy's tokens afterwards) agrees."""
    import re
    model, _, _ = mg.load_chat(str(dirs["base"]), str(dirs[kind]))
    ids, mask = pc.prompt_batch(4096, [], 24, 0, 3)  # the batch compare builds without text prompts
    free = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    eos = [int(free[0, ids.shape[1] + 1]), int(free[1, ids.shape[1] + 4])]
    rows = pc.compare(str(dirs["base"]), new_tokens=8, adapter=str(dirs[kind]), prompts=[], eos=eos)
    assert all(r.passed and r.verdict == "PASS" for r in rows), pc.format_table(rows)
    note = next(r.note for r in rows if r.check.startswith("greedy"))
    assert re.search(r"2/2 rows stopped at eos \(steps \d, \d\)", note), note


def test_stop_at_eos_matches_generate_with_eos():
    """The eos rule applied afterwards (used for peft_greedy's tokens) equals generate's own rule."""
    model = _base()
    ids = torch.randint(5, 4096, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    free = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    for eos in ([int(free[0, 6])], [int(free[0, 6]), int(free[2, 9])], [int(free[1, 8])], []):
        want = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=3)
        assert torch.equal(pc.stop_at_eos(free, 5, eos, 3), want), eos


def test_houlsby_reference_gap_names_what_it_lacks(dirs, tmp_path):
    d = tmp_path / "qwen3"
    cfg = ModelConfig.preset("tiny", model_type="qwen3", vocab_size=4096, hidden_size=32, head_dim=8,
                                  intermediate_size=48)
    pm.random_model(cfg, 0).save_pretrained(d)
    model = ha.apply_adapters(pm.random_model(cfg, 0), ha.HoulsbyConfig(bottleneck=8), verbose=False)
    peft_format.save_adapter(model, tmp_path / "a")
    rows = pc.compare(str(d), new_tokens=4, adapter=str(tmp_path / "a"), prompts=[])
    assert len(rows) == 1 and rows[0].verdict == "SKIP" and "model_type qwen3" in rows[0].note
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == pc.HOULSBY


def test_virtual_tokens_count_towards_max_position_embeddings():
    """Prompt/prefix tuning put P virtual tokens at the first positions: the length warning counts them."""
    model = PrefixTuningLM(_base(), PrefixTuningConfig(num_virtual_tokens=3))
    limit = model.config.max_position_embeddings
    ids = torch.ones(1, limit - 4, dtype=torch.long)
    with pytest.warns(UserWarning, match=r"3 virtual tokens \+ prompt \+ max_new_tokens"):
        gen.generate(model, ids, max_new_tokens=2, eos_token_id=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gen.generate(model, ids[:, 1:], max_new_tokens=2, eos_token_id=[])  # 3 + limit - 5 + 2 = limit: no warning

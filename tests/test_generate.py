"""minillm.generation: argument checks, whole-character streaming, the chat CLI on bad input, the sampling rows."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm import ModelConfig
from minillm import generate as mg
from minillm import generation as gen
from minillm.sft import chatml_prompt_ids
from parity import generate as pg
from parity import model as pm

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "minillm" / "data" / "tokenizer" / "tokenizer.json"


def _tiny(vocab: int = 64, max_pos: int = 2048):
    cfg = ModelConfig.preset("tiny", vocab_size=vocab, pad_token_id=3, eos_token_id=0, max_position_embeddings=max_pos)
    return pm.random_model(cfg, 0).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny model with the bundled tokenizer, max_position_embeddings 48 (long prompts are easy)."""
    d = tmp_path_factory.mktemp("chat")
    _tiny(4096, max_pos=48).save_pretrained(d)
    shutil.copy(TOKENIZER, d / "tokenizer.json")
    return d


# ---- argument checks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"max_new_tokens": -3}, "max_new_tokens must be an integer >= 1"),
    ({"do_sample": True, "temperature": 0.0}, r"temperature \(=0.0\) has to be > 0 .*do_sample=False"),
    ({"do_sample": True, "temperature": -0.5}, r"temperature \(=-0.5\) has to be > 0"),
    ({"temperature": -0.5}, r"temperature \(=-0.5\) has to be > 0"),  # never the reversed distribution
    ({"do_sample": True, "temperature": float("nan")}, "temperature must be a finite number"),
    ({"do_sample": True, "top_k": -1}, "top_k must be an integer >= 0"),
    ({"do_sample": True, "top_k": 2.5}, "top_k must be an integer >= 0"),
    ({"do_sample": True, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"do_sample": True, "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"do_sample": True, "top_p": -0.1}, r"top_p must be in \(0, 1\]"),
])
def test_bad_generation_arguments_are_one_line_errors(kwargs, match):
    m = _tiny()
    with pytest.raises(ValueError, match=match) as e:
        m.generate(torch.tensor([[5, 6]]), **{"max_new_tokens": 4, **kwargs})
    assert "\n" not in str(e.value)


def test_edge_values_that_transformers_accepts_work():
    m, ids = _tiny(), torch.tensor([[5, 6, 7]])
    greedy = m.generate(ids, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(m.generate(ids, max_new_tokens=5, eos_token_id=[], temperature=0.0), greedy)  # ignored
    g = torch.Generator().manual_seed(0)
    for kw in ({"top_k": 0, "top_p": 1.0}, {"top_p": 1e-9}, {"top_k": 1000}):
        out = m.generate(ids, max_new_tokens=5, eos_token_id=[], do_sample=True, generator=g, **kw)
        assert out.shape == greedy.shape
    assert torch.equal(m.generate(ids, max_new_tokens=5, eos_token_id=[], do_sample=True, top_p=1e-9, generator=g),
                       greedy)  # only the most likely token survives


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="at least one prompt token"):
        _tiny().generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)


def test_prompt_longer_than_max_position_embeddings_warns():
    m = _tiny(max_pos=16)
    with pytest.warns(UserWarning, match=r"prompt alone \(20 tokens\) is longer than the model's "
                                         r"max_position_embeddings \(16\)"):
        m.generate(torch.randint(4, 64, (1, 20)), max_new_tokens=2, eos_token_id=[])
    with pytest.warns(UserWarning, match=r"prompt \+ max_new_tokens \(10 \+ 8\)"):
        m.generate(torch.randint(4, 64, (1, 10)), max_new_tokens=8, eos_token_id=[])


# ---- whole characters only ---------------------------------------------------------------------------
def _byte_ids(tok, data: bytes) -> list[int]:
    """One token per byte, through GPT-2's byte-to-symbol table (the bundled tokenizer is byte-level BPE)."""
    symbols = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in symbols:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [tok.token_to_id(table[b]) for b in data]


def _stream(tok, ids: list[int], eos=(0,)) -> list[str]:
    pieces: list[str] = []
    s = gen.TextStream(tok, list(eos), pieces.append)
    for i in ids:
        s.put(torch.tensor([i]))
    s.end()
    return pieces


def test_text_stream_releases_only_whole_characters():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(TOKENIZER))
    text = "梯度 ok 下降🙂"
    ids = _byte_ids(tok, text.encode())
    assert None not in ids and tok.decode(ids[:1]) == "\ufffd"  # the first byte alone is half a character
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[0] == "梯" and len(pieces) == len(text)  # one release per completed character
    # stopped mid-character (last byte of 🙂 missing), or an invalid byte: dropped, never shown as "�"
    assert "".join(_stream(tok, ids[:-1])) == text[:-1]
    assert "".join(_stream(tok, _byte_ids(tok, b"a\xffb\xe6\xa2"))) == "ab"
    # eos ends the stream: what comes after it (padding) is not text
    assert "".join(_stream(tok, _byte_ids(tok, b"hi") + [0] + _byte_ids(tok, b"there"))) == "hi"


def test_streamed_reply_is_the_decoded_reply(model_dir):
    model, tok, _ = mg.load_chat(str(model_dir), None)
    msgs = [{"role": "user", "content": "What is gradient descent?"}]
    pieces: list[str] = []
    text = mg.reply(model, tok, msgs, 20, pieces.append)
    ids = torch.tensor([chatml_prompt_ids(tok, msgs)])
    out = model.generate(ids, max_new_tokens=20, eos_token_id=mg.stop_ids(model, tok))[0, ids.shape[1]:].tolist()
    out = [i for i in out if i not in mg.stop_ids(model, tok)]
    assert text == "".join(pieces).strip() == tok.decode(out, skip_special_tokens=True).replace("\ufffd", "").strip()


# ---- the command line ----------------------------------------------------------------------------------
def test_help_documents_the_sampling_flags_and_defaults():
    text = " ".join(mg.build_parser().format_help().split())
    for flag, default in [("--system", "You are a helpful assistant."), ("--temperature", "greedy decoding"),
                          ("--top_k", "no top-k filtering"), ("--top_p", "1.0, no top-p filtering"),
                          ("--max_new_tokens", "default: 128")]:
        assert flag in text and default in text, (flag, default)


@pytest.mark.parametrize("argv,match", [
    (["--temperature", "-1"], r"--temperature \(=-1.0\) has to be > 0"),
    (["--temperature", "0"], "for greedy decoding leave out --temperature"),
    (["--top_p", "0"], r"--top_p must be in \(0, 1\]"),
    (["--top_p", "1.01"], r"--top_p must be in \(0, 1\]"),
    (["--top_k", "-1"], "--top_k must be an integer >= 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be an integer >= 1"),
    (["--raw", "--prompt", ""], "empty prompt gives the model nothing to continue"),
    (["--raw"], "--raw needs --prompt"),
])
def test_cli_bad_arguments_are_one_line_errors(model_dir, argv, match):
    with pytest.raises(SystemExit) as e:
        mg.main(["--model", str(model_dir), *argv])
    msg = str(e.value.code)
    assert msg.startswith("python -m minillm.generate: error: ") and "\n" not in msg
    assert re.search(match, msg), msg


def test_cli_names_the_base_model_of_an_adapter_given_as_model(tmp_path):
    config = {"peft_type": "LORA", "base_model_name_or_path": "out/base"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
        mg.main(["--model", str(tmp_path)])
    assert str(e.value.code) == (f"python -m minillm.generate: error: --model {tmp_path} is a LoRA adapter, not a "
                                 f"model; its adapter_config.json names the base model out/base: load it with "
                                 f"python -m minillm.generate --model out/base --adapter {tmp_path}")


def test_cli_raw_and_chat_prompts(model_dir, capsys):
    assert mg.main(["--model", str(model_dir), "--raw", "--prompt", "Once upon", "--max_new_tokens", "6"]) == 0
    assert mg.main(["--model", str(model_dir), "--prompt", "hi", "--prompt", "你好", "--max_new_tokens", "6",
                    "--top_p", "0.9", "--temperature", "0.7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon") and out.count("assistant: ") == 2 and "\ufffd" not in out


def test_interactive_chat_survives_bad_input(model_dir):
    """Invalid UTF-8 typed in, and a message past max_position_embeddings: a sentence each, the chat goes on."""
    lines = b"hello\n\xff\xfe broken\n" + b"long " * 60 + b"\nbye\n"
    p = subprocess.run([sys.executable, "-m", "minillm.generate", "--model", str(model_dir), "--max_new_tokens", "4"],
                       input=lines, capture_output=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, err
    assert "not valid UTF-8" in err and "Traceback" not in err
    assert "max_position_embeddings (48)" in err
    assert out.count("assistant: ") == 3  # hello, the long line, bye


# ---- the parity rows of this area, and that they can fail ------------------------------------------------
def test_generate_parity_rows_pass():
    rows = list(pg.rows(0.25))
    assert [r.check for r in rows] == ["greedy, peaked weights, eos stops (mism.)",
                                       "greedy, several eos ids, no pad set (mism.)", "temperature/top-k/top-p filtering",
                                       "sampled generate, same seed (mism.)"]
    assert all(r.passed and r.configs >= 3 for r in rows), [(r.check, r.note) for r in rows]


def _top_p_bug(kind: str):
    def warp(logits, temperature=None, top_k=None, top_p=None):
        logits = gen.warp_logits(logits, temperature, top_k, None)  # temperature and top-k as they are
        if top_p is not None and top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=kind == "descending")
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cum < (1 - top_p) if kind == "strict" else cum <= (1 - top_p)
            remove[..., -2 if kind == "keep-one-more" else -1:] = False
            logits = logits.masked_fill(remove.scatter(1, idx, remove), -float("inf"))
        return logits
    return warp


@pytest.mark.parametrize("kind", ["strict", "keep-one-more", "descending"])
def test_warper_row_catches_a_planted_top_p_bug(kind, monkeypatch):
    monkeypatch.setattr(pg, "warp_logits", _top_p_bug(kind))
    row, = pg.property_rows([("warpers", "ref", "warpers")], pg.logits_cases(), lambda c: [pg.warper_delta(c)],
                                300)
    assert not row.passed and "warpers: |Δ|" in row.note

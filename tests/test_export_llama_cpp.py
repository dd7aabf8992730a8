"""minillm.export's GGUF run by llama.cpp itself (llama-cpp-python): `make export-check`.

Skipped when llama_cpp is not importable (it compiles llama.cpp: pip install -e '.[export]', ~20 minutes on 2
cores), so `make test` does not pay for it; tests/test_export.py checks the same files with gguf's reader there.

On the same token ids llama.cpp's logits equal minillm's within LOGIT_TOL[outtype]; in f32 greedy continuations
are token-identical (llama.cpp's KV cache, one token at a time); llama.cpp tokenizes text as minillm does; and
llama.cpp's own chat completion (the GGUF's template applied by llama-cpp-python) gives the reply
`minillm.generate.reply` gives and stops at <|im_end|>, for a chat model taught the demo's questions.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from minillm import export as ex
from minillm.config import ModelConfig
from minillm.generate import reply, stop_ids
from minillm.generation import generate
from minillm.model import CausalLM
from minillm.sft import DEFAULT_SYSTEM_PROMPT, chatml_prompt_ids
from test_export import PIECES, ROOT, TOKENIZER, configs, make_model, texts  # noqa: E402
from train.demo import QUESTIONS, taught_answers

llama_cpp = pytest.importorskip(
    "llama_cpp", exc_type=ImportError,
    reason="llama-cpp-python is not installed (it compiles llama.cpp, ~20 min): make export-check installs it")

pytestmark = pytest.mark.usefixtures("one_thread")

# Largest |llama.cpp logit - minillm logit| allowed per --outtype, on the chat model below (logits up to ~21).
# Measured (llama-cpp-python 0.3.36, CPU, f32 KV cache; llama / qwen2 / qwen3): f32 1.7e-5 / 2.3e-5 / 9.5e-6,
# f16 2.0e-2 / 2.0e-2 / 1.4e-2, bf16 0.33 / 0.33 / 0.098, q8_0 0.89 / 0.89 / 0.23. About half of each is the
# weights' rounding (minillm run on the file's own weights differs by 0.025 / 0.28 / 0.43 for f16 / bf16 / q8_0),
# the rest llama.cpp's CPU matmuls, which round the activations to the weights' type too (q8_0 x q8_0 dot products).
# The bounds leave ~1.5-2.5x room; the chat replies are token-identical in q8_0 all the same (test below).
LOGIT_TOL = {"f32": 1e-4, "f16": 5e-2, "bf16": 0.6, "q8_0": 1.5}
SYSTEM = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
PROMPT = "What is gradient descent? 3.14 + 2024 = ?\n\n你好,世界! I've been told he's there.\n"


def llama(path: Path, kv_cache=None):
    """llama.cpp on one thread, with an f32 KV cache: its default f16 cache alone moves the tiny models' logits by
    ~1e-2 (measured), which would hide the file's own error."""
    kv = llama_cpp.GGML_TYPE_F32 if kv_cache is None else kv_cache
    return llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=512, n_threads=1,
                           n_batch=512, seed=0, type_k=kv, type_v=kv)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def minillm_logits(model: CausalLM, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """Greedy decoding through llama.cpp's KV cache, one token at a time."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER))


def prompt_ids() -> list[int]:
    return chatml_prompt_ids(tokenizer(), [SYSTEM, {"role": "user", "content": PROMPT}])


# ---- logits and greedy continuations, drawn configurations of each family ---------------------------------------

@settings(max_examples=10)
@given(configs, st.integers(0, 2**16))
def test_f32_logits_and_greedy_continuations_equal_minillms(tmp_path_factory, overrides, seed):
    check_f32(make_model(tmp_path_factory.mktemp("m"), seed=seed, initializer_range=0.2, **overrides))


def check_f32(d: Path, new_tokens: int = 24) -> None:
    """llama.cpp's logits on the f32 export of `d` within LOGIT_TOL of minillm's; greedy continuations equal."""
    gguf_file, _ = ex.export(d, d / "m.gguf", "f32")
    model, llm, ids = CausalLM.from_pretrained(d).eval(), llama(gguf_file), prompt_ids()
    diff = np.abs(llama_logits(llm, ids) - minillm_logits(model, ids)).max()
    assert diff <= LOGIT_TOL["f32"], f"{ModelConfig.from_hf(d)}: max |logit difference| {diff:.2e}"
    with torch.no_grad():
        want = generate(model, torch.tensor([ids]), max_new_tokens=new_tokens)[0, len(ids):].tolist()
    assert llama_greedy(llm, ids, new_tokens) == want


@pytest.mark.parametrize("model_type, rope_scaling", [
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}),
    ("llama", {"rope_type": "linear", "factor": 4.0}),
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ("qwen3", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "beta_fast": 32}),
    ("qwen3", {"rope_type": "linear", "factor": 2.0}),
], ids=["llama-llama3", "llama-linear", "qwen2-yarn", "qwen3-yarn", "qwen3-linear"])
def test_f32_each_rope_scaling_llama_cpp_runs(tmp_path, model_type, rope_scaling):
    """Every RoPE scaling export accepts, in each family that accepts it (the drawn test above may miss one)."""
    check_f32(make_model(tmp_path, initializer_range=0.2, model_type=model_type, rope_scaling=rope_scaling,
                         rope_theta=500000.0), new_tokens=16)


@pytest.mark.parametrize("overrides", [
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                      "attention_factor": 0.7}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 8}},
    {"hidden_act": "gelu"},
], ids=["yarn-attention-factor", "yarn-beta-fast", "gelu"])
def test_what_export_refuses_llama_cpp_would_indeed_run_differently(tmp_path, monkeypatch, overrides):
    """The refusals are not caution: written anyway (the check switched off), llama.cpp computes other logits."""
    d = make_model(tmp_path / "m", initializer_range=0.2, model_type="qwen2", **overrides)
    with pytest.raises(ValueError, match="cannot export to GGUF"):
        ex.export(d, tmp_path / "m.gguf", "f32")
    monkeypatch.setattr(ex, "check_supported", lambda config: None)
    gguf_file, _ = ex.export(d, tmp_path / "m.gguf", "f32")
    ids = prompt_ids()
    diff = np.abs(llama_logits(llama(gguf_file), ids) - minillm_logits(CausalLM.from_pretrained(d).eval(), ids)).max()
    assert diff > 100 * LOGIT_TOL["f32"], f"max |logit difference| only {diff:.2e}"


@pytest.mark.parametrize("outtype", list(LOGIT_TOL))
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_logits_within_the_stated_tolerance_per_outtype(tmp_path, chat_model, outtype, model_type):
    """The trained chat model (below), retyped to each family: its real logits, not a random init's."""
    d = chat_model if model_type == "llama" else _as_family(chat_model, tmp_path / model_type, model_type)
    gguf_file, _ = ex.export(d, tmp_path / f"{outtype}.gguf", outtype)
    ids = prompt_ids()
    want = minillm_logits(CausalLM.from_pretrained(d).eval(), ids)
    diff = np.abs(llama_logits(llama(gguf_file), ids) - want).max()
    print(f"\n{model_type} {outtype}: max |logit difference| {diff:.2e} (logits up to {np.abs(want).max():.1f})")
    assert diff <= LOGIT_TOL[outtype]


def _as_family(src: Path, d: Path, model_type: str) -> Path:
    """The same weights under another family's config (qwen2: zero q/k/v biases; qwen3: unit q/k norms)."""
    model = CausalLM.from_pretrained(src)
    new = CausalLM(replace(ModelConfig.from_hf(src), model_type=model_type))
    state = new.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            v.copy_(model.state_dict()[k] if k in model.state_dict() else torch.ones_like(v) if "norm" in k
                    else torch.zeros_like(v))
    new.save_pretrained(d)
    (d / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    return d


# ---- tokenization --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vocab_only(tmp_path_factory) -> object:
    d = make_model(tmp_path_factory.mktemp("tok"))
    gguf_file, _ = ex.export(d, d / "m.gguf", "q8_0")
    return llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)


@settings(max_examples=300)
@given(texts)
def test_llama_cpp_tokenizes_text_as_minillm(vocab_only, text):
    """pre "qwen2" in llama.cpp's own regex engine gives the bundled tokenizer's ids (test_export.py shows the
    same for tokenizers' engine), and the ids give back the text."""
    want = tokenizer().encode(text, add_special_tokens=False).ids
    assert vocab_only.tokenize(text.encode("utf-8"), add_bos=False, special=False) == want
    assert _detokenize(vocab_only._model, want).decode("utf-8") == text


def test_llama_cpp_tokenizes_the_chat_prompt_as_minillm(vocab_only):
    tok = tokenizer()
    messages = [SYSTEM, {"role": "user", "content": PROMPT + "".join(PIECES)}]
    want = chatml_prompt_ids(tok, messages, allow_control_tokens=True)
    text = tok.decode(want, skip_special_tokens=False)
    assert vocab_only.tokenize(text.encode("utf-8"), add_bos=False, special=True) == want


# ---- the chat: llama.cpp's chat completion with the GGUF's template -------------------------------------------------

@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return train_chat_model(tmp_path_factory.mktemp("chat"))


def train_chat_model(d: Path) -> Path:
    """A tiny llama taught the demo's frequent questions (English and Chinese) and their answers, each answer
    followed by <|im_end|>, as the demo's SFT does (150 AdamW steps on CPU, ~10 s). The demo's own chat model is
    checked too when it exists (test_demo_chat_model)."""
    torch.manual_seed(0)
    tok = tokenizer()
    model = CausalLM(ModelConfig.preset("tiny", eos_token_id=2, pad_token_id=3))
    rows = []
    for q, a in taught_answers(ROOT / "minillm" / "data" / "sft.jsonl", QUESTIONS).items():
        p = chatml_prompt_ids(tok, [SYSTEM, {"role": "user", "content": q}])
        t = tok.encode(a, add_special_tokens=False).ids + [tok.token_to_id("<|im_end|>")]
        rows.append((p + t, [-100] * len(p) + t))
    n = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [3] * (n - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (n - len(r[1])) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(d)
    (d / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    return d


def _detokenize(self, tokens: list[int], special: bool = False) -> bytes:
    """llama-cpp-python 0.3.36's LlamaModel.detokenize with its 32-byte piece buffer grown when a piece needs more.
    Unpatched it drops such pieces silently (abetlen/llama-cpp-python#2362, fix proposed in #2363): llama.cpp
    answers an undersized buffer with -(bytes needed), and `buffer[:n]` of a negative n is b''. The bundled
    tokenizer has 216 pieces over 32 bytes (whole taught sentences, up to 99 bytes), so a chat reply through
    llama-cpp-python loses them; llama.cpp's own programs (llama-cli, llama-server) and Ollama resize and are
    unaffected. The test checks llama.cpp's chat with the piece buffer fixed, and the token ids regardless."""
    out = b""
    for t in tokens:
        buf = ctypes.create_string_buffer(32)
        n = llama_cpp.llama_token_to_piece(self.vocab, llama_cpp.llama_token(t), buf, 32, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, llama_cpp.llama_token(t), buf, -n, 0, special)
        out += buf.raw[:n]
    return out


def check_chat(model_dir: Path, gguf_file: Path, questions: list[str], monkeypatch) -> None:
    monkeypatch.setattr(llama_cpp._internals.LlamaModel, "detokenize", _detokenize)
    model, tok = CausalLM.from_pretrained(model_dir).eval(), tokenizer()
    llm = llama(gguf_file)
    for q in questions:
        messages = [SYSTEM, {"role": "user", "content": q}]
        want = reply(model, tok, messages, max_new_tokens=96)
        with torch.no_grad():
            ids = chatml_prompt_ids(tok, messages)
            new = generate(model, torch.tensor([ids]), max_new_tokens=96, eos_token_id=stop_ids(model, tok))
        n_new = new.shape[1] - len(ids)  # minillm's reply in tokens, its <|im_end|> included
        # no system message: the GGUF's template adds minillm.generate's default, as the chat CLI does
        got = llm.create_chat_completion(messages=[{"role": "user", "content": q}], temperature=0.0,
                                         max_tokens=96, repeat_penalty=1.0, seed=0)
        assert got["choices"][0]["message"]["content"].strip() == want, q
        assert got["choices"][0]["finish_reason"] == "stop", f"{q}: llama.cpp did not stop at the end of the turn"
        assert got["usage"]["completion_tokens"] == n_new - 1, q  # llama-cpp-python leaves the <|im_end|> uncounted
        assert got["usage"]["prompt_tokens"] == len(ids), q


@pytest.mark.parametrize("outtype", list(LOGIT_TOL))
def test_llama_cpp_chat_answers_as_minillm_generate_and_stops(tmp_path, chat_model, outtype, monkeypatch):
    answers = taught_answers(ROOT / "minillm" / "data" / "sft.jsonl", QUESTIONS)
    model, tok = CausalLM.from_pretrained(chat_model).eval(), tokenizer()
    assert all(reply(model, tok, [SYSTEM, {"role": "user", "content": q}], 96) == a for q, a in answers.items())
    check_chat(chat_model, ex.export(chat_model, tmp_path / "chat.gguf", outtype)[0], QUESTIONS, monkeypatch)


DEMO_CHAT = Path(os.environ.get("MINILLM_DEMO_CHAT", ROOT / "out" / "demo" / "sft-full-minillm"))


@pytest.mark.skipif(not (DEMO_CHAT / "config.json").is_file(),
                    reason=f"no demo chat model at {DEMO_CHAT} (make demo, or MINILLM_DEMO_CHAT=DIR)")
@pytest.mark.parametrize("outtype", list(LOGIT_TOL))
def test_demo_chat_model(tmp_path, monkeypatch, outtype):
    """The demo's own chat model (out/demo/sft-full-minillm): measured 2026-12-06, logits within 6.8e-6 / 0.011 /
    0.083 / 0.15 (f32 / f16 / bf16 / q8_0; logits up to 15.4), the six questions answered as minillm does."""
    gguf_file, _ = ex.export(DEMO_CHAT, tmp_path / "demo.gguf", outtype)
    ids = prompt_ids()
    want = minillm_logits(CausalLM.from_pretrained(DEMO_CHAT).eval(), ids)
    assert np.abs(llama_logits(llama(gguf_file), ids) - want).max() <= LOGIT_TOL[outtype]
    check_chat(DEMO_CHAT, gguf_file, QUESTIONS, monkeypatch)

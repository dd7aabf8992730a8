"""minillm.export's GGUF, read back with gguf's own reader (no llama.cpp needed: this runs in `make test`).

Every tensor equals the safetensors weight it came from (f32; Q/K permuted for the llama arch), or its f16/bf16
rounding exactly, or lies within q8_0's bound; the metadata says what the config and tokenizer say; what
llama.cpp would run differently is refused by name. tests/test_export_llama_cpp.py runs the files in llama.cpp.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import Template
from tokenizers import Tokenizer

from minillm import export as ex
from minillm.config import ModelConfig
from minillm.infra.checkpoint import read_safetensors
from minillm.model import CausalLM
from minillm.peft import LoraConfig, PromptTuningConfig, apply, merge_and_unload, save_adapter
from minillm.peft.ia3 import IA3Config
from minillm.sft import chatml_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "minillm" / "data" / "tokenizer" / "tokenizer.json"
Q = gguf.GGMLQuantizationType


def make_model(d: Path, seed: int = 0, **overrides) -> Path:
    """A saved tiny model (random weights, bundled tokenizer) of the preset `tiny` with `overrides`."""
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", eos_token_id=2, pad_token_id=3, **overrides)
    model = CausalLM(cfg)
    with torch.no_grad():  # norms away from 1 and biases away from 0: a swapped tensor would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(d)
    shutil.copy(TOKENIZER, d / "tokenizer.json")
    return d


def fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def read_tensors(path: Path) -> dict[str, tuple[Q, np.ndarray]]:
    """name -> (type, values as float32 in PyTorch's shape)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type, np.asarray(values, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))))
    return out


def expected_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """The safetensors weights under llama.cpp's names, Q/K permuted for the llama arch (written out here again)."""
    cfg = ModelConfig.from_hf(model_dir)
    out = {}
    for name, t in read_safetensors(model_dir).items():
        if cfg.model_type == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            d = cfg.head_dim
            # row h*D + 2i + s of the GGUF is row h*D + s*D/2 + i of the HF weight
            idx = torch.tensor([h * d + s * (d // 2) + i for h in range(heads) for i in range(d // 2) for s in (0, 1)])
            t = t[idx]
        out[ex.gguf_name(name)] = t.float()
    return out


# ---- configurations llama.cpp runs: the three families, GQA, tied and untied heads, biases, RoPE scalings ----------

ROPES = [None, {"rope_type": "linear", "factor": 2.0},
         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}]
configs = st.fixed_dictionaries({
    "model_type": st.sampled_from(["llama", "qwen2", "qwen3"]),
    "num_key_value_heads": st.sampled_from([1, 2, 4]),
    "tie_word_embeddings": st.booleans(),
    "attention_bias": st.booleans(),
    "rope_scaling": st.sampled_from(ROPES),
    "rope_theta": st.sampled_from([10000.0, 1e6]),
}).map(lambda d: {**d, "attention_bias": d["attention_bias"] and d["model_type"] != "qwen3",
                  "mlp_bias": d["attention_bias"] and d["model_type"] == "llama"})


@settings(max_examples=12)
@given(configs)
def test_f32_tensors_equal_the_safetensors_weights(tmp_path_factory, overrides):
    d = make_model(tmp_path_factory.mktemp("m"), **overrides)
    gguf_file, _ = ex.export(d, d / "out" / "m.gguf", "f32")
    got, want = read_tensors(gguf_file), expected_tensors(d)
    cfg = ModelConfig.from_hf(d)
    if cfg.tie_word_embeddings:
        want.pop("output.weight", None)  # llama.cpp reads token_embd for the head
    assert set(got) == set(want)
    for name, (qtype, values) in got.items():
        assert qtype == Q.F32, name
        np.testing.assert_array_equal(values, want[name].numpy(), err_msg=name)
    meta = fields(gguf.GGUFReader(gguf_file))
    arch = cfg.model_type
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.attention.head_count"] == cfg.num_attention_heads
    assert meta[f"{arch}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert meta[f"{arch}.attention.key_length"] == cfg.head_dim
    assert meta[f"{arch}.block_count"] == cfg.num_hidden_layers
    assert meta[f"{arch}.context_length"] == cfg.max_position_embeddings
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    rs = cfg.rope_scaling or {}
    if rs:
        assert meta[f"{arch}.rope.scaling.type"] == rs["rope_type"]
        assert meta[f"{arch}.rope.scaling.factor"] == pytest.approx(rs["factor"])
    else:
        assert f"{arch}.rope.scaling.type" not in meta


def test_llama3_rope_is_a_frequency_factor_tensor(tmp_path):
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    d = make_model(tmp_path, rope_scaling=rs, rope_theta=500000.0)
    got = read_tensors(ex.export(d, tmp_path / "m.gguf", "f32")[0])
    # llama.cpp divides each frequency by its factor: that must give minillm's (transformers') llama3 frequencies
    from minillm.model import rope_inv_freq
    cfg = ModelConfig.from_hf(d)
    plain = rope_inv_freq(ModelConfig.preset("tiny", rope_theta=500000.0))[0]
    np.testing.assert_allclose(plain.numpy() / got["rope_freqs.weight"][1], rope_inv_freq(cfg)[0].numpy(), rtol=1e-6)


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_low_precision_tensors_within_their_bound(tmp_path, outtype):
    d = make_model(tmp_path, model_type="qwen2")
    got, want = read_tensors(ex.export(d, tmp_path / "m.gguf", outtype)[0]), expected_tensors(d)
    worst = 0.0
    for name, (qtype, values) in got.items():
        w = want[name]
        if w.ndim == 1:
            assert qtype == Q.F32, name  # norms and biases stay f32
            np.testing.assert_array_equal(values, w.numpy())
        elif outtype in ("f16", "bf16") or qtype == Q.F16:  # exactly PyTorch's round-to-nearest-even cast
            assert outtype != "q8_0" or w.shape[-1] % 32, name  # q8_0's fallback: rows not whole blocks (176 here)
            cast = w.to(torch.bfloat16 if outtype == "bf16" else torch.float16).float().numpy()
            np.testing.assert_array_equal(values, cast, err_msg=name)
        else:  # q8_0: blocks of 32 along a row, scale d = max|x|/127 stored as f16, values round(x/d) in int8:
            # |error| <= d/2 (rounding) + 127 * |d - f16(d)| <= d * (1/2 + 127 * 2**-11)
            assert qtype == Q.Q8_0, name
            blocks = w.reshape(-1, 32)
            bound = (blocks.abs().amax(1, keepdim=True) / 127 * (0.5 + 127 * 2**-11)).expand_as(blocks)
            err = (torch.from_numpy(values).reshape(-1, 32) - blocks).abs()
            assert (err <= bound).all(), name
            worst = max(worst, float((err / blocks.abs().amax(1, keepdim=True)).max()))
    if outtype == "q8_0":
        print(f"q8_0: worst error {worst:.5f} of its block's largest |value|")
        assert worst <= 0.5 / 127 + 2**-11


def test_q8_0_falls_back_to_f16_for_rows_that_are_not_whole_blocks():
    assert ex.tensor_type("blk.0.ffn_down.weight", (64, 48), "q8_0") == Q.F16
    assert ex.tensor_type("blk.0.ffn_down.weight", (64, 64), "q8_0") == Q.Q8_0
    assert ex.tensor_type("blk.0.attn_norm.weight", (64,), "q8_0") == Q.F32
    assert ex.tensor_type("blk.0.attn_q.bias", (64,), "bf16") == Q.F32


def test_tensor_names_are_gguf_own():
    """The table in export.py says what gguf's TensorNameMap (llama.cpp's) says, for each family."""
    cfg = ModelConfig.preset("tiny", model_type="qwen3", attention_bias=False)
    names = list(CausalLM(cfg).state_dict())
    for arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.QWEN2, gguf.MODEL_ARCH.QWEN3):
        tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
        for name in names:
            if arch != gguf.MODEL_ARCH.QWEN3 and "_norm." in name and "self_attn" in name:
                continue
            assert tmap.get_name(name, try_suffixes=(".weight", ".bias")) == ex.gguf_name(name), name


# ---- tokenizer and chat -----------------------------------------------------------------------------------------

def test_tokenizer_metadata(tmp_path):
    d = make_model(tmp_path, vocab_size=4100)  # 4 rows more than the tokenizer: unused, named as the converter does
    meta = fields(gguf.GGUFReader(ex.export(d, tmp_path / "m.gguf", "f16")[0]))
    tok = json.loads(TOKENIZER.read_text())
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 4100 and all(tokens[i] == t for t, i in vocab.items())
    assert tokens[4096:] == [f"[PAD{i}]" for i in range(4096, 4100)]
    types = meta["tokenizer.ggml.token_type"]
    assert types[:4] == [gguf.TokenType.CONTROL] * 4 and set(types[4:4096]) == {gguf.TokenType.NORMAL}
    assert set(types[4096:]) == {gguf.TokenType.UNUSED}
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in tok["model"]["merges"]]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    im_end = vocab["<|im_end|>"]
    assert meta["tokenizer.ggml.eos_token_id"] == im_end and meta["tokenizer.ggml.eot_token_id"] == im_end
    assert meta["tokenizer.ggml.padding_token_id"] == vocab["<|pad|>"]
    assert meta["tokenizer.ggml.add_bos_token"] is False and "tokenizer.ggml.bos_token_id" not in meta
    # the template is minillm's chat: the same text, and the same default system message as minillm.generate
    template = Template(meta["tokenizer.chat_template"])
    system = {"role": "system", "content": "You are a helpful assistant."}
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"},
             {"role": "user", "content": "2+2?"}]
    assert template.render(messages=turns, add_generation_prompt=True) == chatml_prompt([system] + turns)
    other = {"role": "system", "content": "Be brief."}
    assert template.render(messages=[other] + turns, add_generation_prompt=True) == chatml_prompt([other] + turns)


def test_modelfile_beside_the_gguf(tmp_path):
    d = make_model(tmp_path)
    gguf_file, model_file = ex.export(d, tmp_path / "out" / "chat.gguf", "q8_0")
    assert model_file == tmp_path / "out" / "chat.Modelfile"
    text = model_file.read_text()
    assert text.startswith("FROM ./chat.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and 'SYSTEM """You are a helpful assistant."""' in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["chat.Modelfile", "chat.gguf"]  # no staging left


# Text with what the two regexes treat differently (newline runs, spaces before newlines, \r, punctuation then
# newline) and what they treat alike (contractions, digits, letters of several scripts, emoji).
PIECES = ["\n", "\r\n", "\r", "\n\n", " ", "  ", "\t", "\u00a0", "!", "...", "?!\n", " .", "'s", "'LL", "I've",
          "hello", " world", "Hello", "3", "2024", "3.14", "你好", "世界", "нещо", "😀", "🦙🦙", "-", "==", "```", "\u2028"]
texts = st.lists(st.sampled_from(PIECES), min_size=1, max_size=25).map("".join)


@settings(max_examples=300)
@given(texts)
def test_qwen2_pre_tokenizer_gives_the_bundled_tokenizers_ids(text):
    """The claim behind `tokenizer.ggml.pre = "qwen2"`: with Qwen2's split regex instead of ours, the bundled
    tokenizer's merges give the same ids (tokenizers' own regex engine; llama.cpp's is checked in
    test_export_llama_cpp.py)."""
    ours, theirs = _tokenizers()
    assert theirs.encode(text).ids == ours.encode(text).ids


_CACHE: dict[str, Tokenizer] = {}


def _tokenizers() -> tuple[Tokenizer, Tokenizer]:
    if not _CACHE:
        tok = json.loads(TOKENIZER.read_text())
        assert tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == ex.BUNDLED_SPLIT
        qwen2 = next(r for r, name in ex.PRE_TOKENIZERS.items() if name == "qwen2" and r != ex.BUNDLED_SPLIT)
        tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = qwen2
        _CACHE["ours"], _CACHE["qwen2"] = Tokenizer.from_file(str(TOKENIZER)), Tokenizer.from_str(json.dumps(tok))
    return _CACHE["ours"], _CACHE["qwen2"]


def test_unknown_pre_tokenizer_is_refused():
    tok = json.loads(TOKENIZER.read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\w+|\\s+"
    with pytest.raises(ValueError, match="llama.cpp has no pre-tokenizer for the split regex"):
        ex.pre_tokenizer_type(tok, "tokenizer.json")
    assert ex.pre_tokenizer_type({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}, "t") == "gpt-2"


# ---- adapters ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"]),
                                    IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                              feedforward_modules=["down_proj"])], ids=["lora", "ia3"])
def test_mergeable_adapter_is_merged_first(tmp_path, config):
    d = make_model(tmp_path / "base", model_type="llama")
    model = apply(CausalLM.from_pretrained(d), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # a trained adapter: not the identity
    save_adapter(model, tmp_path / "adapter")
    merged = merge_and_unload(model)
    merged.save_pretrained(tmp_path / "merged")
    gguf_file, _ = ex.export(d, tmp_path / "m.gguf", "f32", adapter=tmp_path / "adapter")
    got, want = read_tensors(gguf_file), expected_tensors(tmp_path / "merged")
    for name, (_, values) in got.items():
        np.testing.assert_array_equal(values, want[name].numpy(), err_msg=name)


def test_prompt_tuning_adapter_is_refused_with_the_reason(tmp_path, capsys):
    d = make_model(tmp_path / "base")
    save_adapter(apply(CausalLM.from_pretrained(d), PromptTuningConfig(num_virtual_tokens=4)), tmp_path / "adapter")
    with pytest.raises(SystemExit) as e:
        ex.main(["--model", str(d), "--adapter", str(tmp_path / "adapter"), "--outfile", str(tmp_path / "m.gguf")])
    assert "prompt-tuning adapter cannot be exported to GGUF" in str(e.value)
    assert "virtual tokens are extra inputs" in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


# ---- refusals and the staged write ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({"model_type": "qwen2", "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0}}, "'llama3' with model_type 'qwen2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.5}}, "attention_factor=0.5"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16}}, "beta_fast=16"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "qwen3", "attention_bias": True}, "no o_proj bias"),
    ({"model_type": "qwen2", "head_dim": 32}, "head_dim 32 x 4 heads != hidden_size 64"),
], ids=["dynamic", "llama3-qwen2", "yarn-attention-factor", "yarn-beta", "gelu", "qwen3-o-bias", "qwen2-head-dim"])
def test_what_llama_cpp_runs_differently_is_refused_by_name(tmp_path, overrides, message):
    d = make_model(tmp_path / "m", **overrides)
    with pytest.raises(ValueError, match="cannot export to GGUF") as e:
        ex.export(d, tmp_path / "m.gguf")
    assert message in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    d = make_model(tmp_path / "m")
    gguf_file, _ = ex.export(d, tmp_path / "out" / "m.gguf", "q8_0")
    before = gguf_file.read_bytes()

    def full_disk(self, *, progress=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(SystemExit, match="No space left"):
        ex.main(["--model", str(d), "--outfile", str(gguf_file), "--outtype", "f32"])
    assert gguf_file.read_bytes() == before
    assert sorted(p.name for p in gguf_file.parent.iterdir()) == ["m.Modelfile", "m.gguf"]
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_outfile_must_be_a_gguf(tmp_path):
    with pytest.raises(ValueError, match="ending in .gguf"):
        ex.export(tmp_path, tmp_path / "m.bin")

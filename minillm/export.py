"""Export a trained model to GGUF, the one file llama.cpp, Ollama and LM Studio run.

    python -m minillm.export --model out/sft [--adapter out/lora] --outfile chat.gguf [--outtype f32|f16|bf16|q8_0]

writes chat.gguf and, beside it, chat.Modelfile (`ollama create chat -f chat.Modelfile`). The flags are those of
llama.cpp's convert_hf_to_gguf.py; the file is written with `gguf`, llama.cpp's own Python writer, and checked by
llama.cpp itself in tests/test_export_llama_cpp.py. What is unusual:

- Q/K rows, llama arch only. llama.cpp's `llama` graph rotates adjacent pairs (x0, x1), (x2, x3)... while
  transformers (and minillm) rotate halves (x_i, x_{i+D/2}); permuting the rows of q_proj and k_proj per head
  (`llama_permute`) turns one into the other, as the converter does. `qwen2`/`qwen3` rotate halves too: no permute.
- The pre-tokenizer. llama.cpp does not read tokenizer.json's split regex; `tokenizer.ggml.pre` names one of its
  built-in ones. PRE_TOKENIZERS maps the regexes we know to those names. The bundled tokenizer's regex is equal to
  none of them: it splits every newline off on its own (`\\r?\\n`) where Qwen2's joins newline runs and trailing
  newlines of punctuation (`\\s*[\\r\\n]+`, `...+[\\r\\n]*`). Qwen2's pieces are therefore unions of ours, and since
  the merges were learned on our pieces no merge ever joins a newline to anything but a preceding `\\r`: BPE
  inside Qwen2's piece gives exactly our tokens. So "qwen2" tokenizes as minillm does (tests check it on text
  with every kind of whitespace, digits, CJK, emoji and contractions).
- The chat. minillm's chat is ChatML and ends a reply at <|im_end|>: the GGUF carries that template (with the
  same default system message as `python -m minillm.generate`) and <|im_end|> as both EOS and EOT, so llama.cpp
  and Ollama stop at the end of the turn (a model that never stops is the common failure of exports). The
  bundled tokenizer_config.json's own template is not copied: its `{% generation %}` tag is transformers' (for
  assistant masks), which plain Jinja refuses (llama-cpp-python carries an extension that ignores it).
- Refused, by name, before anything is written: what llama.cpp would run differently from minillm (dynamic NTK
  RoPE, YaRN with non-default attention factor/mscale/betas, llama3 RoPE outside the llama arch, activations other
  than SiLU, qwen3's o_proj bias, qwen2 with head_dim * heads != hidden_size), and adapters that are not a
  change of weights (prompt and prefix tuning, Houlsby).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Iterator

import gguf
import torch
from tqdm import tqdm

from minillm.config import ModelConfig
from minillm.generate import adapter_instead_of_model, model_instead_of_adapter
from minillm.infra.files import read_json_object, staged_dir
from minillm.model import CausalLM
from minillm.peft import load_adapter, merge_and_unload, method_in
from minillm.sft import DEFAULT_SYSTEM_PROMPT, IM_END, IM_START

Q = gguf.GGMLQuantizationType
# --outtype: the type of the 2-D weights, and the file type recorded; norms, biases, rope_freqs stay F32.
OUTTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
            "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}

# transformers' names -> llama.cpp's (gguf's TensorNameMap says the same; tests/test_export.py checks it).
GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
LAYER_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}

# tokenizer.json split regexes -> llama.cpp's `tokenizer.ggml.pre` (the originals quoted in llama-vocab.cpp).
BUNDLED_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+|\\r?\\n|\\r"
                 "|[^\\S\\r\\n]+(?!\\S)|[^\\S\\r\\n]+")
GPT2_BYTELEVEL = "ByteLevel(use_regex=true)"  # GPT-2's regex, built into tokenizers' ByteLevel pre-tokenizer
PRE_TOKENIZERS = {
    BUNDLED_SPLIT: "qwen2",  # not equal, tokenizes the same: see the module docstring
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
    "|\\s+(?!\\S)|\\s+": "qwen2",  # Qwen2, Qwen2.5, Qwen3
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",  # Llama 3
    GPT2_BYTELEVEL: "gpt-2",
}

# minillm's chat (minillm/sft.py chatml_prompt) as a Jinja template: llama.cpp applies it to a chat request.
CHAT_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n"
    "{% endif %}"
    "{% for message in messages %}"
    f"{IM_START}{{{{ message['role'] }}}}\n{{{{ message['content'] }}}}{IM_END}\n"
    "{% endfor %}"
    f"{{% if add_generation_prompt %}}{IM_START}assistant\n{{% endif %}}")


# ---- what llama.cpp runs as minillm does -----------------------------------------------------------------------

def check_supported(config: ModelConfig) -> None:
    """A ValueError naming the setting if llama.cpp's graph for this family would compute something else."""
    mt, rs = config.model_type, config.rope_scaling or {}
    problems = []
    if config.hidden_act not in ("silu", "swish"):
        problems.append(f"hidden_act {config.hidden_act!r}: llama.cpp's {mt} graph uses SiLU")
    kind = rs.get("rope_type")
    if kind == "dynamic":
        problems.append("rope_scaling 'dynamic' (NTK-aware): llama.cpp has no dynamic RoPE scaling")
    if kind == "llama3" and mt != "llama":
        problems.append(f"rope_scaling 'llama3' with model_type {mt!r}: llama.cpp reads llama3's frequency "
                        "factors (rope_freqs) in the llama arch only")
    if kind == "yarn":
        for key, default in (("attention_factor", None), ("mscale", None), ("mscale_all_dim", None),
                             ("beta_fast", 32), ("beta_slow", 1), ("truncate", True)):
            if rs.get(key) is not None and rs.get(key) != default:
                problems.append(f"rope_scaling 'yarn' with {key}={rs[key]!r}: llama.cpp's YaRN for {mt} uses "
                                f"{'its own' if default is None else default}")
    if mt == "qwen3" and config.o_bias:
        problems.append("attention_bias with model_type 'qwen3': llama.cpp's qwen3 graph has no o_proj bias")
    if mt == "qwen2" and config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim {config.head_dim} x {config.num_attention_heads} heads != hidden_size "
                        f"{config.hidden_size}: llama.cpp's qwen2 graph assumes they are equal")
    if problems:
        raise ValueError("cannot export to GGUF: " + "; ".join(problems))


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q/k_proj (or their bias) from halves-rotation to adjacent-pairs rotation, per head."""
    # (n_head * D, C) -> (n_head, 2, D/2, C) -> (n_head, D/2, 2, C): row j of each half next to row j + D/2
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str:
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    _, _, layer, rest = name.split(".", 3)  # model.layers.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_TENSORS[module]}.{kind}"


def llama3_rope_factors(config: ModelConfig) -> torch.Tensor:
    """llama.cpp's form of llama3 RoPE: per-frequency divisors (rope_freqs.weight), as the converter computes them."""
    rs, dim = config.rope_scaling, config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old, lo, hi, factor = (rs["original_max_position_embeddings"], rs["low_freq_factor"], rs["high_freq_factor"],
                           rs["factor"])
    factors = []
    for f in inv_freq.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            factors.append(1.0)
        elif wavelen > old / lo:
            factors.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def gguf_tensors(model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, fp32 tensor) for every weight the GGUF holds, Q/K permuted for the llama arch."""
    cfg = model.config
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(cfg)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp uses token_embd when there is no output tensor
        t = t.detach().float().cpu()
        if cfg.model_type == "llama" and ".self_attn.q_proj." in name:
            t = llama_permute(t, cfg.num_attention_heads)
        elif cfg.model_type == "llama" and ".self_attn.k_proj." in name:
            t = llama_permute(t, cfg.num_key_value_heads)
        yield gguf_name(name), t


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> Q:
    """The converter's choice: 1-D tensors and norms F32; q8_0 needs rows that are whole 32-value blocks."""
    qtype = OUTTYPES[outtype][0]
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return Q.F32
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16  # as convert_hf_to_gguf.py falls back
    return qtype


# ---- tokenizer ---------------------------------------------------------------------------------------------------

def split_regex(tok: dict[str, Any], where: str) -> str:
    """The pre-tokenizer's split regex of a byte-level BPE tokenizer.json (GPT2_BYTELEVEL for GPT-2's own)."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return GPT2_BYTELEVEL
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True) and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and "Regex" in steps[0].get("pattern", {})):
        return steps[0]["pattern"]["Regex"]
    raise ValueError(f"{where}: pre_tokenizer {pre!r} is not a byte-level split llama.cpp knows "
                     "(a Split regex then ByteLevel, or ByteLevel with GPT-2's regex)")


def pre_tokenizer_type(tok: dict[str, Any], where: str) -> str:
    regex = split_regex(tok, where)
    if regex not in PRE_TOKENIZERS:
        raise ValueError(f"{where}: llama.cpp has no pre-tokenizer for the split regex {regex!r}; known: "
                         + ", ".join(sorted(set(PRE_TOKENIZERS.values()))))
    return PRE_TOKENIZERS[regex]


def add_tokenizer(writer: gguf.GGUFWriter, tok_path: Path, config: ModelConfig) -> None:
    """tokens, token types, merges, pre-tokenizer, special ids and the ChatML template."""
    tok, where = read_json_object(tok_path), str(tok_path)
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{where}: not a byte-level BPE tokenizer (model {model.get('type')!r}, decoder "
                         f"{(tok.get('decoder') or {}).get('type')!r}); llama.cpp's 'gpt2' tokenizer needs one")
    if (tok.get("normalizer") or {}).get("type", "NFC") != "NFC":
        raise ValueError(f"{where}: normalizer {tok['normalizer'].get('type')!r}: llama.cpp applies none")
    pre = pre_tokenizer_type(tok, where)
    vocab: dict[str, int] = dict(model["vocab"])
    special = {}
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        special[added["id"]] = added.get("special", False)
    if max(vocab.values()) >= config.vocab_size:
        raise ValueError(f"{where}: token id {max(vocab.values())} does not fit the model's vocab_size "
                         f"{config.vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(config.vocab_size)]  # the converter's name for unused rows
    types = [gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL if i not in special
             else gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED
             for i in range(config.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # Special ids: <|im_end|> ends a turn and the text (the chat's stop token); else the model's own eos.
    eos = config.eos_token_id if not isinstance(config.eos_token_id, list) else config.eos_token_id[0]
    im_end = vocab.get(IM_END)
    if im_end is not None or eos is not None:
        writer.add_eos_token_id(im_end if im_end is not None else eos)
    if im_end is not None:
        writer.add_eot_token_id(im_end)
    bos = _post_processor_bos(tok, vocab)
    if bos is not None or config.bos_token_id is not None:
        writer.add_bos_token_id(bos if bos is not None else config.bos_token_id)
    writer.add_add_bos_token(bos is not None)  # only if tokenizer.json adds one itself (Llama 3 does; ours not)
    writer.add_add_eos_token(False)
    pad = config.pad_token_id if config.pad_token_id is not None else vocab.get("<|pad|>")
    if pad is not None:
        writer.add_pad_token_id(pad)
    if IM_START in vocab and im_end is not None:
        writer.add_chat_template(CHAT_TEMPLATE)


def _post_processor_bos(tok: dict[str, Any], vocab: dict[str, int]) -> int | None:
    """The id tokenizer.json's TemplateProcessing puts first in every sequence (a BOS), if any."""
    post = tok.get("post_processor") or {}
    posts = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for p in posts:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0].get("SpecialToken")
            if first:
                return vocab.get(first["id"])
    return None


# ---- the file -------------------------------------------------------------------------------------------------

# The architecture keys: the GGUFWriter method that writes each, and the ModelConfig field it takes.
ARCH_KEYS = {"add_context_length": "max_position_embeddings", "add_embedding_length": "hidden_size",
             "add_block_count": "num_hidden_layers", "add_feed_forward_length": "intermediate_size",
             "add_head_count": "num_attention_heads", "add_head_count_kv": "num_key_value_heads",
             "add_key_length": "head_dim", "add_value_length": "head_dim", "add_rope_dimension_count": "head_dim",
             "add_rope_freq_base": "rope_theta", "add_layer_norm_rms_eps": "rms_norm_eps",
             "add_vocab_size": "vocab_size"}


def add_architecture(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    for method, field in ARCH_KEYS.items():
        getattr(writer, method)(getattr(cfg, field))
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rs["factor"])
    elif rs.get("rope_type") == "yarn":
        orig = rs["original_max_position_embeddings"]
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rs["factor"] or cfg.max_position_embeddings / orig)
        writer.add_rope_scaling_orig_ctx_len(orig)
    # llama3: the rope_freqs tensor (gguf_tensors); default: nothing to say


def modelfile(gguf_file: str) -> str:
    """An Ollama Modelfile for the exported file: ChatML in Ollama's template language, the chat's defaults
    (minillm.generate's system message, greedy decoding, no repetition penalty) and <|im_end|> as the stop."""
    # Ollama collects the system messages into .System; whether it also leaves them in .Messages changed across
    # its versions (older ones removed them), so the system turn comes from .System and the loop skips system
    # messages: one system turn either way (tests/test_export_ollama.py runs it through Go's text/template)
    return (f"FROM ./{gguf_file}\n"
            f'TEMPLATE """{{{{ if .System }}}}{IM_START}system\n{{{{ .System }}}}{IM_END}\n{{{{ end }}}}'
            f'{{{{ range .Messages }}}}{{{{ if ne .Role "system" }}}}{IM_START}{{{{ .Role }}}}\n{{{{ .Content }}}}{IM_END}\n'
            f'{{{{ end }}}}{{{{ end }}}}{IM_START}assistant\n"""\n'
            f'SYSTEM """{DEFAULT_SYSTEM_PROMPT}"""\n'
            f'PARAMETER stop "{IM_END}"\n'
            "PARAMETER temperature 0\n"
            "PARAMETER repeat_penalty 1\n")


def load_for_export(model_dir: str | Path, adapter: str | Path | None = None) -> tuple[CausalLM, Path]:
    """The plain model to export (an adapter merged into it first) and the tokenizer.json to use (the adapter's
    if it carries one, as the chat does)."""
    if adapter is not None:
        method = method_in(adapter)  # reads adapter_config.json: a wrong directory fails before the model loads
    model = CausalLM.from_pretrained(model_dir)
    check_supported(model.config)
    if adapter is not None:
        model = load_adapter(model, adapter)
        try:
            model = merge_and_unload(model)
        except ValueError as e:  # the method's own reason (prompt, prefix, Houlsby)
            raise ValueError(f"--adapter {adapter}: a {method.title} cannot be exported to GGUF, which holds plain "
                             f"weights only: {e}") from None
    tok = next((Path(d) / "tokenizer.json" for d in (adapter, model_dir)
                if d is not None and (Path(d) / "tokenizer.json").is_file()), None)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}" + (f" or {adapter}" if adapter else ""))
    return model.eval(), tok


def export(model_dir: str | Path, outfile: str | Path, outtype: str = "f16", adapter: str | Path | None = None,
           progress: bool = False) -> tuple[Path, Path]:
    """Write `outfile` (.gguf) and its Ollama Modelfile beside it, both staged and renamed into place.
    Returns their paths."""
    outfile = Path(outfile).absolute()
    if outfile.suffix != ".gguf":
        raise ValueError(f"--outfile {outfile}: give a file name ending in .gguf")
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype {outtype!r}: one of {', '.join(OUTTYPES)}")
    model, tok_path = load_for_export(model_dir, adapter)
    cfg = model.config
    model_file = outfile.with_suffix(".Modelfile")
    with staged_dir(outfile.parent) as tmp:
        writer = gguf.GGUFWriter(tmp / outfile.name, cfg.model_type)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(model_dir).absolute().name)
        add_architecture(writer, cfg)
        add_tokenizer(writer, tok_path, cfg)
        writer.add_file_type(OUTTYPES[outtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tensors = list(gguf_tensors(model))
        for name, t in tqdm(tensors, desc="converting", unit="tensor", disable=not progress):
            qtype = tensor_type(name, tuple(t.shape), outtype)
            writer.add_tensor(name, gguf.quants.quantize(t.numpy(), qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        (tmp / model_file.name).write_text(modelfile(outfile.name), encoding="utf-8")
    return outfile, model_file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minillm.export",
                                 description="Export a model (and a LoRA or (IA)^3 adapter, merged) to GGUF for "
                                             "llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.")
    ap.add_argument("--model", required=True, help="HF-format model directory (config.json + safetensors)")
    ap.add_argument("--adapter", help="adapter directory to merge first (LoRA, (IA)^3; prompt/prefix tuning and "
                                      "Houlsby adapters are refused: they are not a change of weights)")
    ap.add_argument("--outfile", required=True, help="the .gguf file to write; NAME.Modelfile is written beside it")
    ap.add_argument("--outtype", choices=list(OUTTYPES), default="f16",
                    help="type of the 2-D weights (norms and biases stay f32; default: %(default)s, as llama.cpp's "
                         "converter for an fp32 model)")
    args = ap.parse_args(argv)
    hint = adapter_instead_of_model(args.model, then="export it with python -m minillm.export --model {base} "
                                    "--adapter {path} --outfile ...") or (
        args.adapter and model_instead_of_adapter(args.adapter))
    if hint:
        raise SystemExit(f"{ap.prog}: error: {hint}")
    try:
        gguf_file, model_file = export(args.model, args.outfile, args.outtype, args.adapter, progress=True)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{ap.prog}: error: {e}") from None
    size = gguf_file.stat().st_size / 2**20
    print(f"wrote {gguf_file} ({size:.1f} MiB, {args.outtype}) and {model_file}\n"
          f"  llama.cpp: llama-cli -m {gguf_file} -cnv\n"
          f"  Ollama:    ollama create {gguf_file.stem} -f {model_file} && ollama run {gguf_file.stem}\n"
          f"  LM Studio: lms import {gguf_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

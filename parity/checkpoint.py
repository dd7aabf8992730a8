"""`python -m parity.checkpoint DIR`: check minillm against transformers on a checkpoint you trained or downloaded.

    python -m parity.checkpoint ~/models/Qwen3-0.6B              # fp32, 2 prompts, 32 greedy tokens
    python -m parity.checkpoint ~/models/Llama-3.2-1B --dtype bfloat16 --new-tokens 16
    python -m parity.checkpoint out/pretrain --adapter out/sft   # a LoRA adapter on its base: minillm vs peft

Loads DIR twice — with `minillm.CausalLM.from_pretrained` and with `transformers.AutoModelForCausalLM`
(local files only, no remote code), plus the adapter (`minillm.lora.load_adapter` / `peft.PeftModel`) —
then compares logits on non-padded positions of a left-padded batch (random ids, plus text prompts when
the checkpoint has a tokenizer.json), the loss, and greedy generation.
Both sides generate under the same rules: the checkpoint's eos ids (its generation_config.json, else
config.json) stop a row, a stopped row is filled with the same pad id, and nothing else from the
checkpoint's generation_config.json (sampling, repetition penalty, ...) applies. Exit code 0 when every
row passes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

from minillm import CausalLM
from minillm.generate import adapter_instead_of_model
from parity.harness import Row, fixed_check, format_table

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def generation_rules(ref) -> tuple[list[int], int]:
    """(eos ids, pad id) as transformers would use them for `ref`: generation_config first, then config;
    pad falls back to the first eos id (transformers' own fallback), then 0."""
    eos = ref.generation_config.eos_token_id
    if eos is None:
        eos = ref.config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = ref.generation_config.pad_token_id
    if pad is None:
        pad = ref.config.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, int(pad)


def greedy_both(ours, ref, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, eos: list[int],
                pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation on both sides with identical stopping and padding rules."""
    # A fresh GenerationConfig: the checkpoint's generation_config.json may ask for sampling or a
    # repetition penalty, which minillm's generate does not have; eos and pad are passed explicitly.
    base = ref.get_base_model() if hasattr(ref, "get_base_model") else ref  # peft generates with the base's config
    base.generation_config = transformers.GenerationConfig()
    ga = ours.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)
    gb = ref.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                      pad_token_id=pad)
    return ga, gb


def token_mismatches(a: torch.Tensor, b: torch.Tensor) -> float:
    """Differing token ids; a length difference counts every position only one side has."""
    n = max(a.shape[1], b.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, n - x.shape[1]), value=-1)
    return float((pad(a) != pad(b)).sum().item())


def eos_stops(out: torch.Tensor, prompt_len: int, eos: list[int]) -> list[int | None]:
    """Per row, the index of the first generated eos token (None: the row never stopped)."""
    new = out[:, prompt_len:]
    hit = torch.isin(new, torch.tensor(eos, dtype=new.dtype)) if eos else torch.zeros_like(new, dtype=torch.bool)
    return [int(h.nonzero()[0]) if h.any() else None for h in hit]


def _load_pair(path: str, adapter: str | None, dtype: torch.dtype):
    ours = CausalLM.from_pretrained(path, dtype=dtype).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                            trust_remote_code=False).eval()
    if adapter:
        import peft

        from minillm.lora import load_adapter
        load_adapter(ours, adapter)
        ref = peft.PeftModel.from_pretrained(ref, adapter, is_trainable=False).eval()
    return ours, ref


def prompt_batch(vocab_size: int, prompts: list[list[int]], seq_len: int, seed: int, pad: int):
    """(ids, attention_mask): two rows of random ids (the second left-padded) plus the given token prompts,
    all left-padded to one length, as a batch for generation is."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (seq_len, seq_len - seq_len // 3)]
    rows += [p[-seq_len:] for p in prompts if p]
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _tokenizer(*dirs: str | None):
    from tokenizers import Tokenizer
    for d in dirs:
        if d and (Path(d) / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(Path(d) / "tokenizer.json"))
    return None


def default_prompts(tok) -> list[str]:
    """A plain-text prompt, and a ChatML one when the tokenizer has ChatML's control tokens."""
    from minillm.sft import chatml_prompt
    texts = ["The capital of France is"]
    if tok.token_to_id("<|im_start|>") is not None:
        texts.append(chatml_prompt([{"role": "user", "content": "What is gradient descent?"}]))
    return texts


def compare(path: str, dtype: torch.dtype = torch.float32, new_tokens: int = 32, seq_len: int = 24,
            seed: int = 0, adapter: str | None = None, prompts: list[str] | None = None,
            eos: list[int] | None = None) -> list[Row]:
    """Rows comparing minillm with transformers (+ peft for `adapter`) on the checkpoint at `path`.

    prompts: texts added to the batch (default: `default_prompts` when the checkpoint has a tokenizer.json);
    eos: stop ids for both sides instead of the checkpoint's (e.g. <|im_end|>'s id for a chat model)."""
    t0 = time.perf_counter()
    ours, ref = _load_pair(path, adapter, dtype)
    cfg = ours.config
    own_eos, pad = generation_rules(ref)
    eos = own_eos if eos is None else list(eos)
    tok = _tokenizer(adapter, path)
    if prompts is None:
        prompts = default_prompts(tok) if tok is not None else []
    elif prompts and tok is None:
        raise ValueError(f"prompts given but no tokenizer.json in {path}" + (f" or {adapter}" if adapter else ""))
    token_prompts = [tok.encode(p, add_special_tokens=False).ids for p in prompts]
    ids, mask = prompt_batch(cfg.vocab_size, token_prompts, seq_len, seed, pad)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = ids.masked_fill(mask == 0, -100)
    keep = mask.bool()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=pos, labels=labels)
        b = ref(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
        d_logits = (a.logits.float() - b.logits.float())[keep].abs().max().item()
        d_loss = (a.loss - b.loss).abs().item()
        ga, gb = greedy_both(ours, ref, ids, mask, new_tokens, eos, pad)
        if adapter:  # merged into the base weights on both sides (W + B @ A * scaling): the same merged model
            from minillm.lora import merge_and_unload
            merged = merge_and_unload(ours)(ids, attention_mask=mask, position_ids=pos).logits.float()
            ref_merged = ref.merge_and_unload()(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
            d_merged = (merged - ref_merged)[keep].abs().max().item()
    stops = eos_stops(gb, ids.shape[1], eos)
    note = (f"eos {eos}, pad {pad}: {sum(s is not None for s in stops)}/{len(stops)} rows stopped at eos "
            f"(steps {', '.join('-' if s is None else str(s) for s in stops)})")
    low = dtype != torch.float32
    ref_name = f"transformers {transformers.__version__}" + (" + peft" if adapter else "")
    what = f"{cfg.model_type}, {str(dtype)[6:]}" + (", LoRA adapter" if adapter else "")
    rows = [
        fixed_check(f"logits ({what})", ref_name, "bf16_logits" if low else "logits", [d_logits], t0=t0),
        fixed_check("loss", ref_name, "bf16_logits" if low else "loss", [d_loss]),
        fixed_check(f"greedy generate {new_tokens} tokens, eos stops (mismatches)", ref_name, "generate",
                    [token_mismatches(ga, gb)], note=note),
    ]
    if adapter:
        rows.append(fixed_check("LoRA merged: merge_and_unload logits", ref_name,
                                "bf16_logits" if low else "lora_merged", [d_merged]))
    return rows


def _token_id(value: str, tok) -> int:
    if value.isdigit():
        return int(value)
    i = tok.token_to_id(value) if tok is not None else None
    if i is None:
        raise ValueError(f"--eos {value!r}: not a token id, and not a token of the checkpoint's tokenizer")
    return i


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.checkpoint", description=__doc__.splitlines()[0])
    ap.add_argument("path", help="HF checkpoint directory (config.json + *.safetensors) of a llama/qwen2/qwen3 model")
    ap.add_argument("--adapter", help="peft-format LoRA adapter directory to check on top of PATH")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=24)
    ap.add_argument("--prompt", action="append", help="a text prompt to add to the batch (repeatable; default: "
                    "a plain-text and a ChatML prompt when the checkpoint has a tokenizer.json)")
    ap.add_argument("--eos", action="append", help="stop id or token for both sides instead of the checkpoint's "
                    "eos (repeatable), e.g. --eos '<|im_end|>' for a chat model")
    args = ap.parse_args(argv)
    hint = adapter_instead_of_model(args.path, flag="PATH",
                                    then="check it with python -m parity.checkpoint {base} --adapter {path}")
    if hint:
        ap.error(hint)
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        ap.error(f"--adapter {args.adapter}: no adapter_config.json there (not a peft-format LoRA adapter)")
    if args.new_tokens < 1 or args.seq_len < 3:
        ap.error("--new-tokens must be >= 1 and --seq-len >= 3")
    print(f"comparing minillm and transformers on {args.path}"
          + (f" + adapter {args.adapter}" if args.adapter else "") + f" ({args.dtype}) ...", flush=True)
    try:
        eos = [_token_id(e, _tokenizer(args.adapter, args.path)) for e in args.eos] if args.eos else None
        rows = compare(args.path, getattr(torch, args.dtype), args.new_tokens, args.seq_len, adapter=args.adapter,
                       prompts=args.prompt, eos=eos)
    except (OSError, ValueError) as e:  # a missing or broken file: the loaders' errors name it
        ap.error(str(e))
    print(format_table(rows))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

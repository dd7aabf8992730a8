"""`python -m parity.checkpoint DIR`: check minillm against transformers on a checkpoint you trained or downloaded.

    python -m parity.checkpoint ~/models/Qwen3-0.6B              # fp32, 2 prompts, 32 greedy tokens
    python -m parity.checkpoint ~/models/Llama-3.2-1B --dtype bfloat16 --new-tokens 16
    python -m parity.checkpoint out/pretrain --adapter out/sft   # an adapter on its base: minillm vs peft

Loads DIR twice — with `minillm.CausalLM.from_pretrained` and with `transformers.AutoModelForCausalLM`
(local files only, no remote code), plus the adapter (`minillm.peft.files.load_adapter` /
`peft.PeftModel.from_pretrained`) — then compares logits on non-padded positions of a left-padded batch
(random ids, plus text prompts when the checkpoint has a tokenizer.json), the loss, and greedy generation.

Adapters: LoRA (also merged, both sides), prompt tuning and prefix tuning against peft. peft 0.21's own
generate does not do prompt learning right on transformers 5.x (parity/peft_methods.py), so for those two
the greedy reference is peft's forward step by step (`peft_greedy`), with the same eos/pad rule applied.
minillm's Houlsby adapter (MINILLM_HOULSBY_ADAPTER) is a format peft cannot load: it is checked against
the paper's equations on the transformers model's weights (`houlsby_reference`, llama/qwen2, fp32, one
row at a time, so without padding), or reported as SKIP with the reason where that reference does not apply.
Both sides generate under the same rules: the checkpoint's eos ids (its generation_config.json, else
config.json) stop a row, a stopped row is filled with the same pad id, and nothing else from the
checkpoint's generation_config.json (sampling, repetition penalty, ...) applies. Exit code 0 when every
row passes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

from minillm.peft.base import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from minillm import CausalLM
from minillm import peft as peft_format
from minillm.peft import houlsby
from minillm.generate import ADAPTER_KINDS, adapter_instead_of_model, model_instead_of_adapter
from parity.harness import Row, fixed_check, format_table
from parity.tolerances import tol

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


def stop_at_eos(out: torch.Tensor, prompt_len: int, eos: list[int], pad: int) -> torch.Tensor:
    """transformers' stopping rule applied afterwards to tokens generated without one: after a row's first eos
    its tokens become `pad`, and the output ends with the step at which the last row stopped."""
    if not eos:
        return out
    new = out[:, prompt_len:].clone()
    hit = torch.isin(new, torch.tensor(eos, dtype=new.dtype))
    new[(hit.long().cumsum(1) - hit.long()) > 0] = pad  # strictly after the first eos
    if hit.any(1).all():
        new = new[:, :int(hit.long().argmax(1).max()) + 1]
    return torch.cat([out[:, :prompt_len], new], dim=1)


HOULSBY = houlsby.PEFT_TYPE  # minillm's own peft_type: peft cannot load it


def adapter_type(adapter: str) -> str:
    """The adapter directory's peft_type (an old LoRA config may lack it: LORA); errors name the file."""
    return peft_format.read_config(adapter)[1].get("peft_type", "LORA")


def _load_pair(path: str, adapter: str | None, dtype: torch.dtype):
    """(minillm model, reference model, peft_type or None). The reference is transformers + peft, except for a
    Houlsby adapter, which peft cannot load: then the plain transformers model (see _houlsby_rows)."""
    kind = adapter_type(adapter) if adapter else None
    ours = CausalLM.from_pretrained(path, dtype=dtype).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                            trust_remote_code=False).eval()
    if adapter:
        ours = peft_format.load_adapter(ours, adapter).eval()  # a wrapper for prompt/prefix tuning
        if kind != HOULSBY:
            import peft
            ref = peft.PeftModel.from_pretrained(ref, adapter, is_trainable=False).eval()
    return ours, ref, kind


def houlsby_reference_gap(ref, dtype: torch.dtype) -> str | None:
    """Why parity/peft_methods.py's houlsby_reference does not apply to this model (None: it does). It writes
    out a llama-type layer: default RoPE, SiLU MLP, no q/k norms, no o_proj or MLP bias, head_dim = C / H."""
    cfg = ref.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    attn, mlp = ref.model.layers[0].self_attn, ref.model.layers[0].mlp
    gaps = [(cfg.model_type not in ("llama", "qwen2"), f"model_type {cfg.model_type} (it covers llama and qwen2)"),
            (dtype != torch.float32, f"{str(dtype)[6:]} (the equations run in float32: use --dtype float32)"),
            (rope != "default", f"rope_type {rope}"),
            (getattr(cfg, "hidden_act", "silu") != "silu", f"hidden_act {cfg.hidden_act}"),
            (getattr(cfg, "use_sliding_window", False), "sliding-window attention"),
            (attn.o_proj.bias is not None or mlp.down_proj.bias is not None, "biases on o_proj or the MLP"),
            (getattr(cfg, "head_dim", None) not in (None, cfg.hidden_size // cfg.num_attention_heads),
             "head_dim != hidden_size / heads")]
    reasons = [why for gap, why in gaps if gap]
    return "; ".join(reasons) or None


def _houlsby_rows(ours, ref, adapter: str, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
                  eos: list[int], pad: int, what: str, note: str, t0: float) -> list[Row]:
    """A Houlsby adapter (minillm's own format): minillm vs the paper's equations on the transformers model's
    weights, with the adapter's tensors read from the file (not from minillm's modules), one row at a time."""
    from minillm.peft import houlsby as ha
    from minillm.infra.checkpoint import read_safetensors_file
    from parity.peft_methods import houlsby_reference

    name = "Houlsby adapter vs paper equations"
    gap = houlsby_reference_gap(ref, next(ours.parameters()).dtype)
    if gap:
        with torch.no_grad():
            finite = bool(ours(ids, attention_mask=mask).logits.isfinite().all())
        return [Row(f"{name} ({what})", "no reference", 0, float("nan"), tol("houlsby_checkpoint"), finite,
                    ("skipped: " if finite else "minillm's logits are not finite; ")
                    + f"no reference for {gap}: minillm loaded the adapter, nothing compared")]
    saved = read_safetensors_file(os.path.join(adapter, ADAPTER_WEIGHTS_NAME))
    act = ha.ACTS[peft_format.read_config(adapter)[1]["non_linearity"]]
    pre = "base_model.model."
    parts = ("down.weight", "down.bias", "up.weight", "up.bias")
    adapters = {i: tuple(tuple(saved[f"{pre}model.layers.{i}.{place}.adapter.{p}"].float() for p in parts)
                           for place in ha.PLACES) for i in range(ref.config.num_hidden_layers)}
    with torch.no_grad():
        for k, v in saved.items():  # train_norms: the trained norm weights go into the reference model too
            if ".adapter." not in k:
                ref.get_parameter(k.removeprefix(pre)).copy_(v)
        rows = [r[m.bool()] for r, m in zip(ids, mask)]  # each row without its padding: the equations have none
        want = [houlsby_reference(ref, adapters, r[None], act)[0] for r in rows]  # (T_b, V) each
        # labels: every real token but each row's first (whose prediction sits on a pad position, outside the
        # equations), so that both losses cover the same positions
        labels = ids.masked_fill(mask == 0, -100)
        labels[torch.arange(len(ids)), (mask == 0).sum(1)] = -100
        out = ours(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), labels=labels)
        # relative: another op order than minillm's (and transformers') over every layer (tolerances.py)
        scale = max(w.abs().max().item() for w in want)
        d_logits = max((out.logits[b][m.bool()].float() - w).abs().max().item() for b, (w, m) in
                       enumerate(zip(want, mask))) / scale
        ref_loss = torch.cat([torch.nn.functional.cross_entropy(w[:-1], r[1:], reduction="none")
                              for w, r in zip(want, rows)]).mean()
        d_loss = (out.loss.float() - ref_loss).abs().item() / ref_loss.abs().item()
        ga = ours.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)
        gb = []
        for r in rows:  # greedy by the equations over the whole sequence at every step, stopping at eos
            seq = r
            for _ in range(new_tokens):
                seq = torch.cat([seq, houlsby_reference(ref, adapters, seq[None], act)[0, -1].argmax()[None]])
                if int(seq[-1]) in eos:
                    break
            gb.append(seq[len(r):])
        n = max(len(g) for g in gb)
        gb = torch.cat([ids, torch.stack([torch.nn.functional.pad(g, (0, n - len(g)), value=pad) for g in gb])], 1)
    stops = eos_stops(gb, ids.shape[1], eos)
    note = note.format(stopped=sum(s is not None for s in stops), rows=len(stops),
                       steps=", ".join("-" if s is None else str(s) for s in stops))
    ref_name = "paper equations on transformers weights"
    return [fixed_check(f"logits ({what}), relative to max |logit|", ref_name, "houlsby_checkpoint", [d_logits],
                        t0=t0),
            fixed_check("loss, relative", ref_name, "houlsby_checkpoint", [d_loss]),
            fixed_check(f"greedy generate {new_tokens} tokens, eos stops (mismatches)", ref_name + ", step by step",
                        "generate", [token_mismatches(ga, gb)], note=note)]


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
    ours, ref, kind = _load_pair(path, adapter, dtype)
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
    what = f"{cfg.model_type}, {str(dtype)[6:]}" + (f", {ADAPTER_KINDS[kind]}" if adapter else "")
    note = "eos %s, pad %s: {stopped}/{rows} rows stopped at eos (steps {steps})" % (eos, pad)
    if kind == HOULSBY:
        return _houlsby_rows(ours, ref, adapter, ids, mask, new_tokens, eos, pad, what, note, t0)
    prompt_learning = kind in ("PROMPT_TUNING", "PREFIX_TUNING")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft, prompt tuning: "Position ids are not supported ... Ignoring"
        a = ours(ids, attention_mask=mask, position_ids=pos, labels=labels)
        b = ref(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
        # prompt tuning returns logits for the P virtual tokens too (both sides): they are compared as well
        P = a.logits.shape[1] - ids.shape[1]
        keep = torch.cat([mask.new_ones(len(ids), P), mask], 1).bool()
        shapes_equal = a.logits.shape == b.logits.shape
        d_logits = (a.logits.float() - b.logits.float())[keep].abs().max().item() if shapes_equal else float("inf")
        d_loss = (a.loss - b.loss).abs().item()
        if prompt_learning:  # peft's generate is not the reference here (module docstring): its forward is
            from parity.peft_methods import peft_greedy
            ga = ours.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=eos,
                               pad_token_id=pad)
            gb = stop_at_eos(peft_greedy(ref, ids, mask, new_tokens), ids.shape[1], eos, pad)
        else:
            ga, gb = greedy_both(ours, ref, ids, mask, new_tokens, eos, pad)
        if kind == "LORA":  # merged into the base weights on both sides (W + B @ A * scaling): the same merged model
            from minillm.peft.lora import merge_and_unload
            merged = merge_and_unload(ours)(ids, attention_mask=mask, position_ids=pos).logits.float()
            ref_merged = ref.merge_and_unload()(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
            d_merged = (merged - ref_merged)[keep].abs().max().item()
    stops = eos_stops(gb, ids.shape[1], eos)
    note = note.format(stopped=sum(s is not None for s in stops), rows=len(stops),
                       steps=", ".join("-" if s is None else str(s) for s in stops))
    low = dtype != torch.float32
    ref_name = f"transformers {transformers.__version__}" + (" + peft" if adapter else "")
    rows = [
        fixed_check(f"logits ({what})", ref_name, "bf16_logits" if low else "logits", [d_logits], t0=t0),
        fixed_check("loss", ref_name, "bf16_logits" if low else "loss", [d_loss]),
        fixed_check(f"greedy generate {new_tokens} tokens, eos stops (mismatches)",
                    ref_name + (" forward, step by step" if prompt_learning else ""), "generate",
                    [token_mismatches(ga, gb)], note=note),
    ]
    if kind == "LORA":
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
    ap.add_argument("--adapter", help="adapter directory to check on top of PATH: peft-format LoRA, prompt or "
                    "prefix tuning (vs peft), or minillm's Houlsby adapter (vs the paper's equations)")
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
    if args.adapter and model_instead_of_adapter(args.adapter, "--adapter"):
        ap.error(model_instead_of_adapter(args.adapter, "--adapter"))
    if args.new_tokens < 1 or args.seq_len < 3:
        ap.error("--new-tokens must be >= 1 and --seq-len >= 3")
    print(f"comparing minillm and transformers on {args.path}"
          + (f" + adapter {args.adapter}" if args.adapter else "") + f" ({args.dtype}) ...", flush=True)
    try:
        if args.adapter and adapter_type(args.adapter) == HOULSBY:
            print(f"--adapter {args.adapter} is minillm's Houlsby adapter ({HOULSBY}), which peft cannot load: "
                  "minillm is checked against the paper's equations on the transformers weights instead", flush=True)
        eos = [_token_id(e, _tokenizer(args.adapter, args.path)) for e in args.eos] if args.eos else None
        rows = compare(args.path, getattr(torch, args.dtype), args.new_tokens, args.seq_len, adapter=args.adapter,
                       prompts=args.prompt, eos=eos)
    except (OSError, ValueError) as e:  # a missing or broken file: the loaders' errors name it
        ap.error(str(e))
    print(format_table(rows))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

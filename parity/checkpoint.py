"""`python -m parity.checkpoint DIR`: check minillm against transformers on a checkpoint you downloaded.

    python -m parity.checkpoint ~/models/Qwen3-0.6B              # fp32, 2 prompts, 32 greedy tokens
    python -m parity.checkpoint ~/models/Llama-3.2-1B --dtype bfloat16 --new-tokens 16

Loads DIR twice — with `minillm.CausalLM.from_pretrained` and with `transformers.AutoModelForCausalLM`
(local files only, no remote code) — then compares logits on non-padded positions of a left-padded batch,
the loss, and greedy generation. Exit code 0 when every row passes.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import transformers

from minillm import CausalLM
from parity.harness import Row, fixed_check, format_table

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def compare(path: str, dtype: torch.dtype = torch.float32, new_tokens: int = 32, seq_len: int = 24,
            seed: int = 0) -> list[Row]:
    t0 = time.perf_counter()
    ours = CausalLM.from_pretrained(path, dtype=dtype).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                            trust_remote_code=False).eval()
    cfg = ours.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1, : seq_len // 3] = 0  # second row left-padded
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids = ids.masked_fill(mask == 0, pad)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = ids.masked_fill(mask == 0, -100)
    keep = mask.bool()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=pos, labels=labels)
        b = ref(ids, attention_mask=mask, position_ids=pos, labels=labels)
        d_logits = (a.logits.float() - b.logits.float())[keep].abs().max().item()
        d_loss = (a.loss - b.loss).abs().item()
        ga = ours.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=pad)
        gb = ref.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          min_new_tokens=new_tokens, pad_token_id=pad)
    mismatches = float((ga != gb).sum().item()) if ga.shape == gb.shape else float(ga.numel())
    low = dtype != torch.float32
    ref_name = f"transformers {transformers.__version__}"
    return [
        fixed_check(f"logits ({cfg.model_type}, {str(dtype)[6:]})", ref_name, "bf16_logits" if low else "logits",
                    [d_logits], t0=t0),
        fixed_check("loss", ref_name, "bf16_logits" if low else "loss", [d_loss]),
        fixed_check(f"greedy generate {new_tokens} tokens (mismatches)", ref_name, "generate", [mismatches]),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.checkpoint", description=__doc__.splitlines()[0])
    ap.add_argument("path", help="HF checkpoint directory (config.json + *.safetensors) of a llama/qwen2/qwen3 model")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=24)
    args = ap.parse_args(argv)
    print(f"comparing minillm and transformers on {args.path} ({args.dtype}) ...", flush=True)
    rows = compare(args.path, getattr(torch, args.dtype), args.new_tokens, args.seq_len)
    print(format_table(rows))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Text generation with a KV cache: greedy (token-identical to transformers' `generate`), or sampling.

    python -m minillm.generate --model out/sft [--adapter out/lora] --prompt "你好"   # one reply
    python -m minillm.generate --model out/sft                                        # interactive chat

Like transformers, `generate` returns prompt + new tokens; a finished row (it produced eos) is filled
with `pad_token_id` until every row is finished or `max_new_tokens` is reached. Left padding is
supported: positions come from the attention mask (`cumsum - 1`), as in transformers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minillm.model import KVCache
from minillm.sft import chatml_prompt


def _warp(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """transformers' sampling warpers, in its order: temperature, top-k, top-p (keeps >= 1 token)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, idx, remove), -float("inf"))
    return logits


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 20, attention_mask: torch.Tensor | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt + up to `max_new_tokens` tokens per row, (B, T + n)."""
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if pad is None:
        pad = int(eos[0]) if len(eos) else 0  # transformers' fallback: pad with eos
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, B, T + max_new_tokens, dtype, input_ids.device)
    out, mask = input_ids, attention_mask
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    step_ids = input_ids
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        # positions count real tokens only, so left padding does not shift them (transformers does the same)
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -step_ids.shape[1]:]
        logits = model(step_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                       logits_to_keep=1).logits[:, -1, :].float()  # (B, V)
        if do_sample:
            probs = _warp(logits, temperature, top_k, top_p).softmax(dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = logits.argmax(dim=-1)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
        out = torch.cat([out, next_tokens[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=-1)
        unfinished &= ~torch.isin(next_tokens, eos)
        if not unfinished.any():
            break
        step_ids = next_tokens[:, None]
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# Command line: one reply, or an interactive ChatML chat, with the model (and adapter) you trained
# ---------------------------------------------------------------------------------------------
def _load(model_dir: str, adapter: str | None):
    from tokenizers import Tokenizer  # the only place this file needs the tokenizers library

    from minillm.model import CausalLM

    model = CausalLM.from_pretrained(model_dir)
    if adapter:
        from minillm.lora import load_adapter, merge_and_unload
        load_adapter(model, adapter)
        model = merge_and_unload(model)
    tok_dir = next((d for d in (Path(adapter) if adapter else None, Path(model_dir)) if d and (d / "tokenizer.json").exists()), None)
    if tok_dir is None:
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}" + (f" or {adapter}" if adapter else ""))
    return model.eval(), Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def reply(model, tok, messages: list[dict[str, str]], max_new_tokens: int, **sampling) -> str:
    ids = torch.tensor([tok.encode(chatml_prompt(messages), add_special_tokens=False).ids])
    im_end = tok.token_to_id("<|im_end|>")
    eos = [i for i in (im_end, model.config.eos_token_id) if isinstance(i, int)]
    out = generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=eos, **sampling)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minillm.generate", description="Chat with a trained model.")
    ap.add_argument("--model", required=True, help="HF-format model directory (config.json + safetensors)")
    ap.add_argument("--adapter", help="LoRA adapter directory (peft format) to merge into the model")
    ap.add_argument("--prompt", action="append", help="user message(s); omit for an interactive chat")
    ap.add_argument("--system", default="You are a helpful assistant.")
    ap.add_argument("--raw", action="store_true", help="continue the prompt text as is (no chat template)")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_k", type=int)
    ap.add_argument("--top_p", type=float)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model, tok = _load(args.model, args.adapter)
    sample = args.temperature != 1.0 or args.top_k or args.top_p
    sampling = dict(do_sample=bool(sample), temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    generator=torch.Generator().manual_seed(args.seed))
    system = [{"role": "system", "content": args.system}]
    if args.prompt:
        for p in args.prompt:
            if args.raw:
                ids = torch.tensor([tok.encode(p, add_special_tokens=False).ids])
                out = generate(model, ids, max_new_tokens=args.max_new_tokens, **sampling)
                print(tok.decode(out[0].tolist(), skip_special_tokens=True))
            else:
                print(f"user: {p}\nassistant: {reply(model, tok, system + [{'role': 'user', 'content': p}], args.max_new_tokens, **sampling)}")
        return 0
    history = list(system)
    print("Chat with the model (empty line or Ctrl-D to quit, /reset to forget the conversation).")
    while True:
        try:
            text = input("user: ").strip()
        except EOFError:
            break
        if not text:
            break
        if text == "/reset":
            history = list(system)
            continue
        history.append({"role": "user", "content": text})
        answer = reply(model, tok, history, args.max_new_tokens, **sampling)
        history.append({"role": "assistant", "content": answer})
        print(f"assistant: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Text generation with a KV cache: greedy or sampled, token-identical to transformers' `generate`.

    python -m minillm.generate --model out/sft [--adapter out/lora] --prompt "你好"   # one reply (any adapter type)
    python -m minillm.generate --model out/sft                                        # interactive chat

Like transformers, `generate` returns prompt + new tokens; a finished row (it produced eos) is filled
with `pad_token_id` until every row is finished or `max_new_tokens` is reached. Left padding is
supported: positions come from the attention mask (`cumsum - 1`), as in transformers. Sampling applies
transformers' warpers in its order (temperature, top-k, top-p) and draws with `torch.multinomial` once
per step for the whole batch, so with the global RNG (no `generator`) and the same seed it draws what
transformers draws. One difference in defaults: transformers samples with top_k=50 unless told
otherwise; here top_k=None means no top-k filtering.

Decoding for people (`TextStream`) releases text only in whole characters: a byte-level tokenizer can
split one character over several tokens, and a reply must never show half of it as "�".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import torch

from minillm.model import KVCache
from minillm.sft import chatml_prompt_ids


def check_generation_args(max_new_tokens: int, do_sample: bool, temperature: float | None, top_k: int | None,
                          top_p: float | None, prefix: str = "") -> None:
    """One-line ValueErrors for arguments transformers would refuse (or that would silently misbehave).

    `prefix` goes before each argument's name ("--" for the command line)."""
    is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
    is_num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"{prefix}max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature is not None:
        if not is_num(temperature) or not math.isfinite(temperature):
            raise ValueError(f"{prefix}temperature must be a finite number, got {temperature!r}")
        if temperature < 0 or (do_sample and temperature == 0):
            # transformers' TemperatureLogitsWarper refuses these when sampling; a negative temperature would
            # sample from the reversed distribution, so it is refused for greedy decoding too
            greedy = "leave out --temperature, --top_k and --top_p" if prefix else "use do_sample=False"
            raise ValueError(f"{prefix}temperature (={temperature}) has to be > 0 for sampling"
                             + (f"; for greedy decoding {greedy}" if temperature == 0 else ""))
    if top_k is not None and (not is_int(top_k) or top_k < 0):
        raise ValueError(f"{prefix}top_k must be an integer >= 0 (0: no top-k filtering), got {top_k!r}")
    if top_p is not None and (not is_num(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"{prefix}top_p must be in (0, 1] (1: no top-p filtering), got {top_p!r}")


def warp_logits(logits: torch.Tensor, temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """transformers' sampling warpers on (B, V) fp32 logits, in generate's order: temperature, top-k, top-p.

    Filtered entries become -inf. Each step is the same tensor op as TemperatureLogitsWarper,
    TopKLogitsWarper and TopPLogitsWarper (min_tokens_to_keep=1), so the kept sets are identical, ties included.
    """
    if temperature is not None and temperature != 1.0:
        logits = logits / temperature
    if top_k:
        # keep every token whose logit is >= the k-th largest (ties with the k-th are kept, as transformers does)
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        # ascending sort: drop the least likely tokens while their cumulative probability stays <= 1 - top_p
        sorted_logits, idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, idx, remove), -float("inf"))
    return logits


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 20, attention_mask: torch.Tensor | None = None,
             do_sample: bool = False, temperature: float | None = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             streamer=None) -> torch.Tensor:
    """Prompt + up to `max_new_tokens` tokens per row, (B, T + n).

    `streamer.put(tokens)` gets each step's (B,) new tokens (unlike transformers, not the prompt), and
    `streamer.end()` is called once at the end.
    """
    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}: "
                         "generation needs at least one prompt token")
    cfg = model.config
    B, T = input_ids.shape
    limit = getattr(cfg, "max_position_embeddings", None)
    # prompt/prefix tuning (PromptTuningLM, PrefixTuningLM): the P virtual tokens take the first P positions
    P = getattr(getattr(model, "peft_config", None), "num_virtual_tokens", 0)
    if limit and P + T + max_new_tokens > limit:
        virtual = f"{P} virtual tokens + " if P else ""
        what = (f"{virtual}the prompt alone ({T} tokens)" if P + T > limit
                else f"{virtual}prompt + max_new_tokens ({T} + {max_new_tokens})")
        warnings.warn(f"{what} is longer than the model's max_position_embeddings ({limit}): positions past "
                      f"{limit} were never trained, expect degraded output", stacklevel=2)
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=input_ids.device,
                       dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if pad is None:
        pad = int(eos[0]) if len(eos) else 0  # transformers' fallback: pad with eos
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # the activations' dtype (the frozen base's), not an adapter's fp32 tensor: on a bf16 model LoRA's
    # lora_embedding_A/B are fp32 and come first in parameters()
    dtype = getattr(model, "base_model", model).model.norm.weight.dtype
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
            probs = warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
            # one draw per row for every row, finished or not: the same RNG use as transformers
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = logits.argmax(dim=-1)
        if len(eos):  # transformers pads finished rows only when eos can stop them
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
        out = torch.cat([out, next_tokens[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=-1)
        unfinished &= ~torch.isin(next_tokens, eos)
        if streamer is not None:
            streamer.put(next_tokens)
        if not unfinished.any():
            break
        step_ids = next_tokens[:, None]
    if streamer is not None:
        streamer.end()
    model.train(was_training)
    return out


class TextStream:
    """Streams one row's text as it is generated, releasing only whole characters.

    Decodes all tokens so far and releases what is new, minus trailing U+FFFD: a byte-level tokenizer
    spells a character over several tokens, and until its last byte arrives the decoder shows "�".
    At the end, bytes that never formed a character (the model stopped mid-character, or produced an
    invalid byte) are dropped rather than shown as "�".
    """

    def __init__(self, tokenizer, eos: list[int], on_text=None, skip_special_tokens: bool = True):
        self.tok, self.eos, self.on_text, self.skip = tokenizer, set(eos), on_text, skip_special_tokens
        self.ids: list[int] = []
        self.shown = ""  # released text, U+FFFD removed
        self.stable = 0  # characters of the decoded text already accounted for
        self.stopped = False

    def put(self, tokens: torch.Tensor) -> None:
        token = int(tokens.reshape(-1)[0])
        if self.stopped:
            return
        if token in self.eos:
            self.stopped = True
            return
        self.ids.append(token)
        self._release(final=False)

    def end(self) -> None:
        self._release(final=True)

    def _release(self, final: bool) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        ready = text if final else text.rstrip("\ufffd")
        new = ready[self.stable:].replace("\ufffd", "")
        self.stable = max(self.stable, len(ready))
        if new:
            self.shown += new
            if self.on_text is not None:
                self.on_text(new)

    @property
    def text(self) -> str:
        return self.shown


# ---------------------------------------------------------------------------------------------
# Command line: one reply, or an interactive ChatML chat, with the model (and adapter) you trained
# ---------------------------------------------------------------------------------------------
ADAPTER_KINDS = {"LORA": "LoRA adapter", "PROMPT_TUNING": "prompt-tuning adapter",
                 "PREFIX_TUNING": "prefix-tuning adapter", "MINILLM_HOULSBY_ADAPTER": "Houlsby adapter"}
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json")


def adapter_instead_of_model(path: str | Path, flag: str = "--model",
                             then: str = "load it with python -m minillm.generate --model {base} --adapter {path}"
                             ) -> str | None:
    """A sentence for an adapter directory (any peft_type) given where a model is expected (None if `path` is not
    one): it names the adapter's type and the base model recorded in its adapter_config.json, and says what to
    run instead."""
    p = Path(path)
    cfg = p / "adapter_config.json"
    if not cfg.is_file() or any((p / f).is_file() for f in MODEL_FILES):
        return None
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
        base, peft_type = d.get("base_model_name_or_path"), d.get("peft_type", "LORA")  # old LoRA configs lack it
    except (ValueError, AttributeError, OSError) as e:
        return f"{flag} {path} is an adapter, not a model, and its {cfg} is unreadable ({e})"
    kind = ADAPTER_KINDS.get(peft_type, f"adapter (peft_type {peft_type!r})")
    if not base:
        return (f"{flag} {path} is a {kind}, not a model; its adapter_config.json records no base model: "
                + then.format(base="BASE", path=path) + ", with BASE the model it was trained from")
    return (f"{flag} {path} is a {kind}, not a model; its adapter_config.json names the base model {base}: "
            + then.format(base=base, path=path))


def model_instead_of_adapter(path: str | Path, flag: str = "--adapter") -> str | None:
    """A sentence for a model directory (or any directory without adapter_config.json) given where an adapter is
    expected; None when `path` has an adapter_config.json."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return None
    kinds = ", ".join(ADAPTER_KINDS.values())
    if (p / "config.json").is_file() and any((p / f).is_file() for f in MODEL_FILES):
        return (f"{flag} {path} is a model (config.json + weights), not an adapter: give it as the model; an adapter "
                f"directory ({kinds}) holds adapter_config.json + adapter_model.safetensors")
    return (f"{flag} {path}: no adapter_config.json there, so not an adapter directory ({kinds}, in peft's "
            f"format)")


def _load(model_dir: str, adapter: str | None):
    """(model, tokenizer) for the chat. An adapter of any type is loaded with minillm.peft_format.load_adapter:
    LoRA is merged into the weights (a plain CausalLM, as fast as the base); prompt and prefix tuning return
    their wrapper (PromptTuningLM / PrefixTuningLM, whose forward fills generate's KV cache with the virtual
    tokens); Houlsby adapters stay in the model as applied."""
    from tokenizers import Tokenizer  # the only place this file needs the tokenizers library

    from minillm.model import CausalLM

    if adapter:  # before loading the model: a wrong directory is a one-line error at once
        hint = model_instead_of_adapter(adapter)
        if hint:
            raise ValueError(hint)
    model = CausalLM.from_pretrained(model_dir)
    if adapter:
        from minillm.lora import lora_layers, merge_and_unload
        from minillm.peft_format import load_adapter
        model = load_adapter(model, adapter)  # maybe a wrapper: always its return value
        if lora_layers(model):
            model = merge_and_unload(model)
    dirs = [Path(adapter)] if adapter else []
    tok_dir = next((d for d in dirs + [Path(model_dir)] if (d / "tokenizer.json").exists()), None)
    if tok_dir is None:
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}" + (f" or {adapter}" if adapter else ""))
    return model.eval(), Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def stop_ids(model, tok) -> list[int]:
    """A chat reply ends at <|im_end|> (ChatML) or at the model's eos."""
    eos = model.config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    im_end = tok.token_to_id("<|im_end|>")
    return ([im_end] if im_end is not None else []) + [e for e in eos if e != im_end]


def reply(model, tok, messages: list[dict[str, str]], max_new_tokens: int, on_text=None, **sampling) -> str:
    """The assistant's next reply to `messages` (ChatML), streamed to `on_text` in whole characters."""
    ids = torch.tensor([chatml_prompt_ids(tok, messages)])  # typed <|im_end|> etc. stay text: no forged turns
    eos = stop_ids(model, tok)
    stream = TextStream(tok, eos, on_text)
    generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=eos, streamer=stream, **sampling)
    return stream.text.strip()


def continue_text(model, tok, text: str, max_new_tokens: int, on_text=None, **sampling) -> str:
    """--raw: the prompt text continued as is (no chat template); returns the new text only."""
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids:
        raise ValueError(f"the prompt {text!r} is empty after tokenization: --raw needs text to continue")
    eos = stop_ids(model, tok)
    stream = TextStream(tok, eos, on_text)
    generate(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, eos_token_id=eos, streamer=stream, **sampling)
    return stream.text


def _printer(text: str) -> None:
    print(text, end="", flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m minillm.generate",
        description="Chat with a trained model (ChatML), or continue a text with --raw. Greedy decoding unless "
                    "--temperature, --top_k or --top_p is given, which turn on sampling (transformers' warpers, "
                    "applied in its order: temperature, then top-k, then top-p).")
    ap.add_argument("--model", required=True, help="HF-format model directory (config.json + safetensors)")
    ap.add_argument("--adapter", help="adapter directory trained on --model (peft format: LoRA, which is merged "
                    "into the model, prompt or prefix tuning; or minillm's Houlsby adapter)")
    ap.add_argument("--prompt", action="append",
                    help="user message (repeatable: one reply each); omit for an interactive chat")
    ap.add_argument("--system", default="You are a helpful assistant.",
                    help="system message that opens every conversation (default: %(default)r)")
    ap.add_argument("--raw", action="store_true", help="continue the prompt text as is (no chat template)")
    ap.add_argument("--max_new_tokens", type=int, default=128,
                    help="most tokens per reply; a reply also ends at <|im_end|> or eos (default: %(default)s)")
    ap.add_argument("--temperature", type=float,
                    help="sampling temperature > 0; lower is more deterministic (default: greedy decoding; "
                         "1.0 when --top_k or --top_p turns sampling on)")
    ap.add_argument("--top_k", type=int,
                    help="sample only from the k most likely tokens; 0: all (default: no top-k filtering, "
                         "unlike transformers' generate, which uses 50)")
    ap.add_argument("--top_p", type=float,
                    help="sample only from the smallest set of most likely tokens whose probability adds up to "
                         "top_p, in (0, 1] (default: 1.0, no top-p filtering)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    return ap


def _read_line(prompt: str) -> str | None:
    """One line typed by the user (None at end of input); raises ValueError for bytes that are not UTF-8."""
    try:
        text = input(prompt)
    except EOFError:
        return None
    try:
        text.encode("utf-8")  # stdin decodes with surrogateescape: undecodable bytes become lone surrogates
    except UnicodeEncodeError:
        raise ValueError("that line is not valid UTF-8 text (check your terminal's encoding); type it again") from None
    return text


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    fail = lambda msg: SystemExit(f"{ap.prog}: error: {msg}")
    hint = adapter_instead_of_model(args.model)
    if hint:
        raise fail(hint)
    sample = args.temperature is not None or args.top_k is not None or args.top_p is not None
    try:
        check_generation_args(args.max_new_tokens, sample, args.temperature, args.top_k, args.top_p, prefix="--")
    except ValueError as e:
        raise fail(str(e)) from None
    if args.raw and args.prompt is None:
        raise fail("--raw needs --prompt TEXT (the interactive chat always uses the chat template)")
    if args.raw and any(not p for p in args.prompt):
        raise fail("--prompt '' with --raw: an empty prompt gives the model nothing to continue")
    try:
        model, tok = _load(args.model, args.adapter)
    except (OSError, ValueError) as e:  # the loaders' errors name the file and what is wrong with it
        raise fail(str(e)) from None
    sampling = dict(do_sample=sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    generator=torch.Generator().manual_seed(args.seed))
    system = [{"role": "system", "content": args.system}]
    if args.prompt:
        for p in args.prompt:
            if args.raw:
                print(p, end="", flush=True)
                try:
                    _warned(continue_text, model, tok, p, args.max_new_tokens, _printer, **sampling)
                except ValueError as e:
                    raise fail(str(e)) from None
                print()
            else:
                print(f"user: {p}\nassistant: ", end="", flush=True)
                _warned(reply, model, tok, system + [{"role": "user", "content": p}], args.max_new_tokens, _printer,
                        **sampling)
                print()
        return 0
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte must not end the session (see _read_line)
    history = list(system)
    print("Chat with the model (empty line or Ctrl-D to quit, /reset to forget the conversation).")
    while True:
        try:
            text = _read_line("user: ")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        if text is None or not text.strip():
            break
        text = text.strip()
        if text == "/reset":
            history = list(system)
            continue
        print("assistant: ", end="", flush=True)
        try:
            answer = _warned(reply, model, tok, history + [{"role": "user", "content": text}], args.max_new_tokens,
                             _printer, **sampling)
        except ValueError as e:  # keep the session: say what went wrong and wait for the next line
            print(f"\nerror: {e}", file=sys.stderr, flush=True)
            continue
        print()
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    return 0


def _warned(fn, *args, **kwargs):
    """fn(*args, **kwargs), printing each warning it raises as one line on stderr (e.g. a too-long prompt)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    for w in caught:
        print(f"\nwarning: {w.message}", file=sys.stderr, flush=True)
    return result

if __name__ == "__main__":
    sys.exit(main())

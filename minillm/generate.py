"""Chat with what you trained: one reply, or an interactive ChatML chat, with the model (and adapter).

    python -m minillm.generate --model out/sft [--adapter out/lora] --prompt "你好"   # one reply (any adapter type)
    python -m minillm.generate --model out/sft                                        # interactive chat

The decoding itself is minillm/generation.py; this file is the command around it: loading a model and any
adapter, the chat template, streaming the reply in whole characters, and one-line errors for wrong directories.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from tokenizers import Tokenizer

from minillm.generation import TextStream, check_generation_args, generate
from minillm.infra.files import model_fingerprint
from minillm.model import CausalLM
from minillm.peft import METHODS, load_adapter, merge_and_unload, method_of
from minillm.sft import chatml_prompt_ids

ADAPTER_KINDS = {peft_type: method.title for peft_type, method in METHODS.items()}  # "LoRA adapter", ...
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


def runnable_python() -> str:
    """This interpreter as a command that runs as printed from here (`.venv/bin/python` in a checkout, else its
    absolute path): a bare `python` on a fresh clone is the system's, without torch."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


BASE_RECORD = "minillm_base.json"  # written beside adapter_config.json by train/finetune.py


def base_mismatch(model_dir: str | Path, adapter: str | Path) -> str | None:
    """A sentence when `adapter` records (in minillm_base.json) a base model other than `model_dir`, compared by
    fingerprint (minillm.infra.files.model_fingerprint: config and sampled weight bytes), not by path; None when
    they match or the adapter records nothing (peft's own adapters)."""
    record = Path(adapter) / BASE_RECORD
    if not record.is_file():
        return None
    try:
        d = json.loads(record.read_text(encoding="utf-8"))
        want, base = d["fingerprint"], d.get("base_model", "?")
    except (ValueError, KeyError, TypeError, OSError):
        return None
    have = model_fingerprint(model_dir)
    if have == want:
        return None
    what = "another model configuration" if have.get("config_sha256") != want.get("config_sha256") else \
        "the same configuration with different weights"
    return (f"the adapter {adapter} was trained on {base}, and {model_dir} is not that model ({what}): its "
            f"replies will be gibberish. Load it on its base: --model {base} --adapter {adapter}")


def load_chat(model_dir: str, adapter: str | None):
    """(model, tokenizer, the adapter's method or None) for the chat. An adapter of any type is loaded with
    minillm.peft.load_adapter; a method that merges (LoRA, (IA)^3) is folded into the weights (a plain CausalLM, as
    fast as the base); prompt and prefix tuning stay wrappers whose forward fills generate's KV cache with the
    virtual tokens; Houlsby adapters stay in the model as applied."""
    if adapter:  # before loading the model: a wrong directory is a one-line error at once
        hint = model_instead_of_adapter(adapter)
        if hint:
            raise ValueError(hint)
    model, method = CausalLM.from_pretrained(model_dir), None
    if adapter:
        if warning := base_mismatch(model_dir, adapter):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        model = load_adapter(model, adapter)  # maybe a wrapper: always its return value
        method = method_of(model)
        if method.can_merge:
            model = merge_and_unload(model)
    dirs = [Path(adapter)] if adapter else []
    tok_dir = next((d for d in dirs + [Path(model_dir)] if (d / "tokenizer.json").exists()), None)
    if tok_dir is None:
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}" + (f" or {adapter}" if adapter else ""))
    return model.eval(), Tokenizer.from_file(str(tok_dir / "tokenizer.json")), method


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


# Control characters from the model are shown, never obeyed: an ESC ] ... BEL in a reply would otherwise set the
# terminal's title (or worse). Newlines and tabs pass; every other C0/C1 control and DEL is printed as \xNN.
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if chr(c) not in "\n\t"}


def visible(text: str) -> str:
    return text.translate(_CONTROLS)


def _printer(text: str) -> None:
    print(visible(text), end="", flush=True)


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
        model, tok, method = load_chat(args.model, args.adapter)
    except (OSError, ValueError) as e:  # the loaders' errors name the file and what is wrong with it
        raise fail(str(e)) from None
    if method is not None:  # say what is answering: a wrong directory would otherwise only show as odd replies
        kind = ADAPTER_KINDS[method.peft_type]
        how = "merged into the weights" if method_of(model) is None else "applied"
        print(f"loaded {args.model} with the {kind} {args.adapter} ({how})", file=sys.stderr, flush=True)
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
    print("Chat with the model (empty line or Ctrl-D to quit, /reset to forget the conversation, Ctrl-C to stop a "
          "reply).")
    while True:
        try:
            text = _read_line("user: ")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave, without a traceback
            print()
            break
        if text is None or not text.strip():
            break
        text = text.strip()
        if text == "/reset":
            history = list(system)
            print("(conversation forgotten: the next message starts a new chat)", flush=True)
            continue
        print("assistant: ", end="", flush=True)
        try:
            answer = _warned(reply, model, tok, history + [{"role": "user", "content": text}], args.max_new_tokens,
                             _printer, **sampling)
        except ValueError as e:  # keep the session: say what went wrong and wait for the next line
            print(f"\nerror: {e}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:  # Ctrl-C during a reply: stop it, forget the half reply, back to the prompt
            print("\n(reply stopped)", flush=True)
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
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C during a --prompt reply: stop quietly, with the shell's exit code for it
        print(file=sys.stderr)
        sys.exit(130)

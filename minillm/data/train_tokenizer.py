"""Train the bundled byte-level BPE tokenizer: `python -m minillm.data.train_tokenizer`.

Trains on the bundled pretraining corpus plus the SFT set (so the chat words are in the vocabulary)
and writes `tokenizer.json` + `tokenizer_config.json` into minillm/data/tokenizer/, loadable with
`transformers.AutoTokenizer.from_pretrained` (this script itself needs `tokenizers`, not transformers).

Choices, and why:
- 4096 ids in total: ids 0-3 are the special tokens `<|endoftext|>` (eos: ends every pretraining
  document), `<|im_start|>`, `<|im_end|>` (ChatML; generation of a chat reply stops here), `<|pad|>`
  (pad, distinct from eos so padding can never be confused with a real end of text); then the 256
  byte symbols and 3836 merges. No bos and no unk: a byte-level vocabulary can spell any text.
- Pre-tokenization is Qwen2's regex with one change: a newline is always a piece of its own. So
  the `\\n` that ends a ChatML role header (`<|im_start|>assistant\\n`) never merges with the first
  characters of the reply, and an assistant reply's tokens start exactly where the reply does.
  Digits are single pieces (as in Qwen2), which helps a tiny model with the arithmetic samples.
- The chat template renders exactly Qwen2's ChatML text (default system prompt "You are a helpful
  assistant."), with `{% generation %}` markers around each assistant reply + `<|im_end|>` so that
  `apply_chat_template(..., return_assistant_tokens_mask=True)` works.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm.data import DATA_DIR
from minillm.infra.corpus import iter_pretrain_texts, iter_sft_conversations
from minillm.sft import ROLES

VOCAB_SIZE = 4096
EOS, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, PAD]  # ids 0..3 in this order

# Qwen2's pre-tokenizer pattern, with `\s*[\r\n]+` replaced by a lone (CR)LF and the other whitespace
# alternatives excluding newlines, so every "\n" is its own piece.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\r?\n|\r"
    r"|[^\S\r\n]+(?!\S)|[^\S\r\n]+"
)

# Qwen2's ChatML text, with {% generation %} around what the model must learn to produce.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer() -> Tokenizer:
    """An untrained tokenizer with minillm's pipeline (also used by tests to build small variants)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def iter_texts(data_dir: Path) -> Iterator[str]:
    """The training texts; a malformed line stops with `file:line: reason` (minillm.infra.corpus's readers)."""
    yield from iter_pretrain_texts(data_dir / "pretrain.jsonl")
    for conversation in iter_sft_conversations(data_dir / "sft.jsonl"):
        # the text between ChatML special tokens, as the masker will tokenize it
        yield "system\nYou are a helpful assistant."
        for turn in conversation:
            role = turn.get("from", turn.get("role"))
            yield f"{ROLES[role]}\n{turn.get('value', turn.get('content'))}"


def tokenizer_config(model_max_length: int) -> dict:
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "extra_special_tokens": [IM_START, IM_END],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }


def train(data_dir: Path, out_dir: Path, vocab_size: int = VOCAB_SIZE, model_max_length: int = 2048) -> Tokenizer:
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(data_dir), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}, expected {i}"
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(model_max_length), f, ensure_ascii=False, indent=2)
        f.write("\n")
    return tok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="folder with pretrain.jsonl and sft.jsonl")
    ap.add_argument("--out", type=Path, default=DATA_DIR / "tokenizer")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    tok = train(args.data, args.out, args.vocab_size)
    print(f"wrote {args.out}: vocab {tok.get_vocab_size()} ({len(SPECIAL_TOKENS)} special tokens)")


if __name__ == "__main__":
    main()

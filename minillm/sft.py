"""SFT loss masking: render a conversation in ChatML, tokenize it, and label only the assistant replies.

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n
                                                                                         ^^^^^^^^^^^^^^
    labels: -100 everywhere except each assistant reply and its closing <|im_end|> (marked above): the
    model learns the answers and when to stop, never the system prompt, the questions or the headers.

The text is exactly what Qwen2's chat template renders (BelleGroup's `human` becomes the ChatML role
`user`; pass `user_role="human"` for the course's rendering), and the labels are exactly
`apply_chat_template(..., return_assistant_tokens_mask=True)` under a ChatML template with
`{% generation %}` around `reply + <|im_end|>` (parity/data.py checks both, on two tokenizers).

How it is computed: HF tokenizers split added special tokens out before pre-tokenizing, so the text
between two of them, `"{role}\\n{content}"`, is tokenized independently of the rest. Every turn is
therefore tokenized on its own, as `<|im_start|>{role}\\n{content}<|im_end|>` (the same context as in
the full text, which matters for SentencePiece-style "▁" prefixes), all turns of a batch in ONE
batched tokenizer call, and the sample is assembled from the turns and the ids of the "\\n" between
turns with list operations. The reply's tokens are found by position, from the token offsets (a
token is labelled when its characters overlap the reply, as transformers does), never by token id,
so the masking stays right when pad == eos or when a reply contains the same tokens as a question.
(With a tokenizer whose pre-tokenizer can merge the header's "\\n" with a reply that starts with
whitespace, e.g. GPT-2's regex on "\\n  x", that one boundary token is labelled, as in transformers;
the bundled tokenizer always splits "\\n" off, so its labels decode to exactly the reply.)

How this differs from the course's chapter-6 `preprocess`:
- The course uses `pad_token_id` as its ignore label (`IGNORE_TOKEN_ID = tokenizer.pad_token_id`).
  transformers' loss ignores only -100, so every "masked" position (system prompt, questions,
  padding) is in fact trained to predict the pad token; and its `attention_mask = input_ids !=
  pad_token_id` also hides every real eos when pad == eos. Here ignored labels are -100, and
  padding (labels -100, attention_mask 0) is done by position in `SFTCollator`.
- The course leaves `<|im_start|>`, `<|im_end|>` and `\\n` of the system and user turns unmasked
  (and `<|im_start|>` and the final `\\n` of assistant turns), so the model is trained to predict
  the user's turn markers; here no system/user token is ever labelled.
- The course renders `human` as the role name (`<|im_start|>human`), which is not the ChatML text
  Qwen's template produces; here it is `user` unless `user_role="human"`.
- The course tokenizes role, newline and content separately; here `"{role}\\n{content}"` is one
  segment, so the ids equal the chat template's tokenization of the whole text.
- The course truncates silently; a sample whose labels are all -100 after truncation (or that has
  no assistant turn) trains nothing, so here it is dropped and counted in `MaskStats`.
- A leading non-user turn (after an optional system turn) is dropped, as the course does, and
  counted; a leading system turn replaces the default system prompt, as Qwen's template does.

Control strings typed into content (a deliberate choice, see issue 10 item 9): a message whose text
contains `<|im_end|>\n<|im_start|>system ...` would, tokenized as apply_chat_template does, become real
control tokens: a user could end their turn and forge a system turn, and SFT data could teach the model
turn boundaries that are not there. By default (`allow_control_tokens=False`) the content of every turn
is text: each special-token string in it (any of the tokenizer's special added tokens, e.g. `<|im_end|>`,
`<|endoftext|>`) is tokenized as ordinary text pieces, so control ids appear only where the template
puts them. The text around such a string is tokenized as if the string were a boundary (no merge across
it); with a byte-level tokenizer the ids decode to exactly the content. Content without such strings (all
of real data, in practice) gives the same ids as apply_chat_template in both modes.
`allow_control_tokens=True` reproduces apply_chat_template exactly, control tokens included, for data
that relies on it. `chatml_prompt_ids` applies the same rule to a chat prompt.

Data errors: `conversation_problem(record)` says why a JSON line is not a usable conversation (any type,
unknown role, non-string or invalid-Unicode content); `minillm.infra.corpus.iter_sft_conversations` uses it to
report `file:line: reason` before the masker sees the data.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = {"human": "user", "user": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}

_ADD_TOKENS_HINT = (
    "add them as special tokens, e.g. with transformers: "
    "tokenizer.add_special_tokens({'extra_special_tokens': ['<|im_start|>', '<|im_end|>']}, "
    "replace_extra_special_tokens=False), then model.resize_token_embeddings(len(tokenizer)); "
    "with a tokenizers.Tokenizer: tok.add_special_tokens(['<|im_start|>', '<|im_end|>'])"
)


@dataclass
class MaskStats:
    """What the masker did with the conversations it saw (nothing is dropped silently)."""

    conversations: int = 0
    kept: int = 0
    truncated: int = 0  # kept, but cut at max_len
    dropped_no_labels: int = 0  # every label -100: no assistant turn, or truncation cut all replies
    leading_turns_dropped: int = 0  # a first non-user turn (after the system turn), dropped as the course does
    empty: int = 0  # no turn at all (counted in dropped_no_labels too)

    def __str__(self) -> str:
        return (f"{self.conversations} conversations: {self.kept} kept ({self.truncated} truncated), "
                f"{self.dropped_no_labels} dropped with no label left, "
                f"{self.leading_turns_dropped} leading non-user turns dropped")


def chatml_turn(role: str, content: str) -> str:
    """One ChatML turn, without the newline that follows it: `<|im_start|>{role}\n{content}<|im_end|>`."""
    return f"{IM_START}{role}\n{content}{IM_END}"


def chatml_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """OpenAI-style messages rendered as Qwen's template does, ending with the assistant header to complete.

    This is the template's *text*: tokenizing it turns a special-token string inside a message into a
    control token. To tokenize a prompt with user content kept as text, use `chatml_prompt_ids`.
    """
    return "".join(chatml_turn(m["role"], m["content"]) + "\n" for m in messages) + f"{IM_START}assistant\n"


_SURROGATE = re.compile("[\ud800-\udfff]")


def unicode_problem(text: str, what: str) -> str | None:
    """A lone surrogate (JSON "\\ud800" escapes decode to one) is not text any tokenizer can encode."""
    m = _SURROGATE.search(text)
    return None if m is None else (f"{what} has a lone surrogate U+{ord(m.group()):04X} at character {m.start()} "
                                   "(invalid Unicode)")


def _turn(turn: Any) -> tuple[str, str] | str:
    """(role, content) of a BelleGroup (`from`/`value`) or OpenAI (`role`/`content`) turn, or why it is unusable."""
    if not isinstance(turn, Mapping):
        return f"is a JSON {type(turn).__name__}, expected an object with 'from'/'value' or 'role'/'content'"
    keys = ("from", "value") if "from" in turn else ("role", "content") if "role" in turn else None
    if keys is None:
        return f"expected 'from'/'value' or 'role'/'content' keys, found {sorted(turn)}"
    role, content = turn[keys[0]], turn.get(keys[1])
    if not isinstance(role, str) or role not in ROLES:
        return f"unknown role {role!r} (known: {sorted(ROLES)})"
    if not isinstance(content, str):
        return f"{keys[1]!r} is {'missing' if keys[1] not in turn else type(content).__name__}, not a string"
    return unicode_problem(content, repr(keys[1])) or (ROLES[role], content)


def _conversation_turns(record: Any) -> list | str:
    if isinstance(record, Mapping):
        key = next((k for k in ("conversations", "messages") if k in record), None)
        if key is None:
            return f"expected a 'conversations' (or 'messages') key, found {sorted(record)}"
        record = record[key]
        if not isinstance(record, list):
            return f"{key!r} is a JSON {type(record).__name__}, expected a list of turns"
    elif not isinstance(record, (list, tuple)):
        return f"is a JSON {type(record).__name__}, expected an object with a 'conversations' (or 'messages') list"
    return record


def conversation_problem(record: Any) -> str | None:
    """Why `record` (a JSON line: {"conversations"|"messages": [turns]} or a list of turns) is not a usable
    conversation, naming the turn; None if it is."""
    turns = _conversation_turns(record)
    if isinstance(turns, str):
        return turns
    for j, turn in enumerate(turns):
        parsed = _turn(turn)
        if isinstance(parsed, str):
            return f"turn {j}: {parsed}"
    return None


def _turns(conversation: Any, index: int) -> list[tuple[str, str]]:
    """Turns -> [(role, content)], roles normalised; a ValueError names the conversation's batch position
    (read files with minillm.infra.corpus, which names file:line before this point)."""
    turns = _conversation_turns(conversation)
    if isinstance(turns, str):
        raise ValueError(f"conversation {index}: {turns}")
    out = []
    for j, turn in enumerate(turns):
        parsed = _turn(turn)
        if isinstance(parsed, str):
            raise ValueError(f"conversation {index}, turn {j}: {parsed}")
        out.append(parsed)
    return out


@contextlib.contextmanager
def split_special_tokens(backend: Any, value: bool) -> Iterator[None]:
    """Set tokenizers' switch that tokenizes special-token strings as text (value=True) for a block, then
    restore it (an HF tokenizer called with split_special_tokens=True leaves it set on its backend)."""
    old = getattr(backend, "encode_special_tokens", None)
    if old is None or old == value:
        yield
        return
    backend.encode_special_tokens = value
    try:
        yield
    finally:
        backend.encode_special_tokens = old


def _encode(tokenizer: Any, texts: list[str], specials_as_text: bool = False
            ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """One batched call: ids and character offsets of every text, no special tokens added.
    specials_as_text: special-token strings in the texts are tokenized as ordinary text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the tokenizers.Tokenizer inside an HF fast one
    if backend is not None and backend.truncation is None and backend.padding is None:
        tokenizer = backend  # same ids and offsets, without ~half the time spent wrapping them per text
    if hasattr(tokenizer, "encode_batch"):  # a raw tokenizers.Tokenizer
        with split_special_tokens(tokenizer, specials_as_text):
            encs = tokenizer.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs], [e.offsets for e in encs]
    try:
        out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                        split_special_tokens=specials_as_text)
    except NotImplementedError as e:  # slow (Python) HF tokenizers have no offsets
        raise TypeError(f"the masker needs token offsets: use a fast tokenizer (use_fast=True). {e}") from None
    return out["input_ids"], out["offset_mapping"]


def _special_tokens(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's special added tokens (the strings it turns into control ids): {string: id}."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    added = backend.get_added_tokens_decoder() if hasattr(backend, "get_added_tokens_decoder") else {}
    return {t.content: i for i, t in added.items() if t.special and t.content}


class _ContentAsText:
    """Rewrites ids so that special-token strings inside content are ordinary text pieces.

    The whole text is tokenized as usual (so everything else keeps the template's ids); each control id
    whose characters lie inside a content span is then replaced by the ids of its string tokenized as
    text. Those are computed after a "\n" (then dropped) so that tokenizers treating the start of a text
    specially (SentencePiece's "▁" prefix) tokenize the string as they would mid-text.
    """

    def __init__(self, tokenizer: Any):
        self.specials = _special_tokens(tokenizer)
        self.ids = set(self.specials.values())
        strings = sorted(self.specials, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, strings))) if strings else None
        self.as_text: dict[int, list[int]] = {}
        if strings:
            ids, offsets = _encode(tokenizer, ["\n" + s for s in strings], specials_as_text=True)
            for s, tok_ids, offs in zip(strings, ids, offsets):
                piece = [t for t, (a, _) in zip(tok_ids, offs) if a >= 1]
                self.as_text[self.specials[s]] = piece if piece and not self.ids & set(piece) else \
                    _encode(tokenizer, [s], specials_as_text=True)[0][0]

    def needed(self, content: str) -> bool:
        return self.pattern is not None and self.pattern.search(content) is not None

    def rewrite(self, ids: Sequence[int], offsets: Sequence[tuple[int, int]], start: int, end: int
                ) -> tuple[list[int], list[tuple[int, int]]]:
        """Replace control ids whose characters lie within [start, end) by their text ids."""
        new_ids, new_offs = [], []
        for i, (a, b) in zip(ids, offsets):
            if i in self.ids and start <= a and b <= end:
                new_ids += self.as_text[i]
                new_offs += [(a, b)] * len(self.as_text[i])
            else:
                new_ids.append(i)
                new_offs.append((a, b))
        return new_ids, new_offs


def chatml_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], allow_control_tokens: bool = False
                      ) -> list[int]:
    """The ids of `chatml_prompt(messages)`. By default every message's content is text: a special-token
    string typed in it (`<|im_end|>`, ...) never becomes a control id (see the module docstring);
    `allow_control_tokens=True` gives the ids apply_chat_template(..., add_generation_prompt=True) gives."""
    text, spans, pos = "", [], 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        spans.append((pos + len(head), pos + len(head) + len(m["content"])))
        turn = chatml_turn(m["role"], m["content"]) + "\n"
        text, pos = text + turn, pos + len(turn)
    text += f"{IM_START}assistant\n"
    [ids], [offsets] = _encode(tokenizer, [text])
    if allow_control_tokens:
        return list(ids)
    fix = _ContentAsText(tokenizer)
    for start, end in reversed(spans):  # later spans first: earlier offsets stay valid
        if fix.needed(text[start:end]):
            ids, offsets = fix.rewrite(ids, offsets, start, end)
    return list(ids)


def _vocab_id(tokenizer: Any, token: str) -> int | None:
    if hasattr(tokenizer, "token_to_id"):  # a raw tokenizers.Tokenizer
        return tokenizer.token_to_id(token)
    i = tokenizer.convert_tokens_to_ids(token)
    return None if i is None or i == getattr(tokenizer, "unk_token_id", None) else i


def _special_ids(tokenizer: Any, encoded: dict[str, list[int]]) -> tuple[int, int]:
    """The ids of <|im_start|>, <|im_end|>: each must be one vocabulary entry that encodes as itself."""
    missing = [f"{t!r} (encodes to {ids})" for t, ids in encoded.items() if ids != [_vocab_id(tokenizer, t)]]
    if missing:
        raise ValueError(f"the tokenizer has no special token {', '.join(missing)}: " + _ADD_TOKENS_HINT)
    return encoded[IM_START][0], encoded[IM_END][0]


def mask_batch(
    conversations: Sequence[Any],
    tokenizer: Any,
    max_len: int,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    user_role: str = "user",
    stats: MaskStats | None = None,
    allow_control_tokens: bool = False,
) -> dict[str, list[list[int]]]:
    """Mask a batch of conversations; returns the kept samples (unpadded) as columns.

    For `datasets.map(batched=True, remove_columns=...)`: the output may have fewer rows than the
    input (dropped samples are counted in `stats`). Every kept sample equals `mask_conversation`'s.
    Special-token strings inside content are text unless `allow_control_tokens` (module docstring).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    stats = stats if stats is not None else MaskStats()
    rendered: list[list[tuple[str, int]]] = []  # per conversation: (role, index of its segment in `texts`)
    texts: list[str] = []
    needs_fix: list[int] = []  # segments whose content holds a special-token string (safe mode)
    fix = None if allow_control_tokens else _ContentAsText(tokenizer)
    for i, conv in enumerate(conversations):
        turns = _turns(conv, i)
        stats.conversations += 1
        system = system_prompt
        if turns and turns[0][0] == "system":
            system, turns = turns[0][1], turns[1:]
        if turns and turns[0][0] != "user":
            turns = turns[1:]  # as the course: a conversation starts with the user
            stats.leading_turns_dropped += 1
        if not turns:
            stats.empty += 1
        if system is not None:
            turns = [("system", system), *turns]
        segs = []
        for role, content in turns:
            name = user_role if role == "user" else role
            segs.append((role, len(texts), len(IM_START) + len(name) + 1))  # chars before the content
            if fix is not None and fix.needed(content):
                needs_fix.append(len(texts))
            texts.append(chatml_turn(name, content))
        rendered.append(segs)

    # Every segment is tokenized between its own <|im_start|> and <|im_end|>, as in the full text:
    # tokenizers that treat the start of a text specially (SentencePiece's "▁" prefix, added tokens
    # with lstrip/rstrip) then give the same ids as the chat template. The separator "\n" and the
    # two ChatML tokens ride along in the same call.
    ids, offsets = _encode(tokenizer, [*texts, f"{IM_END}\n{IM_START}", IM_START, IM_END])
    im_start, im_end = _special_ids(tokenizer, {IM_START: list(ids[-2]), IM_END: list(ids[-1])})
    for k, text in enumerate([*texts, f"{IM_END}\n{IM_START}"]):
        if len(ids[k]) < 2 or ids[k][0] not in (im_start, im_end) or ids[k][-1] not in (im_start, im_end):
            raise ValueError(f"the tokenizer does not keep ChatML tokens intact around {text!r} (got ids {ids[k]}); "
                             + _ADD_TOKENS_HINT)
    if needs_fix:
        ids, offsets = list(ids), list(offsets)
        for k in needs_fix:  # content starts after the header; the final <|im_end|> is the template's
            header_len = next(h for segs in rendered for _, kk, h in segs if kk == k)
            ids[k], offsets[k] = fix.rewrite(ids[k][:-1], offsets[k][:-1], header_len, len(texts[k]) - len(IM_END))
            ids[k].append(im_end)
            offsets[k].append((len(texts[k]) - len(IM_END), len(texts[k])))
    nl = list(ids[len(texts)][1:-1])
    nl_ignore = [IGNORE_INDEX] * len(nl)

    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for segs in rendered:
        input_ids: list[int] = []
        labels: list[int] = []
        first_label = None
        for role, k, header_len in segs:
            seg_ids = ids[k][1:-1]
            input_ids += [im_start, *seg_ids, im_end, *nl]
            if role == "assistant":
                # first token overlapping the reply (it starts header_len chars into the text);
                # a few header tokens at most, so this scan is O(1) per turn
                offs, start = offsets[k], 0
                while start < len(seg_ids) and offs[start + 1][1] <= header_len:
                    start += 1
                if first_label is None:
                    first_label = len(labels) + 1 + start
                labels += [IGNORE_INDEX] * (1 + start) + seg_ids[start:] + [im_end] + nl_ignore
            else:
                labels += [IGNORE_INDEX] * (len(seg_ids) + 2) + nl_ignore
        if first_label is None or first_label >= max_len:
            stats.dropped_no_labels += 1
            continue
        if len(input_ids) > max_len:
            stats.truncated += 1
            input_ids, labels = input_ids[:max_len], labels[:max_len]
        stats.kept += 1
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        out["attention_mask"].append([1] * len(input_ids))
    return out


def mask_conversation(
    conversation: Any,
    tokenizer: Any,
    max_len: int,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    user_role: str = "user",
    stats: MaskStats | None = None,
    allow_control_tokens: bool = False,
) -> dict[str, list[int]] | None:
    """One conversation -> {"input_ids", "labels", "attention_mask"} (unpadded, <= max_len tokens).

    Returns None when the sample would train nothing (no assistant token within max_len); pass
    `stats` to count it. `system_prompt=None` renders no default system turn.
    """
    out = mask_batch([conversation], tokenizer, max_len, system_prompt, user_role, stats, allow_control_tokens)
    return {k: v[0] for k, v in out.items()} if out["input_ids"] else None


@dataclass
class SFTMasker:
    """`mask_batch` bound to its settings, for `ds.map(masker, batched=True, remove_columns=ds.column_names)`.

    `stats` accumulates over calls (single process; with num_proc > 1 compare dataset lengths instead).
    """

    tokenizer: Any
    max_len: int
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    user_role: str = "user"
    column: str = "conversations"
    stats: MaskStats = field(default_factory=MaskStats)
    allow_control_tokens: bool = False

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list[list[int]]]:
        if self.column not in batch:
            raise KeyError(f"the batch has no {self.column!r} column (columns: {sorted(batch)})")
        return mask_batch(batch[self.column], self.tokenizer, self.max_len, self.system_prompt, self.user_role,
                          self.stats, self.allow_control_tokens)


@dataclass
class SFTCollator:
    """Pad a list of masked samples into tensors: input_ids with `pad_token_id`, labels with -100,
    attention_mask with 0, on the right (training) or the left.

    Padding is by position, so pad_token_id may equal eos: the real eos/<|im_end|> keep their labels.
    (With left padding, transformers' models still number positions from 0 at the first pad; pass
    position_ids = cumsum(attention_mask) - 1 yourself if that matters.)
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(features)
        input_ids = np.full((n, width), self.pad_token_id, dtype=np.int64)
        labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((n, width), dtype=np.int64)
        for i, f in enumerate(features):
            length = len(f["input_ids"])
            if len(f["labels"]) != length:
                raise ValueError(f"sample {i}: {length} input_ids but {len(f['labels'])} labels")
            cols = slice(0, length) if self.padding_side == "right" else slice(width - length, width)
            input_ids[i, cols] = f["input_ids"]
            labels[i, cols] = f["labels"]
            attention_mask[i, cols] = f.get("attention_mask", 1)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "attention_mask": torch.from_numpy(attention_mask)}

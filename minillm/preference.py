"""Preference rows as TRL 1.16's DPOTrainer tokenises and batches them (its _prepare_dataset and
DataCollatorForPreference), for minillm/dpo.py.

- A row is {"prompt", "chosen", "rejected"}: three strings (plain text) or three lists of {"role", "content"}
  messages (conversational), rendered with the bundled tokenizer's ChatML template (`render_chatml`).
- The prompt is tokenised alone (a conversation with the generation prompt), then prompt + chosen and prompt +
  rejected; the completion is what follows their common prefix with the prompt. Plain text gets the EOS string
  appended to each completion (TRL's add_eos); a conversation ends with the template's `<|im_end|>\n`.
- `keep_start` truncation (the default) drops rows whose prompt alone reaches max_length (no completion token
  would be left); `collate` then cuts each sequence at max_length on its own and pads on the right.
- Unlike TRL, nothing goes unreported: `PreferenceStats` counts dropped, truncated and tied rows, and a row that
  is not a preference row, or whose kind differs from the first row's, is a `file:line: why` problem (TRL
  decides EOS handling from the first row alone).
- Special-token strings typed into content become control tokens, as under TRL (apply_chat_template);
  minillm/sft.py's default of tokenising them as text is not applied here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # the bundled tokenizer's chat template adds it


def _messages_problem(value: Any, key: str) -> str | None:
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"{key!r} message {j} is not an object with string 'role' and 'content'"
    return None if value else f"{key!r} is an empty list of messages"


def row_kind(row: Any) -> str:
    """"plain" (three strings) or "conversational" (three lists of messages); a ValueError says why neither."""
    if not isinstance(row, Mapping):
        raise ValueError(f"is a JSON {type(row).__name__}, expected an object with prompt/chosen/rejected")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"has no {', '.join(map(repr, missing))} (found {sorted(row)})")
    values = [row[k] for k in ("prompt", "chosen", "rejected")]
    if all(isinstance(v, str) for v in values):
        return "plain"
    if all(isinstance(v, list) for v in values):
        for k, v in zip(("prompt", "chosen", "rejected"), values):
            problem = _messages_problem(v, k)
            if problem:
                raise ValueError(problem)
        return "conversational"
    kinds = ", ".join(f"{k} is {type(v).__name__}" for k, v in zip(("prompt", "chosen", "rejected"), values))
    raise ValueError(f"prompt, chosen and rejected must be all strings or all lists of messages ({kinds})")


def render_chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The bundled tokenizer's chat template (Qwen2's ChatML), as text: a default system turn when the first
    message is not one, every turn `<|im_start|>{role}\\n{content}<|im_end|>\\n`, then the assistant header."""
    text = "" if messages and messages[0]["role"] == "system" else f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
    text += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Ids of `text` from a tokenizers.Tokenizer or an HF fast tokenizer (its backend: the same ids)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return backend.encode(text, add_special_tokens=add_special_tokens).ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_row(tokenizer: Any, row: Mapping[str, Any], eos_token: str) -> dict[str, list[int]]:
    """TRL's tokenize_fn: plain text is tokenised as `tokenizer(text)` (special tokens added as its post-processor
    says), after `eos_token` is appended to each completion that does not end with it; a conversation is rendered
    by the chat template (the prompt with the generation prompt) and tokenised without added special tokens."""
    if row_kind(row) == "plain":
        chosen, rejected = (c if c.endswith(eos_token) else c + eos_token for c in (row["chosen"], row["rejected"]))
        prompt = _encode(tokenizer, row["prompt"], True)
        prompt_chosen = _encode(tokenizer, row["prompt"] + chosen, True)
        prompt_rejected = _encode(tokenizer, row["prompt"] + rejected, True)
    else:
        prompt = _encode(tokenizer, render_chatml(row["prompt"], add_generation_prompt=True), False)
        prompt_chosen = _encode(tokenizer, render_chatml(row["prompt"] + row["chosen"]), False)
        prompt_rejected = _encode(tokenizer, render_chatml(row["prompt"] + row["rejected"]), False)
    # the completion starts where prompt and prompt+completion diverge (tokens may merge across the boundary)
    n = min(_common_prefix(prompt, prompt_chosen), _common_prefix(prompt, prompt_rejected))
    return {"prompt_ids": prompt[:n], "chosen_ids": prompt_chosen[n:], "rejected_ids": prompt_rejected[n:]}


@dataclass
class PreferenceStats:
    """What tokenize_rows did with the rows it saw: nothing is dropped or kept silently."""

    rows: int = 0
    kept: int = 0
    dropped_prompt_too_long: int = 0  # keep_start: the prompt alone reaches max_length, no completion token left
    truncated: int = 0  # kept, but prompt + chosen or prompt + rejected is cut at max_length
    ties: int = 0  # chosen == rejected: kept (as TRL), but the pair's gradient is zero
    problems: list[str] = field(default_factory=list)  # "file:line: why" for rows that could not be used

    def __str__(self) -> str:
        return (f"{self.rows} preference rows: {self.kept} kept ({self.truncated} truncated, {self.ties} with "
                f"chosen == rejected), {self.dropped_prompt_too_long} dropped (prompt alone reaches max_length), "
                f"{len(self.problems)} unusable")


def tokenize_rows(tokenizer: Any, rows: Sequence[Any], eos_token: str, max_length: int | None = 1024,
                  truncation_mode: str = "keep_start", where: Sequence[str] | None = None,
                  ) -> tuple[list[dict[str, list[int]]], PreferenceStats]:
    """Every usable row tokenised, and the stats. `where[i]` names row i (`file:line`) in problems; a row that is
    not a preference row, or whose kind (plain / conversational) differs from the first row's, is a problem (TRL
    decides EOS handling from the first row alone and would mis-tokenise or crash on the others)."""
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', not {truncation_mode!r}")
    stats, out, first_kind = PreferenceStats(), [], None
    for i, row in enumerate(rows):
        stats.rows += 1
        name = where[i] if where is not None else f"row {i}"
        try:
            kind = row_kind(row)
            if first_kind is not None and kind != first_kind:
                raise ValueError(f"is {kind} but the first row is {first_kind}: one dataset, one kind")
        except ValueError as e:
            stats.problems.append(f"{name}: {e}")
            continue
        first_kind = first_kind or kind
        ids = tokenize_row(tokenizer, row, eos_token)
        P = len(ids["prompt_ids"])
        if max_length is not None and truncation_mode == "keep_start" and P >= max_length:
            stats.dropped_prompt_too_long += 1
            continue
        if max_length is not None and P + max(len(ids["chosen_ids"]), len(ids["rejected_ids"])) > max_length:
            stats.truncated += 1
        stats.ties += ids["chosen_ids"] == ids["rejected_ids"]
        stats.kept += 1
        out.append(ids)
    return out, stats


def collate(rows: Sequence[Mapping[str, Any]], pad_token_id: int, max_length: int | None = None,
            truncation_mode: str = "keep_start") -> dict[str, torch.Tensor]:
    """TRL's DataCollatorForPreference: rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], each sequence
    truncated on its own, right padding. input_ids, attention_mask, completion_mask (2B, T); reference log-probs
    (B,) each when the rows carry them (precompute_ref_log_probs)."""
    sl = slice(None) if max_length is None else \
        slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
    seqs, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for r in rows:
            seqs.append((r["prompt_ids"] + r[key])[sl])
            masks.append(([0] * len(r["prompt_ids"]) + [1] * len(r[key]))[sl])
    T = max(len(s) for s in seqs)
    batch = {"input_ids": torch.tensor([s + [pad_token_id] * (T - len(s)) for s in seqs]),
             "attention_mask": torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs]),
             "completion_mask": torch.tensor([m + [0] * (T - len(m)) for m in masks])}
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in rows[0]:
            batch[key] = torch.tensor([r[key] for r in rows])
    return batch

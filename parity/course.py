"""The code minillm is checked against, as its authors wrote it: the course's chapter and transformers' run_clm.

Each function restates a reference line for line (its docstring names the source and, for the course,
the section of /work/shared/course/chapter-training-frameworks.txt). The parity checks (parity/data.py)
and the benchmark (parity/bench/data.py) import them from here, so there is one copy of each.

- `run_clm_group_texts`: transformers' examples/pytorch/language-modeling/run_clm.py `group_texts`;
- `course_group_texts`: the course's pretraining chunker (3.1.3);
- `course_preprocess`: the course's SFT masking loop (3.2.2), faithfully, bugs included;
- `course_preprocess_corrected`: the same loop with its label bugs fixed as minillm defines them.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch

from minillm.sft import DEFAULT_SYSTEM_PROMPT


def run_clm_group_texts(examples: dict[str, list], block_size: int) -> dict[str, list]:
    """transformers' `group_texts`, from examples/pytorch/language-modeling/run_clm.py
    (huggingface/transformers, commit 00d481d18f914b55e65faa31e82321629691eadb, Apache-2.0),
    restated line for line: concatenate every column, drop the remainder (a batch shorter than
    block_size gives no block), slice into blocks, labels = a copy of input_ids."""
    concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
              for k, t in concatenated_examples.items()}
    result["labels"] = result["input_ids"].copy()
    return result


def course_group_texts(examples: dict[str, list], block_size: int) -> dict[str, list]:
    """The course's `group_texts` (/work/shared/course/chapter-training-frameworks.txt, section
    "3.1.3 预训练数据处理", the code after "按 block_size 切分"): as run_clm, except that a batch shorter
    than block_size is kept as one short block."""
    concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    if total_length >= block_size:
        total_length = (total_length // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
              for k, t in concatenated_examples.items()}
    result["labels"] = result["input_ids"].copy()
    return result


def course_preprocess(sources: list[list[dict]], tokenizer: Any, max_len: int,
                      system_message: str = DEFAULT_SYSTEM_PROMPT) -> dict[str, torch.Tensor]:
    """The course's SFT `preprocess` (/work/shared/course/chapter-training-frameworks.txt, section
    "3.2.2 微调数据处理", the code after "拼接多轮对话"), faithfully: per sample, per turn, one tokenizer
    call per piece; pad id as ignore label; user/system markers left unmasked."""
    roles = {"human": "<|im_start|>human", "assistant": "<|im_start|>assistant"}
    im_start = tokenizer("<|im_start|>").input_ids
    im_end = tokenizer("<|im_end|>").input_ids
    IGNORE_TOKEN_ID = tokenizer.pad_token_id
    nl_tokens = tokenizer("\n").input_ids
    _system = tokenizer("system").input_ids + nl_tokens
    input_ids, targets = [], []
    for i in range(len(sources)):
        source = sources[i]
        if source[0]["from"] != "human":
            source = source[1:]
        input_id, target = [], []
        system = im_start + _system + tokenizer(system_message).input_ids + im_end + nl_tokens
        input_id += system
        target += im_start + [IGNORE_TOKEN_ID] * (len(system) - 3) + im_end + nl_tokens
        assert len(input_id) == len(target)
        for j, sentence in enumerate(source):
            role = roles[sentence["from"]]
            _input_id = tokenizer(role).input_ids + nl_tokens + tokenizer(sentence["value"]).input_ids + im_end + nl_tokens
            input_id += _input_id
            if role == "<|im_start|>human":
                _target = im_start + [IGNORE_TOKEN_ID] * (len(_input_id) - 3) + im_end + nl_tokens
            elif role == "<|im_start|>assistant":
                _target = (im_start + [IGNORE_TOKEN_ID] * len(tokenizer(role).input_ids)
                           + _input_id[len(tokenizer(role).input_ids) + 1 : -2] + im_end + nl_tokens)
            else:
                raise NotImplementedError(role)
            target += _target
        assert len(input_id) == len(target)
        input_id += [tokenizer.pad_token_id] * (max_len - len(input_id))
        target += [IGNORE_TOKEN_ID] * (max_len - len(target))
        input_ids.append(input_id[:max_len])
        targets.append(target[:max_len])
    input_ids = torch.tensor(input_ids)
    targets = torch.tensor(targets)
    return dict(input_ids=input_ids, labels=targets, attention_mask=input_ids.ne(tokenizer.pad_token_id))


def course_preprocess_corrected(sources: list[list[dict]], tokenizer: Any, max_len: int,
                                system_message: str) -> dict[str, list[list[int]]]:
    """The course's loop (`course_preprocess` above, course section "3.2.2 微调数据处理"), same per-turn tokenizer calls, with its label
    bugs fixed as minillm defines them: -100 is the ignore label; system and user turns, every turn's
    header and the "\\n" after <|im_end|> are ignored; the reply and its <|im_end|> are labelled; samples
    are cut at max_len, not padded, and a sample left without labels is dropped."""
    role_ids = {r: tokenizer(f"<|im_start|>{r}").input_ids for r in ("system", "human", "assistant")}
    im_end = tokenizer("<|im_end|>").input_ids
    nl = tokenizer("\n").input_ids
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for source in sources:
        if source[0]["from"] != "human":
            source = source[1:]
        turns = [("system", system_message)] + [(t["from"], t["value"]) for t in source]
        input_id, target = [], []
        for role, text in turns:
            header = role_ids[role] + nl
            content = tokenizer(text).input_ids
            input_id += header + content + im_end + nl
            if role == "assistant":
                target += [-100] * len(header) + content + im_end + [-100] * len(nl)
            else:
                target += [-100] * (len(header) + len(content) + len(im_end) + len(nl))
        input_id, target = input_id[:max_len], target[:max_len]
        if any(t != -100 for t in target):
            out["input_ids"].append(input_id)
            out["labels"].append(target)
    return out

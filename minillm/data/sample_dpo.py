"""The bundled preference pairs: `python -m minillm.data.sample_dpo` writes dpo.jsonl and dpo_heldout.jsonl.

Every pair comes from the sample world's SFT data (sft.jsonl): the prompt is one of its questions, `chosen` the
answer it teaches, `rejected` a fluent wrong answer: the taught answer to another question *of the same shape*
(the question with its quoted words, numbers and names masked: "How do you say "sun" in Chinese?" gets the answer
about "moon"; "3 + 4 = ?" the answer to "5 + 2 = ?"), so the two differ in what is said, not in how. English and
Chinese questions both; rows are conversational (lists of messages, rendered with the ChatML template). The
held-out split has questions the training split does not. Byte-identical output for the same seed.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from pathlib import Path

from minillm.data import DATA_DIR
from minillm.data.sample_data import ZH_CHARS, ZH_SUFFIX

TRAIN, HELDOUT = DATA_DIR / "dpo.jsonl", DATA_DIR / "dpo_heldout.jsonl"
N_TRAIN, N_HELDOUT = 320, 48
PER_SHAPE = 48  # arithmetic has far more questions than the rest: at most this many pairs of one shape
# what varies between questions of one shape: quoted text, numbers (also in Chinese), names, Chinese town names
_VARYING = re.compile(rf'"[^"]*"|“[^”]*”|\d+|\b[A-Z][a-z]+\b|[零一二三四五六七八九十百千万两]+|[{ZH_CHARS}]+[{"".join(ZH_SUFFIX)}]')


def taught_pairs(sft_file: Path = DATA_DIR / "sft.jsonl") -> list[tuple[str, str]]:
    """Each (question, answer) the SFT data teaches, once, in file order."""
    seen, pairs = set(), []
    for line in sft_file.read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            if q["value"] not in seen:
                seen.add(q["value"])
                pairs.append((q["value"], a["value"]))
    return pairs


def shape(question: str) -> str:
    return _VARYING.sub("_", question)


def preference_rows(pairs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    by_shape = defaultdict(list)
    for q, a in pairs:
        by_shape[shape(q)].append((q, a))
    rows = []
    for q, a in pairs:
        wrong = [a2 for q2, a2 in by_shape[shape(q)] if a2 != a]
        if not wrong:
            continue  # a question of its own shape: no fluent wrong answer of the same kind
        rows.append({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
                     "rejected": [{"role": "assistant", "content": rng.choice(wrong)}]})
    return rows


def main(seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = preference_rows(taught_pairs(), rng)
    rng.shuffle(rows)
    count = defaultdict(int)
    for r in rows:
        count[shape(r["prompt"][0]["content"])] += 1
        r["keep"] = count[shape(r["prompt"][0]["content"])] <= PER_SHAPE
    rows = [{k: v for k, v in r.items() if k != "keep"} for r in rows if r["keep"]]
    heldout, train = rows[:N_HELDOUT], rows[N_HELDOUT:N_HELDOUT + N_TRAIN]
    for path, part in ((TRAIN, train), (HELDOUT, heldout)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        zh = sum(bool(re.search(r"[\u4e00-\u9fff]", r["prompt"][0]["content"])) for r in part)
        print(f"{path}: {len(part)} pairs ({zh} with a Chinese question)")


if __name__ == "__main__":
    main()

"""Generate the bundled evaluation data: `python -m minillm.data.sample_eval` rewrites minillm/data/eval/.

From the sample world of sample_data.py (its towns, words, days, prices), never trained on:
- `heldout.jsonl` + `heldout.yaml`: held-out text (stories, arithmetic, counting, weekdays, recipes, dictionary
  lines from sample_data's own makers, another seed), every document checked absent from pretrain.jsonl; an
  lm-eval loglikelihood_rolling task (word/byte perplexity, bits per byte).
- `sample_mc.jsonl` + `sample_mc.yaml`: a multiple-choice task in English and Chinese, answers correct by
  construction (the town's product and region, the next weekday, a sum, a translation, a price), the distractors
  drawn from the same table so that every choice is a plausible continuation.

Every choice follows its question after a space (target_delimiter " ", lm-eval's default), Chinese ones too. The
bundled tokenizer's pre-tokenizer keeps a run of letters together (`\p{L}+`), and Chinese has no spaces: with no
delimiter, "星期日之后是" + "星期一" is one run, BPE merges across the join (the tokenizer learned "之后是星期一" as
one token from the training text), and lm-eval's `_encode_pair` (encode the whole, keep the tokens after
len(encode(context))) leaves the continuation empty (lm-eval asserts) or cut from the wrong place. A space starts a
new pre-token, so the context's tokens are a prefix of the whole's; `check_split` asserts that for every choice.

The YAML files name their data relative to the repository root (lm-eval reads data_files from the working
directory); minillm.evaluate.read_task also finds them next to the YAML. Deterministic: a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from minillm.data import DATA_DIR, TOKENIZER_DIR
from minillm.data.sample_data import (DAYS, ITEMS, PRODUCTS, REGIONS, WORDS, arithmetic, counting, dictionary,
                                      make_towns, recipe, story, town_text, weekdays)
from minillm.evaluate import encoder_for

EVAL_DIR = DATA_DIR / "eval"
SEED = 2024  # sample_data.py uses 1234; make_towns(Random(1234)) reproduces its towns

HEADER = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: minillm/data/eval/{data}
test_split: test
"""
MC_YAML = HEADER.format(name="sample_mc", data="sample_mc.jsonl") + """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""
HELDOUT_YAML = HEADER.format(name="sample_heldout", data="heldout.jsonl") + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def heldout_docs(rng: random.Random, towns, trained: set[str], n: int) -> list[str]:
    makers = [story, arithmetic, counting, weekdays, recipe, dictionary]
    docs: list[str] = []
    while len(docs) < n:
        maker = rng.choice(makers)
        doc = " ".join(maker(rng, towns) if maker is story else maker(rng) for _ in range(rng.randint(1, 3)))
        if doc not in trained and doc not in docs:
            docs.append(doc)
    return docs


def choices_with(rng: random.Random, answer: str, pool: list[str], k: int = 4) -> tuple[list[str], int]:
    """`answer` and k-1 distinct distractors from `pool`, shuffled; the answer's index."""
    others = rng.sample([p for p in dict.fromkeys(pool) if p != answer], k - 1)
    choices = others + [answer]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def mc_items(rng: random.Random, towns, n: int) -> list[dict]:
    items = []
    en_words, zh_words = [e for e, _ in WORDS], [z for _, z in WORDS]
    while len(items) < n:
        kind, t = rng.randrange(10), rng.choice(towns)
        if kind == 0:
            q, a, pool, lang = f"{t.en} is a {t.size[0]} town in the {t.region[0]}. It is known for its", \
                t.product[0], [p for p, _ in PRODUCTS], "en"
        elif kind == 1:
            q, a, pool, lang = f"{t.zh}是{t.region[1]}的一座{t.size[1]}小城,以", t.product[1], [p for _, p in PRODUCTS], "zh"
        elif kind == 2:
            q, a, pool, lang = f"{t.en} is a {t.size[0]} town in the", t.region[0], [r for r, _ in REGIONS], "en"
        elif kind == 3:
            q, a, pool, lang = f"{t.zh}是", t.region[1], [r for _, r in REGIONS], "zh"
        elif kind in (4, 5):
            i, zh = rng.randrange(7), kind == 5
            q = f"{DAYS[i][1]}之后是" if zh else f"After {DAYS[i][0]} comes"
            a, pool, lang = DAYS[(i + 1) % 7][int(zh)], [d[int(zh)] for d in DAYS], "zh" if zh else "en"
        elif kind == 6:
            x, y = rng.randint(0, 99), rng.randint(0, 99)
            q, a, lang = f"{x} + {y} =", str(x + y), "en"
            pool = [str(x + y + d) for d in (-10, -2, -1, 1, 2, 10) if x + y + d >= 0]
        elif kind == 7:
            w = rng.randrange(len(WORDS))
            q, a, pool, lang = f"The Chinese word for {WORDS[w][0]} is", zh_words[w], zh_words, "en"
        elif kind == 8:
            w = rng.randrange(len(WORDS))
            q, a, pool, lang = f"“{WORDS[w][1]}”的英文是", en_words[w], en_words, "zh"
        else:
            item, _, price = rng.choice(ITEMS)
            k = rng.randint(2, 4)
            q, a, lang = f"It cost {price} coins, so {k} of them cost", f"{price * k} coins", "en"
            pool = [f"{price * k + d} coins" for d in (-price, -1, 1, price, 2 * price) if price * k + d > 0]
        choices, gold = choices_with(rng, a, pool)
        item = {"question": q, "choices": choices, "answer": gold, "lang": lang}
        if item not in items:
            items.append(item)
    return items


def check_split(items: list[dict], delimiter: str = " ") -> None:
    """Each choice's tokens are the whole string's tokens after the context's, as lm-eval splits them: the
    context's encoding is a prefix of encode(context + delimiter + choice) and something is left after it."""
    enc = encoder_for(TOKENIZER_DIR, 10**6)  # no truncation: the whole strings
    for n, item in enumerate(items, 1):
        ctx = enc.encode(item["question"])
        for c in item["choices"]:
            whole = enc.encode(item["question"] + delimiter + c)
            assert whole[:len(ctx)] == ctx and len(whole) > len(ctx), \
                f"sample_mc.jsonl:{n}: {item['question']!r} + {c!r} merges across the join"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=EVAL_DIR)
    ap.add_argument("--heldout-docs", type=int, default=200)
    ap.add_argument("--mc-items", type=int, default=300)
    args = ap.parse_args(argv)
    towns = make_towns(random.Random(1234), 60)
    trained = {json.loads(line)["text"] for line in (DATA_DIR / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()}
    # the facts asked are the training text's: every town's description is in pretrain.jsonl as written
    assert all(town_text(t, lang) in trained for t in towns for lang in ("en", "zh")), "towns differ from pretrain"
    rng = random.Random(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    heldout = heldout_docs(rng, towns, trained, args.heldout_docs)
    (args.out / "heldout.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in heldout),
                                           encoding="utf-8")
    mc = mc_items(rng, towns, args.mc_items)
    check_split(mc)
    (args.out / "sample_mc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mc),
                                             encoding="utf-8")
    (args.out / "heldout.yaml").write_text(HELDOUT_YAML, encoding="utf-8")
    (args.out / "sample_mc.yaml").write_text(MC_YAML, encoding="utf-8")
    for name in ("heldout.jsonl", "sample_mc.jsonl"):
        print(f"{args.out / name}: {sum(1 for _ in open(args.out / name, encoding='utf-8'))} rows")


if __name__ == "__main__":
    main()

"""Generate the bundled sample corpora: `python -m minillm.data.sample_data` rewrites minillm/data/*.jsonl.

Everything here is original to minillm: a made-up world (towns, people, prices, recipes) described
by templates in English and Chinese, arithmetic, counting, and a few hand-written paragraphs. The
facts are consistent between the two files (the SFT answers about a town repeat what the
pretraining text says), so a tiny model has something learnable in a few CPU minutes.

- `pretrain.jsonl`: the seq-monkey format, one `{"text": ...}` per line.
- `sft.jsonl`: the BelleGroup format, `{"id": ..., "conversations": [{"from": "human"|"assistant",
  "value": ...}, ...]}`; a few records open with a `system` turn.

The output is deterministic (fixed seed), so regenerating gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from minillm.data import DATA_DIR


SYLLABLES = ["lor", "van", "mi", "ra", "tel", "os", "ka", "ren", "dus", "po", "li", "ne", "sa", "tor", "bel", "un", "ga", "hi"]
ZH_CHARS = "青石安平河云山桥川宁泉林湖溪松梅兰竹北南东西新长清明"
ZH_SUFFIX = ["镇", "城", "村", "港"]
REGIONS = [("north", "北部"), ("south", "南部"), ("east", "东部"), ("west", "西部"), ("mountains", "山区"), ("coast", "沿海")]
SIZES = [("small", "小"), ("quiet", "安静的"), ("busy", "繁忙的"), ("large", "大")]
PRODUCTS = [("tea", "茶叶"), ("paper", "纸张"), ("glass", "玻璃"), ("rice", "大米"), ("silk", "丝绸"), ("apples", "苹果"),
            ("salt", "盐"), ("honey", "蜂蜜"), ("boats", "木船"), ("bells", "铜铃")]
FEATURES = [("old stone bridge", "古老的石桥"), ("night market", "夜市"), ("clock tower", "钟楼"), ("hot springs", "温泉"),
            ("long river", "长河"), ("library", "图书馆"), ("windmills", "风车"), ("lantern festival", "灯会")]
NAMES = [("Ada", "阿达"), ("Bo", "博"), ("Cai", "才"), ("Dana", "丹娜"), ("Eli", "伊莱"), ("Fang", "芳"), ("Gus", "古斯"),
         ("Hui", "慧"), ("Ivo", "伊沃"), ("Jia", "佳"), ("Kim", "金"), ("Lin", "琳"), ("Mo", "墨"), ("Nia", "妮娅")]
ITEMS = [("bread", "面包", 3), ("a book", "一本书", 12), ("tea", "茶叶", 8), ("a lamp", "一盏灯", 20), ("apples", "苹果", 5),
         ("a kite", "一只风筝", 9), ("rice", "大米", 6), ("a cup", "一个杯子", 4)]
WEATHER = [("sunny", "晴"), ("cloudy", "多云"), ("rainy", "有雨"), ("windy", "有风"), ("snowy", "有雪"), ("foggy", "有雾")]
DAYS = [("Monday", "星期一"), ("Tuesday", "星期二"), ("Wednesday", "星期三"), ("Thursday", "星期四"), ("Friday", "星期五"),
        ("Saturday", "星期六"), ("Sunday", "星期日")]
ZH_DIGITS = "零一二三四五六七八九"
WORDS = [("water", "水"), ("fire", "火"), ("tree", "树"), ("moon", "月亮"), ("sun", "太阳"), ("book", "书"), ("river", "河"),
         ("mountain", "山"), ("friend", "朋友"), ("school", "学校"), ("rain", "雨"), ("flower", "花"), ("bird", "鸟"),
         ("cat", "猫"), ("dog", "狗"), ("fish", "鱼"), ("bread", "面包"), ("tea", "茶"), ("city", "城市"), ("road", "路")]
DISHES = [("tomato egg soup", "番茄蛋汤", ["tomatoes", "eggs", "salt", "water"], ["番茄", "鸡蛋", "盐", "水"]),
          ("fried rice", "炒饭", ["rice", "eggs", "onion", "oil"], ["米饭", "鸡蛋", "葱", "油"]),
          ("honey tea", "蜂蜜茶", ["tea", "honey", "hot water"], ["茶叶", "蜂蜜", "热水"]),
          ("apple cake", "苹果蛋糕", ["apples", "flour", "sugar", "butter"], ["苹果", "面粉", "糖", "黄油"])]

# Hand-written paragraphs (original), repeated a few times in the corpus so they can be memorised.
PARAGRAPHS = [
    "A language model reads text one token at a time and learns to guess the next token. At first its guesses are "
    "random, and the loss is high. After many small steps of gradient descent the guesses get better, and the loss "
    "goes down. Nothing magic happens: the model only becomes good at continuing text that looks like its training data.",
    "语言模型每次读入一个词元,并学习预测下一个词元。一开始它的猜测几乎是随机的,损失很高。经过许多次小步的梯度下降之后,"
    "猜测越来越准,损失也随之下降。这里没有魔法:模型只是越来越擅长续写与训练数据相似的文本。",
    "A tokenizer turns text into numbers. A byte-level tokenizer starts from the 256 possible bytes, so it can encode "
    "any text, and then merges the most frequent pairs into larger pieces. Common words become single tokens; rare "
    "words are spelled out in several pieces.",
    "分词器把文本变成数字。字节级分词器从二百五十六个可能的字节出发,所以任何文本都能编码;然后它把最常见的相邻片段合并成更大的词元。"
    "常见的词会变成一个词元,少见的词则被拆成几个片段。",
    "When we fine-tune a chat model, we only want it to learn the answers. The questions are part of the input, but "
    "their labels are set to -100 so that the loss ignores them. The end-of-turn token after each answer is kept, "
    "because the model must learn when to stop talking.",
    "在对话模型的监督微调中,我们只希望模型学习回答。问题是输入的一部分,但它们的标签被设为负一百,因此损失会忽略它们。"
    "每个回答后面的轮次结束标记要保留,因为模型必须学会什么时候停下来。",
    "The river town wakes up early. Boats leave before sunrise, the bakers light their ovens, and the first bells ring "
    "from the clock tower. By noon the market is full of voices, and by evening the lanterns are lit along the water.",
    "河边的小镇醒得很早。天还没亮,船就出发了,面包师点起炉火,钟楼传来第一声钟响。到了中午,集市上满是说话声;到了傍晚,水边的灯笼一盏盏亮起来。",
    "Practice makes progress. A student who solves one small problem every day will, after a year, have solved three "
    "hundred and sixty-five problems. Small steps, repeated, become a long road.",
    "熟能生巧。一个学生如果每天解决一个小问题,一年之后就解决了三百六十五个问题。小小的步子,不断重复,就成了一条长长的路。",
    "To train on many machines, we split the work. Each machine computes gradients on its own slice of the batch, and "
    "then the machines average their gradients so that every copy of the model takes the same step.",
    "在多台机器上训练时,我们把工作分开。每台机器在自己那一份数据上计算梯度,然后所有机器把梯度取平均,这样每个模型副本都迈出相同的一步。",
]

QA_HANDWRITTEN = [
    ("What does a tokenizer do?", "A tokenizer turns text into a list of numbers, called tokens, and can turn the numbers back into text."),
    ("分词器是做什么的?", "分词器把文本变成一串数字,也就是词元,也可以把这些数字还原成文本。"),
    ("Why do we mask the questions during fine-tuning?", "Because we only want the model to learn the answers. The labels of the question tokens are -100, so the loss ignores them."),
    ("为什么微调时要遮住问题部分?", "因为我们只希望模型学习回答。问题部分的标签是负一百,损失函数会忽略它们。"),
    ("What is gradient descent?", "Gradient descent changes the weights of a model a little bit in the direction that lowers the loss, again and again."),
    ("什么是梯度下降?", "梯度下降就是一次又一次地把模型的权重朝着让损失变小的方向调整一点点。"),
    ("Say hello in Chinese.", "你好!"),
    ("用英语打个招呼。", "Hello!"),
    ("Who are you?", "I am a tiny language model trained with minillm. I know a little about a few made-up towns and some arithmetic."),
    ("你是谁?", "我是用 minillm 训练的一个很小的语言模型。我知道一些虚构小镇的事情,也会一点算术。"),
    ("Give me one tip for learning.", "Practice a little every day. Small steps, repeated, become a long road."),
    ("给我一个学习的建议。", "每天练习一点点。小小的步子,不断重复,就成了一条长长的路。"),
]


@dataclass
class Town:
    en: str
    zh: str
    region: tuple[str, str]
    size: tuple[str, str]
    product: tuple[str, str]
    feature: tuple[str, str]
    people: int  # thousands


def make_towns(rng: random.Random, n: int) -> list[Town]:
    towns, seen_en, seen_zh = [], set(), set()
    while len(towns) < n:
        en = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        zh = "".join(rng.sample(ZH_CHARS, 2)) + rng.choice(ZH_SUFFIX)
        if en in seen_en or zh in seen_zh:
            continue
        seen_en.add(en), seen_zh.add(zh)
        towns.append(Town(en, zh, rng.choice(REGIONS), rng.choice(SIZES), rng.choice(PRODUCTS), rng.choice(FEATURES),
                          rng.randint(2, 90)))
    return towns


def zh_number(n: int) -> str:
    """0..9999 in Chinese numerals (enough for the arithmetic templates)."""
    if n < 10:
        return ZH_DIGITS[n]
    out, units = "", [(1000, "千"), (100, "百"), (10, "十")]
    rest, zero = n, False
    for value, unit in units:
        d, rest = divmod(rest, value)
        if d:
            if zero:
                out += "零"
                zero = False
            out += ("" if (value == 10 and d == 1 and not out) else ZH_DIGITS[d]) + unit
        elif out:
            zero = True
    if rest:
        out += ("零" if zero else "") + ZH_DIGITS[rest]
    return out


def town_text(t: Town, lang: str) -> str:
    if lang == "en":
        return (f"{t.en} is a {t.size[0]} town in the {t.region[0]}. It is known for its {t.product[0]} and its "
                f"{t.feature[0]}. About {t.people} thousand people live in {t.en}.")
    return f"{t.zh}是{t.region[1]}的一座{t.size[1]}小城,以{t.product[1]}和{t.feature[1]}闻名。大约有{t.people}千人住在{t.zh}。"


def story(rng: random.Random, towns: list[Town]) -> str:
    (name, name_zh), t = rng.choice(NAMES), rng.choice(towns)
    (item, item_zh, price), n = rng.choice(ITEMS), rng.randint(1, 4)
    (w, w_zh), (day, day_zh) = rng.choice(WEATHER), rng.choice(DAYS)
    if rng.random() < 0.5:
        return (f"On {day} it was {w} in {t.en}. {name} walked to the market and bought {item}. It cost {price} coins, "
                f"so {n} of them cost {price * n} coins. Then {name} went home past the {t.feature[0]}.")
    return (f"{day_zh},{t.zh}天气{w_zh}。{name_zh}走到集市,买了{item_zh}。每份{price}个铜币,{n}份一共{price * n}个铜币。"
            f"然后{name_zh}经过{t.feature[1]}回家了。")


def arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        if op == "-" and b > a:
            a, b = b, a
        c = a + b if op == "+" else a - b if op == "-" else a * b
        if rng.random() < 0.5:
            lines.append(f"{a} {op} {b} = {c}.")
        else:
            word = {"+": "加", "-": "减", "*": "乘以"}[op]
            lines.append(f"{zh_number(a)}{word}{zh_number(b)}等于{zh_number(c)}。")
    return " ".join(lines)


def counting(rng: random.Random) -> str:
    start, k = rng.randint(1, 50), rng.randint(5, 12)
    if rng.random() < 0.5:
        return "Counting: " + ", ".join(str(i) for i in range(start, start + k)) + "."
    return "数数:" + "、".join(zh_number(i) for i in range(start, start + k)) + "。"


def weekdays(rng: random.Random) -> str:
    i = rng.randrange(7)
    seq = [DAYS[(i + j) % 7] for j in range(7)]
    if rng.random() < 0.5:
        return "After " + seq[0][0] + " comes " + ", then ".join(d[0] for d in seq[1:]) + "."
    return seq[0][1] + "之后是" + ",然后是".join(d[1] for d in seq[1:]) + "。"


def recipe(rng: random.Random) -> str:
    en, zh, ing, ing_zh = rng.choice(DISHES)
    if rng.random() < 0.5:
        return (f"How to make {en}: you need {', '.join(ing[:-1])} and {ing[-1]}. First prepare the {ing[0]}. "
                f"Then add the {ing[1]}. Cook it for {rng.randint(5, 30)} minutes and serve it warm.")
    return f"{zh}的做法:需要{'、'.join(ing_zh)}。先准备好{ing_zh[0]},再加入{ing_zh[1]},煮{rng.randint(5, 30)}分钟,趁热吃。"


def dictionary(rng: random.Random) -> str:
    pairs = rng.sample(WORDS, 4)
    if rng.random() < 0.5:
        return " ".join(f"The Chinese word for {e} is {z}." for e, z in pairs)
    return "".join(f"“{z}”的英文是 {e}。" for e, z in pairs)


def pretrain_docs(rng: random.Random, towns: list[Town], n_docs: int) -> list[str]:
    makers = [story, arithmetic, counting, weekdays, recipe, dictionary]
    docs = []
    for t in towns:  # every town described in both languages, a few times
        for _ in range(3):
            docs.append(town_text(t, "en"))
            docs.append(town_text(t, "zh"))
    for p in PARAGRAPHS:
        docs.extend([p] * 5)
    while len(docs) < n_docs:
        maker = rng.choice(makers)
        k = rng.randint(1, 4)  # documents of varied length: 1..4 pieces
        docs.append(" ".join(maker(rng, towns) if maker is story else maker(rng) for _ in range(k)))
    rng.shuffle(docs)
    return docs


def sft_turn_pairs(rng: random.Random, towns: list[Town]) -> list[tuple[str, str]]:
    """One (question, answer) pair drawn from the templates."""
    kind = rng.randrange(6)
    if kind == 0:
        t = rng.choice(towns)
        return [(f"Tell me about {t.en}.", town_text(t, "en"))] if rng.random() < 0.5 else [(f"介绍一下{t.zh}。", town_text(t, "zh"))]
    if kind == 1:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if rng.random() < 0.5:
            pairs = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")]
            c = rng.randint(2, 9)
            pairs.append((f"And {a + b} times {c}?", f"{a + b} times {c} is {(a + b) * c}."))
            return pairs
        return [(f"{zh_number(a)}加{zh_number(b)}等于多少?", f"{zh_number(a)}加{zh_number(b)}等于{zh_number(a + b)}。")]
    if kind == 2:
        e, z = rng.choice(WORDS)
        return [(f"How do you say \"{e}\" in Chinese?", f"\"{e}\" in Chinese is \"{z}\".")] if rng.random() < 0.5 else \
            [(f"“{z}”用英语怎么说?", f"“{z}”的英文是 {e}。")]
    if kind == 3:
        t = rng.choice(towns)
        if rng.random() < 0.5:
            return [(f"What is {t.en} known for?", f"{t.en} is known for its {t.product[0]} and its {t.feature[0]}."),
                    ("How many people live there?", f"About {t.people} thousand people live in {t.en}.")]
        return [(f"{t.zh}以什么闻名?", f"{t.zh}以{t.product[1]}和{t.feature[1]}闻名。"), ("那里住着多少人?", f"大约有{t.people}千人住在{t.zh}。")]
    if kind == 4:
        en, zh, ing, ing_zh = rng.choice(DISHES)
        return [(f"What do I need to make {en}?", f"You need {', '.join(ing[:-1])} and {ing[-1]}.")] if rng.random() < 0.5 else \
            [(f"做{zh}需要什么?", f"需要{'、'.join(ing_zh)}。")]
    return [rng.choice(QA_HANDWRITTEN)]


def sft_records(rng: random.Random, towns: list[Town], n: int) -> list[dict]:
    records = []
    for i in range(n):
        pairs = sft_turn_pairs(rng, towns)
        if rng.random() < 0.3:  # some multi-turn conversations
            pairs += sft_turn_pairs(rng, towns)
        conv = []
        if rng.random() < 0.05:
            conv.append({"from": "system", "value": "You are a friendly assistant who answers briefly."})
        for q, a in pairs:
            conv += [{"from": "human", "value": q}, {"from": "assistant", "value": a}]
        records.append({"id": str(i), "conversations": conv})
    return records


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DATA_DIR)
    ap.add_argument("--pretrain-docs", type=int, default=8000)
    ap.add_argument("--sft-records", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    towns = make_towns(rng, 60)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "pretrain.jsonl", "w", encoding="utf-8") as f:
        for doc in pretrain_docs(rng, towns, args.pretrain_docs):
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    with open(args.out / "sft.jsonl", "w", encoding="utf-8") as f:
        for rec in sft_records(rng, towns, args.sft_records):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    for name in ("pretrain.jsonl", "sft.jsonl"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

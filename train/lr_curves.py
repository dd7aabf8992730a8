"""The measured curves behind train/args.py's DEFAULT_LR: loss vs step for several learning rates per mode.

    python train/lr_curves.py [--out train/lr_curves.json]      (~5-10 min on 2 CPU cores)

One process, fp32, the demo's setup without the launcher (tiny preset, bundled data, batch 16 = the demo's 8 per
rank x 2 ranks, AdamW, 10 warm-up steps then cosine, gradient clipping 1.0): pretraining from scratch for 200
steps at each rate; then, from the 3e-3 pretrained weights, 300 SFT steps of full fine-tuning and of LoRA
(r=32, alpha 64, all-linear) at each rate. Each curve is stored with the greedy replies' score on the data's six
most frequent questions (train/demo.py's QUESTIONS).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from minillm.config import ModelConfig, PRESETS
from minillm.generation import generate
from minillm.infra import corpus
from minillm.model import CausalLM
from minillm.peft.lora import LoraConfig, apply_lora, merge_and_unload
from minillm.sft import DEFAULT_SYSTEM_PROMPT, chatml_prompt_ids, mask_batch
from train.args import DEFAULT_LR
from train.demo import QUESTIONS, taught_answers

ROOT = Path(__file__).resolve().parent.parent

RATES = {"scratch": [5e-5, 1e-3, 3e-3], "full": [5e-5, 1e-3, 3e-3], "lora": [5e-5, 2e-3, 5e-3, 2e-2]}


def lr_at(step: int, total: int, peak: float, warm: int = 10) -> float:
    """The Trainer's cosine schedule with linear warm-up."""
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train(model, batches, steps: int, peak: float, weight_decay: float) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=weight_decay)
    losses = []
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, steps, peak)
        x, y, m = next(batches)
        loss = model(x, attention_mask=m, labels=y).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))
    return losses


def pretrain_batches(tok, rng: random.Random, bs: int, block: int = 128):
    ids = np.concatenate([np.append(tok(t)["input_ids"], tok.eos_token_id) for t in corpus.iter_pretrain_texts()])
    n = len(ids) // block
    blocks = torch.from_numpy(ids[:n * block].astype(np.int64)).view(n, block)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - bs + 1, bs):
            b = blocks[order[i:i + bs]]
            yield b, b, None


def sft_batches(tok, rng: random.Random, bs: int):
    out = mask_batch(list(corpus.iter_sft_conversations()), tok, 256)
    samples = list(zip(out["input_ids"], out["labels"]))
    pad = tok.pad_token_id
    while True:
        rng.shuffle(samples)
        for i in range(0, len(samples) - bs + 1, bs):
            chunk = samples[i:i + bs]
            n = max(len(x) for x, _ in chunk)
            yield (torch.tensor([x + [pad] * (n - len(x)) for x, _ in chunk]),
                   torch.tensor([y + [-100] * (n - len(y)) for _, y in chunk]),
                   torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in chunk]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "train" / "lr_curves.json"))
    ap.add_argument("--pretrain_steps", type=int, default=200)
    ap.add_argument("--sft_steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(str(corpus.TOKENIZER_DIR))
    answers = taught_answers(ROOT / "minillm" / "data" / "sft.jsonl", QUESTIONS)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def score(model) -> int:
        model.eval()
        right = 0
        with torch.no_grad():
            for q, taught in answers.items():
                ids = torch.tensor([chatml_prompt_ids(tok, [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                                            {"role": "user", "content": q}])])
                new = generate(model, ids, max_new_tokens=64, eos_token_id=[im_end, tok.eos_token_id])[0, ids.shape[1]:]
                new = new.tolist()
                right += im_end in new and tok.decode(new[:new.index(im_end)]).strip() == taught
        return right

    cfg = ModelConfig.from_hf({**PRESETS["tiny"].to_hf(), "eos_token_id": tok.eos_token_id,
                               "pad_token_id": tok.pad_token_id})
    result = {"setup": __doc__.split("\n\n")[2].replace("\n", " "), "curves": []}
    base = None
    for lr in RATES["scratch"]:
        torch.manual_seed(args.seed)
        model = CausalLM(cfg)
        losses = train(model, pretrain_batches(tok, random.Random(args.seed), 16), args.pretrain_steps, lr, 0.01)
        result["curves"].append({"mode": "scratch", "lr": lr, "loss": losses})
        print(f"scratch lr {lr:g}: {losses[0]:.2f} -> {np.mean(losses[-10:]):.2f}", flush=True)
        if lr == 3e-3:
            base = copy.deepcopy(model.state_dict())
    for mode in ("full", "lora"):
        for lr in RATES[mode]:
            model = CausalLM(cfg)
            model.load_state_dict(base)
            if mode == "lora":
                torch.manual_seed(args.seed)
                apply_lora(model, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear"), verbose=False)
            losses = train(model, sft_batches(tok, random.Random(args.seed), 16), args.sft_steps, lr, 0.0)
            right = score(merge_and_unload(model) if mode == "lora" else model)
            result["curves"].append({"mode": mode, "lr": lr, "loss": losses, "answered": f"{right}/{len(answers)}"})
            print(f"{mode} lr {lr:g}: {losses[0]:.2f} -> {np.mean(losses[-10:]):.2f}, answered {right}/{len(answers)}",
                  flush=True)
    Path(args.out).write_text(json.dumps(result) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and its plot")
    return 0


def plot(result: dict, path: Path) -> None:
    """One panel per mode: each learning rate's loss (9-step moving average), the chosen default drawn thick."""
    # imported here, as in train/plots.py: the Agg backend must be chosen before pyplot is imported
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"scratch": "pretraining from scratch", "full": "full SFT", "lora": "LoRA SFT (r=32, all-linear)"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, mode in zip(axes, titles):
        for c in (c for c in result["curves"] if c["mode"] == mode):
            loss = np.convolve(c["loss"], np.ones(9) / 9, mode="valid")
            chosen = c["lr"] == DEFAULT_LR[mode][0]
            label = f"lr {c['lr']:g}" + (f", {c['answered']} answered" if "answered" in c else "") + \
                (" (default)" if chosen else "")
            ax.plot(range(9, 9 + len(loss)), loss, lw=2.5 if chosen else 1, label=label)
        ax.set_title(titles[mode])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (9-step mean)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    sys.exit(main())

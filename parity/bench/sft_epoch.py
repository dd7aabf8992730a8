"""The SFT-epoch case: one epoch of SFT on a long-tailed chat mix, same tiny model and data, four pipelines.

The mix: every (user, assistant) turn pair of the bundled SFT data, stitched into chats of k pairs, k = 1 +
floor(Exp(mean 2)) capped at 12 (most chats short, a few long), masked by minillm.sft at max_len 512 (the
training scripts' default). On it, with the HF Trainer, AdamW, the same initial weights and data order seed:

- course:  transformers' model, every sample padded to max_len (the course's pipeline; its labels bugs fixed,
           so the losses compare),
- dynpad:  transformers' model, DataCollatorForSeq2Seq (padding to the batch's longest), 8 conversations a step,
- packed:  minillm's CausalLM on packed rows (minillm.pack, 1 row of max_len a step, ~7 conversations), packing
           and data order seeds 0 and 1,
- hf packed: transformers' model on the same packed rows (use_cache=False), for what packing alone gives,
- unpacked: the loss reference: minillm's CausalLM, padding to the batch's longest (SFTCollator), each step a
           random group of conversations of the size of a packed row's (same number of steps, same conversations
           per step; only which conversations share a step differs), seeds 0 and 1.
The spread between seeds is the noise the final losses are judged against.

Figures: wall time of trainer.train(), learned tokens (labels that are trained on, the same set for all) per
second, and the final loss on 200 held-out chats of the same mix (sum of CE / learned tokens, exact path).
`same_output`: on the initial weights the packed rows' loss equals the padded loss over the same chats, both
models (relative 1e-6). Runs in this process one pipeline after another: on a shared CPU the order and the
load matter; the load average is in bench.json.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time

import torch

MAX_LEN = 512
PAD_BATCH = 8  # conversations per step, padded pipelines (the "batch 8")
PACK_BATCH = 1  # rows per step, packed (about as many conversations per step as PAD_BATCH)


def chat_mix(n: int, seed: int = 0, max_pairs: int = 12, mean_pairs: float = 2.0) -> list[list[dict]]:
    """n chats stitched from the bundled turn pairs: 1 + floor(Exp(mean_pairs)) pairs, at most max_pairs."""
    from minillm.corpus import SAMPLE_SFT, iter_sft_conversations

    pairs = []
    for conv in iter_sft_conversations(SAMPLE_SFT):
        turns = [t for t in conv if t.get("from", t.get("role")) != "system"]
        pairs += [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        k = min(max_pairs, 1 + int(rng.expovariate(1 / mean_pairs)))
        chats.append([t for p in rng.sample(pairs, k) for t in p])
    return chats


def masked(chats: list, tokenizer) -> list[dict]:
    from minillm.sft import mask_batch

    out = mask_batch(chats, tokenizer, MAX_LEN)
    return [{"input_ids": i, "labels": l} for i, l in zip(out["input_ids"], out["labels"])]


def learned(samples: list[dict]) -> int:
    return sum(sum(x != -100 for x in s["labels"][1:]) for s in samples)


@torch.no_grad()
def eval_loss(model, samples: list[dict], pad: int, packed: bool = False) -> float:
    """Sum of CE over learned tokens / their number, padded batches of 32 (or packed rows), eval mode."""
    from minillm.pack import PackedCollator, PackedDataset
    from minillm.sft import SFTCollator

    model.eval()
    if packed:
        ds = PackedDataset(samples, MAX_LEN, buffer=len(samples))
        batches = [PackedCollator(pad)([ds[j] for j in range(i, min(i + 8, len(ds)))]) for i in range(0, len(ds), 8)]
    else:
        batches = [SFTCollator(pad)(samples[i:i + 32]) for i in range(0, len(samples), 32)]
    total = sum(model(**b, num_items_in_batch=1).loss.item() for b in batches)
    model.train()
    return total / learned(samples)


class RandomGroups(torch.utils.data.Dataset):
    """Random groups of samples with the sizes of `rows` (the packed rows'): item i is a list of samples."""

    def __init__(self, samples: list[dict], rows: list[list[int]], seed: int):
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)
        cuts = [0]
        for r in rows:
            cuts.append(cuts[-1] + len(r))
        self.groups = [[samples[j] for j in order[a:b]] for a, b in zip(cuts, cuts[1:])]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> list[dict]:
        return self.groups[i]


class GroupCollator:
    def __init__(self, collator):
        self.collator = collator

    def __call__(self, groups: list[list[dict]]) -> dict:
        return self.collator([s for g in groups for s in g])


def _train(model, dataset, collator, batch: int, seed: int, out: str) -> float:
    import transformers

    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=2e-3, warmup_steps=0,
        optim="adamw_torch", use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=seed, data_seed=seed)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def sft_epoch_case(quick: bool, threads: int) -> dict:
    import transformers
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    from minillm import CausalLM, ModelConfig
    from minillm.corpus import TOKENIZER_DIR
    from minillm.pack import PackedCollator, PackedDataset
    from minillm.sft import SFTCollator
    from parity.model import hf_copy

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    pad = tok.pad_token_id
    n_train, n_eval = (48, 32) if quick else (2000, 200)
    chats = chat_mix(n_train + n_eval)
    train, held_out = masked(chats[:n_train], tok), masked(chats[n_train:], tok)
    lengths = [len(s["input_ids"]) for s in train]
    n_learned = learned(train)

    torch.manual_seed(0)
    init = CausalLM(ModelConfig.preset("tiny")).state_dict()

    def minillm_model():
        m = CausalLM(ModelConfig.preset("tiny"))
        m.load_state_dict(init)
        return m

    def hf_model():
        m = hf_copy(minillm_model())
        m.config.use_cache = False  # packed rows are detected only without a cache
        return m

    # the check: packed rows give the padded loss on the initial weights (both models)
    same = {}
    for side, make in (("minillm", minillm_model), ("hf", hf_model)):
        a, b = eval_loss(make(), held_out, pad), eval_loss(make(), held_out, pad, packed=True)
        same[side] = abs(a - b) / a
    packed_ds = PackedDataset(train, MAX_LEN, buffer=1000, seed=0)
    eff_by_buffer = {}
    for buf in (16, 64, 256, 1000, len(train)):
        eff_by_buffer[str(buf)] = PackedDataset(train, MAX_LEN, buffer=buf, lengths=lengths).efficiency()
        eff_by_buffer[f"{buf} decreasing"] = PackedDataset(train, MAX_LEN, buf, lengths=lengths,
                                                           decreasing=True).efficiency()

    runs = {
        "course": (hf_model, train, SFTCollator(pad, pad_to_multiple_of=MAX_LEN), PAD_BATCH, 0),
        "dynpad": (hf_model, train, DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100,
                                                           return_tensors="pt"), PAD_BATCH, 0),
        "packed": (minillm_model, packed_ds, PackedCollator(pad), PACK_BATCH, 0),
        "hf_packed": (hf_model, packed_ds, PackedCollator(pad), PACK_BATCH, 0),
    }
    runs["packed_seed1"] = (minillm_model, PackedDataset(train, MAX_LEN, buffer=1000, seed=1), PackedCollator(pad),
                            PACK_BATCH, 1)
    for seed in (0, 1):
        runs[f"unpacked_seed{seed}"] = (minillm_model, RandomGroups(train, packed_ds.rows, seed),
                                        GroupCollator(SFTCollator(pad)), 1, seed)
    result = {}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="minillm-sft-epoch-") as tmp:
        for name, (make, ds, collator, batch, seed) in runs.items():
            model = make()
            seconds = _train(model, ds, collator, batch, seed, tmp)
            result[name] = {"seconds": seconds, "learned_tokens_s": n_learned / seconds,
                            "eval_loss": eval_loss(model, held_out, pad)}
            print(f"  sft_epoch {name}: {seconds:.1f}s, {n_learned / seconds:,.0f} learned tokens/s, "
                  f"held-out loss {result[name]['eval_loss']:.4f}", flush=True)
    padded_tokens = {"course": len(train) * MAX_LEN, "packed": len(packed_ds) * MAX_LEN}
    return {"conversations": len(train), "learned_tokens": n_learned, "real_tokens": sum(lengths),
            "max_len": MAX_LEN, "rows": len(packed_ds), "packing_efficiency": packed_ds.efficiency(),
            "efficiency_by_buffer": eff_by_buffer, "tokens_computed": padded_tokens,
            "mean_len": sum(lengths) / len(lengths), "max_sample_len": max(lengths),
            "batch": {"padded": PAD_BATCH, "packed_rows": PACK_BATCH}, "runs": result,
            "loss_noise": max(abs(result[f"{k}_seed1"]["eval_loss"] - result[k if k == "packed" else f"{k}_seed0"]
                                  ["eval_loss"]) for k in ("packed", "unpacked")),
            "packed_vs_padded_initial_loss_rel": same, "loadavg": [load_start, os.getloadavg()], "same_output": all(v <= 1e-6 for v in same.values())}


if __name__ == "__main__":  # python -m parity.bench.sft_epoch [--quick]; the package sets OMP_WAIT_POLICY first
    import sys

    print(json.dumps(sft_epoch_case("--quick" in sys.argv, 2), indent=1, default=float))

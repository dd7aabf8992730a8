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

Each pipeline runs the steps the HF Trainer would (without accumulation), in a plain loop (`Run`), and the
pipelines' epochs are cut into ROUNDS slices that alternate (A B C ..., then ... C B A), so that load from other
jobs on a shared CPU falls on all of them alike (one after the other, the same pipeline measured 54 s and 21 s).
The Trainer path itself is checked in tests/test_pack.py.
Figures: summed wall time of each pipeline's slices, learned tokens (labels that are trained on, the same set for all) per
second, and the final loss on 200 held-out chats of the same mix (sum of CE / learned tokens, exact path).
`same_output`: on the initial weights the packed rows' loss equals the padded loss over the same chats, both
models (relative 1e-6). The load average is in bench.json.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time

import torch

MAX_LEN = 512
PAD_BATCH = 8  # conversations per step, padded pipelines (the "batch 8")
PACK_BATCH = 1  # rows per step, packed (about as many conversations per step as PAD_BATCH)
ROUNDS = 20  # each pipeline's epoch is cut into this many slices, run in alternation (ABBA order)


def chat_mix(n: int, seed: int = 0, max_pairs: int = 12, mean_pairs: float = 2.0) -> list[list[dict]]:
    """n chats stitched from the bundled turn pairs: 1 + floor(Exp(mean_pairs)) pairs, at most max_pairs."""
    from minillm.infra.corpus import SAMPLE_SFT, iter_sft_conversations

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


class Run:
    """One pipeline's epoch: its model, AdamW (lr 2e-3, linear decay to 0 over its steps, as the Trainer's
    defaults) and its steps (each a list of items for the collator), taken a slice at a time so that the pipelines'
    slices can alternate on a shared CPU. A step is what the Trainer does without accumulation: collate, forward,
    the loss (mean over the batch's learned tokens), backward, optimizer and scheduler step."""

    def __init__(self, model, steps: list[list], collator):
        self.model, self.steps, self.collator = model.train(), steps, collator
        self.opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        n = len(steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: max(0.0, (n - i) / n))
        self.done, self.seconds = 0, 0.0

    def run(self, until: int) -> None:
        t0 = time.perf_counter()
        for items in self.steps[self.done:until]:
            loss = self.model(**self.collator(items)).loss
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
        self.done = max(self.done, until)
        self.seconds += time.perf_counter() - t0


def _steps(items: list, per_step: int, seed: int) -> list[list]:
    """The items in a seeded random order, `per_step` a step (the last step may be short)."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [[items[j] for j in order[i:i + per_step]] for i in range(0, len(order), per_step)]


def sft_epoch_case(quick: bool, threads: int) -> dict:
    import transformers
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    from minillm import CausalLM, ModelConfig
    from minillm.infra.corpus import TOKENIZER_DIR
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

    rows = [packed_ds[i] for i in range(len(packed_ds))]
    rows1 = PackedDataset(train, MAX_LEN, buffer=1000, seed=1)
    rows1 = [rows1[i] for i in range(len(rows1))]
    dynpad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")
    runs = {
        "course": Run(hf_model(), _steps(train, PAD_BATCH, 0), SFTCollator(pad, pad_to_multiple_of=MAX_LEN)),
        "dynpad": Run(hf_model(), _steps(train, PAD_BATCH, 0), dynpad),
        "packed": Run(minillm_model(), _steps(rows, PACK_BATCH, 0), PackedCollator(pad)),
        "hf_packed": Run(hf_model(), _steps(rows, PACK_BATCH, 0), PackedCollator(pad)),
        "packed_seed1": Run(minillm_model(), _steps(rows1, PACK_BATCH, 1), PackedCollator(pad)),
    }
    for seed in (0, 1):
        groups = RandomGroups(train, packed_ds.rows, seed)
        runs[f"unpacked_seed{seed}"] = Run(minillm_model(), _steps(groups.groups, 1, seed), GroupCollator(SFTCollator(pad)))
    load_start = os.getloadavg()
    rounds = 4 if quick else ROUNDS
    for k in range(1, rounds + 1):  # the pipelines' slices alternate, so load from other jobs falls on all alike
        for r in (runs.values() if k % 2 else reversed(runs.values())):
            r.run(len(r.steps) * k // rounds)
    result = {}
    for name, r in runs.items():
        result[name] = {"seconds": r.seconds, "steps": len(r.steps), "learned_tokens_s": n_learned / r.seconds,
                        "eval_loss": eval_loss(r.model, held_out, pad)}
        print(f"  sft_epoch {name}: {r.seconds:.1f}s, {len(r.steps)} steps, {n_learned / r.seconds:,.0f} learned "
              f"tokens/s, held-out loss {result[name]['eval_loss']:.4f}", flush=True)
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

"""`python -m parity.bench --only dpo`: one DPO training step, minillm.dpo against TRL 1.16's DPOTrainer, on the same
model weights and the same batch (issue 21 item 7: step time <= 1.0x TRL's, peak memory <= 0.6x).

Each side runs in a fresh child process (`python -m parity.bench.dpo --side minillm|reference`): build the policy and
its frozen reference (Llama, 4 layers, hidden 256, vocab 32,000), the batch (B pairs of prompt + chosen / rejected
random tokens, right-padded as TRL collates them), the Trainer's optimizer (`torch.optim.AdamW(fused=True)`, as
every step case of the bench); then warm-up + `reps` steps of
loss -> backward -> optimizer step. minillm's loss is `dpo.dpo_step` (fused chunked log-probs, never the
(tokens x vocab) logits); TRL's is `DPOTrainer.compute_loss` (its own fused LM head, bf16 off: fp32 on both sides).
Peak memory: VmHWM - VmRSS from just before the first step (parity/bench/measure.py), so it counts activations,
gradients and the AdamW state, the same on both sides except the activations. The two sides are run in turn,
`rounds` times: the medians and the spread (min-max over rounds) are reported; a shared CPU makes timings noisy.
The first step's losses must agree (same_output).

    python -m parity.bench.dpo [--quick] [--case dpo_v152k]     # one case alone, its table

Measured 2026-12-06 (2 shared cores, 2 threads, 3 rounds x 3 steps): `dpo` (vocab 32,000, 4 pairs x ~480 tokens;
load 3.1 -> 2.0, `python -m parity.bench --only dpo`, 554 s with the old dpo_v152k) step 3.22 s vs 7.34 s, ratio 0.44
(worst-best round pairs 0.45-0.30), peak 635 vs 2,549 MiB, 0.25 (0.25-0.24). `dpo_v152k` at 4 pairs x 128 + <= 398
tokens (4,096 tokens a policy forward; `python -m parity.bench.dpo --case dpo_v152k --rounds 3`, load 0.5 -> 3.3,
3.3-4.7 during the run from another job holding one core, 1,710 s): step 60.4 s vs 84.9 s, 0.71 (0.85-0.50), peak
2,557 vs 6,469 MiB, 0.40 (0.41-0.39). The gradients and AdamW moments of its 161M weights (97% embedding and lm_head)
are 1,845 MiB of both peaks; the rest is 711 vs 4,624 MiB (0.15). At the case's earlier size, 2 pairs of 64 + <= 192
tokens (~1,000 tokens), the peak ratio was 0.71 (2,022 vs 2,861 MiB, 0.70-0.71) because that fixed state dominated
both peaks (the rest was 177 vs 1,015 MiB, 0.17); its step ratio was 0.40 (0.87-0.30, 7.7 s vs 19.2 s, load 3.1 -> 2.0).
Same first loss on both sides in every round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# "full": the `dpo` case (Llama, vocab 32,000); "v152k": the `dpo_v152k` case, Qwen2-shaped at Qwen's vocabulary
# 151,936 (hidden 512, 2 layers, as parity/bench/train.py's train_v152k), 4 pairs of a 128-token prompt and
# completions of 398, 390, 382, 374 tokens (chosen; rejected 4 fewer, as _setup builds them): the concatenated policy
# forward holds 2*4*128 + 1,544 + 1,528 = 4,096 real tokens, train_v152k's 4 x 1,024 (padded: 8 rows x 526 = 4,208
# positions). 4 pairs and prompt 128 with completion 384 would give 3,984; completion 398 is the one that gives
# exactly 4,096. TRL's (tokens x vocab) fp32 logits are ~2.4 GiB per forward there. An earlier size, 2 pairs of
# 64 + <= 192 tokens (~1,000 tokens), was dominated by the fixed gradients + AdamW state (see the docstring).
# Each has a toy "quick" counterpart (--quick).
SIZES = {"full": dict(vocab=32000, hidden=256, layers=4, heads=4, inter=688, pairs=4, prompt=64, completion=192),
         "quick": dict(vocab=4096, hidden=64, layers=2, heads=4, inter=176, pairs=2, prompt=16, completion=48),
         "v152k": dict(vocab=151936, hidden=512, layers=2, heads=8, kv_heads=2, inter=1408, pairs=4, prompt=128,
                       completion=398, model_type="qwen2"),
         "v152k_quick": dict(vocab=151936, hidden=32, layers=1, heads=2, kv_heads=1, inter=64, pairs=2, prompt=16,
                             completion=48, model_type="qwen2")}
CASE_SIZES = {"dpo": "full", "dpo_v152k": "v152k"}  # the bench's case name -> its size (quick: + "_quick")


def size_name(case: str, quick: bool) -> str:
    """The SIZES key a case runs at: "full" -> "quick", "v152k" -> "v152k_quick" under --quick."""
    name = CASE_SIZES[case]
    return ("quick" if name == "full" else f"{name}_quick") if quick else name


def _setup(size: dict, seed: int = 0):
    """(policy, reference, preference rows): the same on both sides (the hf model holds the minillm weights)."""
    import copy

    import torch

    from minillm.config import ModelConfig
    from minillm.model import CausalLM
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type=size.get("model_type", "llama"), vocab_size=size["vocab"], hidden_size=size["hidden"],
                      intermediate_size=size["inter"], num_hidden_layers=size["layers"],
                      num_attention_heads=size["heads"], num_key_value_heads=size.get("kv_heads", size["heads"]),
                      tie_word_embeddings=False)
    model = CausalLM(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    rand = lambda n: torch.randint(4, size["vocab"], (n,), generator=g).tolist()  # noqa: E731
    rows = []
    for i in range(size["pairs"]):  # lengths differ a little: padding as in real batches
        n = size["completion"] - 8 * i
        rows.append({"prompt_ids": rand(size["prompt"]), "chosen_ids": rand(n), "rejected_ids": rand(n - 4)})
    return model, copy.deepcopy(model).eval().requires_grad_(False), rows


def _side(side: str, size: dict, reps: int) -> dict:
    import torch

    from parity.bench.measure import memory_baseline, peak_since_baseline
    model, ref, rows = _setup(size)
    if side == "minillm":
        from minillm import dpo, preference
        batch = preference.collate(rows, pad_token_id=0)
        cfg = dpo.DPOConfig()
        loss_fn = lambda: dpo.dpo_step(cfg, model, batch, ref_model=ref)[0]  # noqa: E731
    else:
        import tempfile

        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        from minillm.infra.corpus import TOKENIZER_DIR
        from train.models import hf_model_from
        model, ref = hf_model_from(model).train(), hf_model_from(ref).eval()
        args = DPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                         per_device_train_batch_size=len(rows), max_length=None)
        tr = DPOTrainer(model=model, ref_model=ref, args=args, processing_class=AutoTokenizer.from_pretrained(
            str(TOKENIZER_DIR)), train_dataset=Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}]))
        batch = tr.data_collator(rows)
        loss_fn = lambda: tr.compute_loss(model, batch)  # noqa: E731
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=True)  # the Trainer's adamw_torch_fused
    base = memory_baseline()
    times, losses = [], []
    for i in range(1 + reps):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    # gradients + AdamW's two moments: fp32, 3 x the trainable weights, the same on both sides (at vocab 151,936 the
    # embedding and lm_head are 97% of them, so this fixed part dominates either side's peak)
    state_mb = 3 * sum(p.numel() * p.element_size() for p in trainable) / 2**20
    return {"step_s": statistics.median(times), "peak_mb": peak_since_baseline(base) / 2**20, "loss": losses[0],
            "grads_adam_mb": state_mb,
            "tokens": sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)}


def _child(side: str, size: str, threads: int, reps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "parity.bench.dpo", "--side", side, "--reps", str(reps), "--threads", str(threads),
           "--size", size]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{side} child failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dpo_case(quick: bool, threads: int, rounds: int = 3, reps: int = 3, case: str = "dpo") -> dict:
    """The `dpo` (or `dpo_v152k`) case: medians over rounds, each round one fresh child per side (in turn,
    alternating order). Returned shape (parity/bench/report.py reads it): {"size", "runs", "step_s", "peak_mb":
    {"minillm": median, "reference": median}, "step_s_spread", "peak_mb_spread": {side: (min, max)}, "rounds",
    "same_output"}."""
    size = size_name(case, quick)
    runs: dict[str, list[dict]] = {"minillm": [], "reference": []}
    rounds = 1 if quick else rounds
    for r in range(rounds):
        for side in (("minillm", "reference") if r % 2 == 0 else ("reference", "minillm")):
            runs[side].append(_child(side, size, threads, 1 if quick else reps))
    med = lambda side, k: statistics.median(x[k] for x in runs[side])  # noqa: E731
    spread = lambda side, k: (min(x[k] for x in runs[side]), max(x[k] for x in runs[side]))  # noqa: E731
    losses = [x["loss"] for side in runs for x in runs[side]]
    return {"size": SIZES[size], "runs": runs, "rounds": rounds,
            "step_s": {s: med(s, "step_s") for s in runs}, "peak_mb": {s: med(s, "peak_mb") for s in runs},
            "step_s_spread": {s: spread(s, "step_s") for s in runs}, "grads_adam_mb": runs["minillm"][0]["grads_adam_mb"],
            "peak_mb_spread": {s: spread(s, "peak_mb") for s in runs},
            "same_output": max(losses) - min(losses) <= 1e-5}


def format_case(c: dict) -> str:
    lines = ["| metric | minillm | TRL 1.16 | ratio | spread of the ratio (worst, best round pairs) | target |",
             "|---|---|---|---|---|---|"]
    for key, name, target in (("step_s", "step s", "<= 1.0"), ("peak_mb", "peak MiB", "<= 0.6")):
        a, b = c[key]["minillm"], c[key]["reference"]
        (a_lo, a_hi), (b_lo, b_hi) = c[f"{key}_spread"]["minillm"], c[f"{key}_spread"]["reference"]
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f} | {a_hi / b_lo:.2f}, {a_lo / b_hi:.2f} | {target} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.bench.dpo", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--side", choices=("minillm", "reference"))
    ap.add_argument("--case", choices=sorted(CASE_SIZES), default="dpo")
    ap.add_argument("--size", choices=sorted(SIZES), help=argparse.SUPPRESS)  # a child's size
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    if args.side:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(_side(args.side, SIZES[args.size or size_name(args.case, args.quick)], args.reps)))
        return 0
    c = dpo_case(args.quick, args.threads, args.rounds, args.reps, args.case)
    print(format_case(c))
    print(f"same first-step loss on both sides: {c['same_output']}; size {c['size']}")
    return 0 if c["same_output"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

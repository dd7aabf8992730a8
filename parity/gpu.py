"""`python -m parity.gpu` (`make gpu-check`): the low-precision checks where they are meant to run, on a GPU.

    python -m parity.gpu                        # CUDA: the three parts below, < 8 min on one GPU
    python -m parity.gpu --device cpu --tiny    # the same code at toy sizes on the CPU (seconds; what tests run)

On a machine without CUDA (and no --device) it says so and exits 0. Parts, each a table:
1. Model rows in bf16 on the device: the configs parity/model.py draws plus one Qwen3-0.6B-shaped case
   (2 layers, T=1024), transformers' SDPA and minillm's restricted to the flash and memory-efficient kernels
   (`torch.nn.attention.sdpa_kernel`; a case no such kernel runs falls back to the default and is counted in
   the note). minillm vs transformers in bf16, and each one's error against transformers in fp32:
   minillm's RMS error <= 1.5x transformers' (logits, loss, gradients).
2. parity/dtype.py's rows on the device (`gpu_rows`): the fused training loss over many chunks and at a real
   vocabulary (151,936, Qwen) over 16k tokens with Qwen2.5-0.5B's hidden size, bf16 and fp16, fp16's range,
   and the model in bf16/fp16 — each minillm vs transformers in the same dtype and as an error ratio vs fp32.
3. A bf16 train step (autocast over fp32 weights, as the Trainer's bf16=True), minillm vs transformers, same
   weights and batch: tokens/s, peak memory, and MFU = model FLOPs/s (parity/bench/train.py's formula) /
   the device's bf16 matmul rate measured in this run.

Every part stops early, with a SKIP row, when the time budget (--max-seconds, default 450) runs out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import replace

import torch
from hypothesis import strategies as st

from minillm import CausalLM, ModelConfig
from parity.harness import Row, format_table, property_rows

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_kernels(device: torch.device):
    """SDPA restricted to the flash and memory-efficient kernels (the GPU's fast paths; no math fallback)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return contextlib.nullcontext()  # CPU: the kernels transformers and minillm pick by default
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def _rms(x: torch.Tensor) -> float:
    return x.float().pow(2).mean().sqrt().item()


def error_ratio(ours: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> float:
    """RMS error of `ours` against the fp32 `exact` over that of `ref`: <= 1 means minillm is no less accurate.
    Both exact (0 / 0): 1. RMS rather than max: a max over a few bf16 roundings is one draw, not a property."""
    a, b = _rms(ours.float() - exact.float()), _rms(ref.float() - exact.float())
    if b == 0.0:
        return 1.0 if a == 0.0 else float("inf")
    return a / b


# ---------------------------------------------------------------------------------------------
# 1. Model rows in bf16
# ---------------------------------------------------------------------------------------------

class Fallbacks:
    """Counts the cases no flash/memory-efficient kernel could run (rerun with SDPA's default choice)."""
    n = 0


def _forward_backward(model, ids, mask, pos, labels, kernels) -> tuple[torch.Tensor, torch.Tensor, list]:
    with kernels:
        out = model(ids, attention_mask=mask, position_ids=pos, labels=labels)
        out.loss.backward()
    return out.logits.detach(), out.loss.detach(), [p.grad for _, p in sorted(model.named_parameters())]


def model_deltas(case: dict, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[float]:
    """[max |Δ logits| minillm vs transformers (both in dtype), error ratios of logits, loss, grads]."""
    from parity.model import batch, hf_copy, random_model

    ours32 = random_model(case["cfg"], case["seed"], fused=False)
    ref32, ref = hf_copy(ours32).to(device), hf_copy(ours32).to(device=device, dtype=dtype)
    ours = ours32.to(device=device, dtype=dtype)  # both rounded once from the same fp32 weights
    ids, mask, pos, labels = (None if t is None else t.to(device) for t in batch(case))
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    exact = _forward_backward(ref32, ids, mask, pos, labels, contextlib.nullcontext())
    try:
        a = _forward_backward(ours, ids, mask, pos, labels, attention_kernels(device))
        b = _forward_backward(ref, ids, mask, pos, labels, attention_kernels(device))
    except RuntimeError as e:  # "No available kernel": e.g. a head_dim or mask the fast kernels do not take
        if "kernel" not in str(e).lower():
            raise
        Fallbacks.n += 1
        for m in (ours, ref):
            m.zero_grad(set_to_none=True)
        a = _forward_backward(ours, ids, mask, pos, labels, contextlib.nullcontext())
        b = _forward_backward(ref, ids, mask, pos, labels, contextlib.nullcontext())
    d_logits = (a[0].float() - b[0].float())[keep].abs().max().item()
    grads = [torch.cat([g.flatten().float() for g in side[2] if g is not None]) for side in (a, b, exact)]
    return [d_logits, error_ratio(a[0][keep], b[0][keep], exact[0][keep]), error_ratio(a[1], b[1], exact[1]),
            error_ratio(*grads)]


def model_rows(device: torch.device, tiny: bool, n: int) -> list[Row]:
    from parity.model import cases

    cfg = ModelConfig.preset("qwen3-0.6b", num_hidden_layers=2, max_position_embeddings=2048)
    B, T = 2, 1024
    if tiny:
        cfg = replace(cfg, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_hidden_layers=1)
        B, T = 1, 16
    # no padding: SDPA's is_causal path (flash); right padding: an explicit mask (memory-efficient kernel)
    real = st.fixed_dictionaries({"cfg": st.just(cfg), "B": st.just(B), "T": st.just(T),
                                  "padding": st.sampled_from(["none", "right"]), "seed": st.integers(0, 2**16)})
    ref = f"transformers bf16 on {device.type}"
    Fallbacks.n = 0
    rows = []
    for label, strategy, k in (("drawn configs", cases(), n), ("Qwen3-0.6B shape, 2 layers", real, 1 if tiny else 2)):
        rows += property_rows(
            [(f"gpu bf16 logits, {label}", ref, "gpu_bf16_logits"),
             (f"gpu bf16 logits error ratio, {label}", ref + " (RMS err vs fp32)", "gpu_error_ratio"),
             (f"gpu bf16 loss error ratio, {label}", ref + " (RMS err vs fp32)", "gpu_error_ratio"),
             (f"gpu bf16 grads error ratio, {label}", ref + " (RMS err vs fp32)", "gpu_error_ratio")],
            strategy, lambda c: model_deltas(c, device), k)
    if Fallbacks.n:
        for r in rows:
            r.note = (r.note + "; " if r.note else "") + f"{Fallbacks.n} case(s) ran SDPA's default kernel"
    return rows


# ---------------------------------------------------------------------------------------------
# 2. The dtype axis at real sizes (parity/dtype.py's rows, on the device)
# ---------------------------------------------------------------------------------------------

def dtype_rows(device: torch.device, tiny: bool, budget: float) -> list[Row]:
    """parity/dtype.py's rows on `device`: the fused loss over many chunks in fp32/bf16/fp16 (drawn), at Qwen's
    vocabulary over 16k tokens with Qwen2.5-0.5B's hidden size (bf16, fp16), fp16's range, and the model in
    bf16/fp16 (exact and fused paths), each direct and as an error ratio against fp32. --tiny keeps only the
    drawn fused-loss rows, one config each: the code path, not the sizes."""
    from parity import dtype as pd
    from parity.harness import select_rows, selected

    select_rows(["many chunks", "(+autocast): err"] if tiny else None)
    try:
        return [r for r in pd.gpu_rows(str(device), 0.05 if tiny else budget) if selected(r.check)]
    finally:
        select_rows(None)


# ---------------------------------------------------------------------------------------------
# 3. bf16 train step: tokens/s and MFU
# ---------------------------------------------------------------------------------------------

def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """The device's matmul rate in this dtype: best of `reps` torch.mm of n x n squares."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def _train_side(side: str, cfg: ModelConfig, state: dict, batch: dict, device: torch.device, steps: int,
                warmup: int) -> dict:
    if side == "minillm":
        model = CausalLM(cfg)
    else:
        import transformers
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_hf()),
                                                              attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or cfg.tie_word_embeddings), \
        (side, missing, unexpected)  # only a tied lm_head may be absent (it is the embedding)
    model = model.float().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the Trainer's adamw_torch_fused
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16), attention_kernels(device):
            loss = model(**batch)["loss"]
        loss.backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"step_s": statistics.median(times), "losses": losses, "peak_mib": peak}


def train_bench(device: torch.device, tiny: bool) -> tuple[str, bool]:
    """The table and whether both sides started from the same loss (a wrong set-up is not a benchmark)."""
    from parity.bench.train import _batch, linear_flops_per_token

    cfg, B, T, steps, warmup, mm_n = ModelConfig.preset("qwen3-0.6b"), 4, 2048, 10, 3, 8192
    if tiny:
        cfg, B, T, steps, warmup, mm_n = ModelConfig.preset("tiny"), 2, 32, 2, 1, 256
    torch.manual_seed(0)
    state = CausalLM(cfg).state_dict()
    batch = {k: v.to(device) for k, v in _batch(cfg, B, T).items()}
    peak = matmul_tflops(device, torch.bfloat16, mm_n)
    flops = linear_flops_per_token(cfg, T) * B * T
    res = {}
    for side in ("minillm", "transformers"):  # one after the other: each side's peak memory is its own
        res[side] = _train_side(side, cfg, state, batch, device, steps, warmup)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    head = ("side", "tokens/s", "step ms", "TFLOP/s", "MFU", "peak MiB", "first loss")
    body = []
    for side, r in res.items():
        tf = flops / r["step_s"] / 1e12
        body.append((side, f"{B * T / r['step_s']:,.0f}", f"{r['step_s'] * 1e3:.1f}", f"{tf:.2f}",
                     f"{tf / peak:.3f}", f"{r['peak_mib']:,.0f}", f"{r['losses'][0]:.5f}"))
    ratio = res["transformers"]["step_s"] / res["minillm"]["step_s"]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    a, b = res["minillm"]["losses"][0], res["transformers"]["losses"][0]
    same = abs(a - b) <= 2e-2 * abs(b)  # bf16 autocast: both round the same fp32 weights; loss near ln(V)
    text = "\n".join([
        f"bf16 train step ({cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size:,}; B={B}, T={T}; autocast bf16, fused AdamW; median of {steps} after {warmup})",
        line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body),
        f"minillm / transformers tokens/s: {ratio:.2f}; bf16 matmul rate {peak:.1f} TFLOP/s "
        f"(best torch.mm {mm_n}^2); first losses {'agree' if same else 'DIFFER'}"])
    return text, same


# ---------------------------------------------------------------------------------------------

def _skip(check: str, why: str) -> Row:
    return Row(check, "-", 0, float("nan"), float("nan"), True, f"skipped: {why}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--device", help="cuda (default when available) or cpu (a dry run: use with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: the code path in seconds, numbers meaningless")
    ap.add_argument("--budget", type=float, default=1.0, help="multiplier on the number of drawn model configs")
    ap.add_argument("--max-seconds", type=float, default=450.0, help="skip what is left after this long")
    args = ap.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available():
            print("parity.gpu: no CUDA device on this machine (torch.cuda.is_available() is False): nothing to run. "
                  "`python -m parity.gpu --device cpu --tiny` dry-runs the code path on the CPU.")
            return 0
        args.device = "cuda"
    device = torch.device(args.device)
    t_start = time.perf_counter()
    left = lambda: args.max_seconds - (time.perf_counter() - t_start)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"parity.gpu on {name}, torch {torch.__version__}{', TINY sizes' if args.tiny else ''}", flush=True)

    rows: list[Row] = []
    n = max(1, int(round((2 if args.tiny else 40) * args.budget)))
    rows += model_rows(device, args.tiny, n) if left() > 0 else [_skip("gpu bf16 model rows", "time budget")]
    print(f"model rows done ({time.perf_counter() - t_start:.0f}s)", flush=True)
    rows += dtype_rows(device, args.tiny, args.budget) if left() > 0 else [_skip("dtype rows", "time budget")]
    print(f"dtype rows done ({time.perf_counter() - t_start:.0f}s)", flush=True)
    print()
    print(format_table(rows))
    same = True
    if left() > 0:
        text, same = train_bench(device, args.tiny)
        print()
        print(text)
    else:
        print("\nbf16 train step: skipped (time budget)")
    failed = [r for r in rows if r.verdict == "FAIL"]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed or skipped; "
          f"{time.perf_counter() - t_start:.0f}s in all")
    return 1 if failed or not same else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

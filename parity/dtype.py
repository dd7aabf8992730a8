"""Low precision and the fused loss: minillm vs transformers in bf16 and fp16, and the fused linear +
cross-entropy (minillm/loss.py, the default training path) over many chunks.

Two kinds of rows:
- direct: minillm vs transformers, both in the same dtype, max |Δ|. Where the two are bit-identical the
  tolerance is 0, so any change in rounding (say, RMSNorm casting after the weight multiply) fails a row.
- error ratio: each side's error against an fp32 reference computed from the *same* inputs and weights
  (drawn once and rounded so that bf16 and fp16 both hold them exactly: only the arithmetic differs), and
  the row is minillm's error / transformers' error: low precision may round differently, never worse than
  1.5x. Errors below fp32's own rounding (`_FLOOR` ulps) are not low-precision errors and count as that floor.

Gradient deltas and errors are relative (max |Δ| / max |reference|, per tensor; the worst tensor counts): they
scale with 1/tokens and with the weights, an absolute bound would mean nothing.

Low precision means weights and activations in bf16/fp16, or fp32 weights under torch.autocast (what the
Trainer's --bf16/--fp16 do): both are drawn.

Every measuring function takes `device` and sizes, so the GPU lane can run them at real sizes on CUDA:
`fused_loss_deltas`, `fused_loss_dtype`, `model_dtype`, `real_vocab_rows`, `fp16_range_row`, and `gpu_rows`
(every row here on the device, plus the fused loss at Qwen2.5-0.5B's head size). The direct tolerances were
measured on CPU; CUDA kernels (split-K GEMMs, flash SDPA) may round differently: the error-ratio rows are the
criterion there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import transformers
from hypothesis import strategies as st
from transformers.loss.loss_utils import ForCausalLMLoss

from minillm.loss import IGNORE_INDEX, linear_cross_entropy
from parity import model as pm
from parity.harness import Row, fixed_check, property_rows, selected
from parity.tolerances import tol

REAL_VOCAB = 151936  # Qwen2/Qwen3's vocabulary: the size at which the fused loss matters
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_FLOOR = 8 * torch.finfo(torch.float32).eps  # below ~8 fp32 ulps an error is fp32 summation order, not dtype


def exact_in_low_precision(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 (8-bit mantissa), with values fp16 would hold as subnormals set to 0: exactly
    representable in bf16, fp16 and fp32, so one fp32 reference serves every dtype."""
    x = x.bfloat16().float()
    return x.masked_fill(x.abs() < 2.0**-14, 0.0).clamp(-60000.0, 60000.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    scale = b.abs().max().item()
    d = (a - b).abs().max().item()
    return d / scale if scale > 0 else d


def _ratio(err_ours: float, err_ref: float, floor: float) -> float:
    """minillm's error / transformers' error, both at least `floor` (inf where ours is not finite)."""
    if err_ours != err_ours or err_ours == float("inf"):
        return float("inf")
    return max(err_ours, floor) / max(err_ref, floor)


# ---------------------------------------------------------------------------------------------
# The fused linear + cross-entropy alone: h (B, T, C), W (V, C), labels
# ---------------------------------------------------------------------------------------------
@st.composite
def fused_cases(draw, vocabs=(61, 500, 3000)) -> dict:
    """Token counts that span many chunks: a chunk holds `rows` (1-9) rows, plus a remainder below one row
    that the chunker must round down; labels with ignored rows; num_items_in_batch absent, equal to this
    batch's label count, or larger (the other micro-batches of an accumulated step)."""
    V = draw(st.sampled_from(vocabs))
    return {"B": draw(st.integers(1, 3)), "T": draw(st.integers(2, 160)), "V": V,
            "C": draw(st.sampled_from([16, 32, 64])),
            "chunk_elems": V * draw(st.integers(1, 9)) + draw(st.integers(0, V - 1)),
            "items": draw(st.sampled_from([None, 0, 17])), "ignore": draw(st.sampled_from([0.0, 0.2, 0.6])),
            "w_scale": draw(st.sampled_from([0.05, 0.3, 1.0])), "hot": 0.0, "outlier": 0.0,
            "autocast": draw(st.booleans()), "seed": draw(st.integers(0, 2**16))}


def fused_inputs(case: dict, device: str | torch.device = "cpu"):
    """h (B, T, C), W (V, C) exact in every dtype, labels (B, T) and num_items_in_batch. `hot`: the fraction of
    labels that are one token; `outlier`: added to one hidden dimension (LLM activations have such dimensions):
    together they make the largest dW entries, ~ hot * tokens * outlier / tokens."""
    B, T, V, C = case["B"], case["T"], case["V"], case["C"]
    g = torch.Generator().manual_seed(case["seed"])
    h = torch.randn(B, T, C, generator=g)
    h[..., 0] += case["outlier"]
    W = torch.randn(V, C, generator=g) * case["w_scale"]
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < case["hot"]] = 3
    labels[torch.rand(B, T, generator=g) < case["ignore"]] = IGNORE_INDEX
    labels[0, 1] = 1  # at least one label after the shift: a mean over no tokens is nan on both sides
    n = None if case["items"] is None else int((labels[:, 1:] != IGNORE_INDEX).sum()) + case["items"]
    return exact_in_low_precision(h).to(device), exact_in_low_precision(W).to(device), labels.to(device), n


def transformers_loss(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
                      chunk_elems: int | None = None) -> torch.Tensor:
    """The unfused reference: transformers' lm_head (F.linear) then ForCausalLMLoss over the logits."""
    return ForCausalLMLoss(F.linear(h, W), labels, W.shape[0], num_items_in_batch=num_items_in_batch)


def loss_and_grads(fn, h, W, labels, num_items, dtype: torch.dtype, chunk_elems: int, autocast: bool = False):
    """(loss, d h, d W) in fp32 of fn in `dtype`: h and W cast to it or, with autocast, fp32 leaves under
    torch.autocast(dtype) as the Trainer's --bf16/--fp16 runs them."""
    h = h.detach().to(torch.float32 if autocast else dtype).requires_grad_()
    W = W.detach().to(torch.float32 if autocast else dtype).requires_grad_()
    with torch.autocast(h.device.type, dtype=dtype, enabled=autocast):
        loss = fn(h, W, labels, num_items_in_batch=num_items, chunk_elems=chunk_elems)
    loss.backward()
    return loss.detach().float(), h.grad.float(), W.grad.float()


def float64_loss_and_grads(h, W, labels, num_items=None):
    """(loss, d h, d W) in fp64: the formula, not transformers' code (its ForCausalLMLoss casts logits to fp32)."""
    h = h.detach().double().requires_grad_()
    W = W.detach().double().requires_grad_()
    target = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    loss = F.cross_entropy((h @ W.t()).flatten(0, 1), target, ignore_index=IGNORE_INDEX,
                           reduction="mean" if num_items is None else "sum")
    loss = loss if num_items is None else loss / num_items
    loss.backward()
    return loss.detach(), h.grad, W.grad


def fused_loss_deltas(case: dict, device: str | torch.device = "cpu") -> list[float]:
    """fp32, minillm vs transformers: relative |Δ| of the loss, and of d h and d W (the worse of the two)."""
    h, W, labels, n = fused_inputs(case, device)
    a = loss_and_grads(linear_cross_entropy, h, W, labels, n, torch.float32, case["chunk_elems"])
    b = loss_and_grads(transformers_loss, h, W, labels, n, torch.float32, case["chunk_elems"])
    return [_rel(a[0], b[0]), max(_rel(a[1], b[1]), _rel(a[2], b[2]))]


def fused_loss_dtype(case: dict, dtype: torch.dtype, device: str | torch.device = "cpu",
                     reference: tuple | None = None) -> dict[str, float]:
    """The fused loss in `dtype` (or autocast to it, per case["autocast"]) vs transformers' in the same:
    direct deltas ("loss", "grads": relative, worse of d h / d W), each side's error against the fp32
    reference ("err_ours", "err_ref": max over loss (relative) and the gradients) and their "ratio"."""
    h, W, labels, n = fused_inputs(case, device)
    run = lambda fn, dt, autocast: loss_and_grads(fn, h, W, labels, n, dt, case["chunk_elems"], autocast)
    ref = reference or run(transformers_loss, torch.float32, False)
    ours, theirs = run(linear_cross_entropy, dtype, case["autocast"]), run(transformers_loss, dtype, case["autocast"])
    out = {"loss": _rel(ours[0], theirs[0]),
           "grads": max(_rel(ours[1], theirs[1]), _rel(ours[2], theirs[2])),
           "finite": float(all(torch.isfinite(x).all().item() for x in ours))}
    ratios = []
    for k in range(3):  # loss, d h, d W: each side's relative error against fp32, compared
        e_ours, e_ref = _rel(ours[k], ref[k]), _rel(theirs[k], ref[k])
        ratios.append(_ratio(e_ours, e_ref, _FLOOR))
        out[f"err_ours_{k}"], out[f"err_ref_{k}"] = e_ours, e_ref
    out["ratio"] = max(ratios)
    return out


# ---------------------------------------------------------------------------------------------
# Whole models in bf16/fp16 (the exact path and the fused training path)
# ---------------------------------------------------------------------------------------------
def _forward_backward(model, ids, mask, pos, labels, keep, autocast: torch.dtype | None = None,
                      loss_scale: float | None = None):
    """loss_scale: backward through a real fp16 loss scaler (torch.amp.GradScaler at that initial scale: scale,
    backward, unscale_), as the Trainer's --fp16 does; the gradients read are the unscaled ones."""
    with torch.autocast(ids.device.type, dtype=autocast, enabled=autocast is not None):
        out = model(ids, attention_mask=mask, position_ids=pos, labels=labels)
    if loss_scale is None:
        out.loss.backward()
    else:
        scaler = torch.amp.GradScaler(ids.device.type, init_scale=loss_scale)
        scaler.scale(out.loss).backward()
        scaler.unscale_(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0))
    logits = None if out.logits is None else out.logits.detach().float()[keep]
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return logits, out.loss.detach().float(), grads


def model_dtype(case: dict, dtype: torch.dtype, fused: bool, device: str | torch.device = "cpu",
                autocast: bool = False, loss_scale: float | None = None) -> dict[str, float]:
    """minillm's model in `dtype` vs transformers' in `dtype` (same weights, exact in every dtype), training
    mode: "direct" = max over logits (absolute), loss (absolute) and every parameter's gradient (relative);
    "ratio" = minillm's error / transformers' error against the fp32 model, worst of logits/loss/grads.
    autocast: both models keep fp32 weights and run under torch.autocast(dtype), as --bf16/--fp16 train.
    loss_scale: both low-precision models backpropagate through a GradScaler (see _forward_backward); the fp32
    reference does not, so a gradient the scale reached on one side only shows in both rows."""
    ours32 = pm.random_model(case["cfg"], case["seed"], fused=fused)
    with torch.no_grad():
        for p in ours32.parameters():
            p.copy_(exact_in_low_precision(p))
    weights = torch.float32 if autocast else dtype
    ref, theirs = pm.hf_copy(ours32).to(device).train(), pm.hf_copy(ours32).to(device, weights).train()
    ours = ours32.to(device, weights).train()
    ids, mask, pos, labels = (None if x is None else x.to(device) for x in pm.batch(case))
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    R = _forward_backward(ref, ids, mask, pos, labels, keep)
    A, B = (_forward_backward(m, ids, mask, pos, labels, keep, dtype if autocast else None, loss_scale)
            for m in (ours, theirs))
    if set(A[2]) != set(B[2]):
        raise AssertionError(f"gradients on different parameters: {sorted(set(A[2]) ^ set(B[2]))}")
    direct = [(A[1] - B[1]).abs().item(), max(_rel(A[2][k], B[2][k]) for k in B[2])]
    e_ours = [_rel(A[1], R[1]), max(_rel(A[2][k], R[2][k]) for k in R[2])]
    e_ref = [_rel(B[1], R[1]), max(_rel(B[2][k], R[2][k]) for k in R[2])]
    if A[0] is not None:  # the fused path has no logits
        direct.append((A[0] - B[0]).abs().max().item())
        e_ours.append(_rel(A[0], R[0]))
        e_ref.append(_rel(B[0], R[0]))
    return {"direct": max(direct), "ratio": max(_ratio(a, b, _FLOOR) for a, b in zip(e_ours, e_ref))}


def model_dtype_deltas(case: dict, dtype: torch.dtype, fused: bool, device: str | torch.device = "cpu",
                       autocast: bool = False, loss_scale: float | None = None) -> list[float]:
    m = model_dtype(case, dtype, fused, device, autocast, loss_scale)
    return [m["direct"], m["ratio"]]


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def real_vocab_rows(device: str | torch.device = "cpu", tokens: int = 2048, hidden: int = 32,
                    dtypes: tuple[str, ...] = ("bf16",), label: str = "") -> list[Row]:
    """The fused loss at Qwen's vocabulary over `tokens` tokens (hundreds of chunks at the default chunk size):
    fp32 direct, then per low-precision dtype direct and error ratio, all against one fp32 reference."""
    name = f"fused CE V={REAL_VOCAB} x {tokens} tok{label}"
    if not any(selected(name + s) for s in (" fp32", *(f" {d}" for d in dtypes))):
        return []
    t0 = time.perf_counter()
    ref_name = f"transformers {transformers.__version__} ForCausalLMLoss"
    case = {"B": 1, "T": tokens, "V": REAL_VOCAB, "C": hidden, "chunk_elems": 1 << 22, "items": None,
            "ignore": 0.1, "w_scale": 0.3, "hot": 0.05, "outlier": 8.0, "autocast": False, "seed": 0}
    h, W, labels, n = fused_inputs(case, device)
    ref = loss_and_grads(transformers_loss, h, W, labels, n, torch.float32, case["chunk_elems"])
    ours = loss_and_grads(linear_cross_entropy, h, W, labels, n, torch.float32, case["chunk_elems"])
    rows = [fixed_check(f"{name} fp32: loss (rel.)", ref_name, "fused_chunks_loss", [_rel(ours[0], ref[0])], t0=t0),
            fixed_check(f"{name} fp32: dh, dW (rel.)", ref_name, "fused_chunks_grads",
                        [max(_rel(ours[1], ref[1]), _rel(ours[2], ref[2]))], t0=t0)]
    del ours
    for d in dtypes:
        t0 = time.perf_counter()
        m = fused_loss_dtype(case, DTYPES[d], device, reference=ref)
        rows += [fixed_check(f"{name} {d}: loss (rel.)", ref_name + f" {d}", f"{d}_fused_loss", [m["loss"]], t0=t0),
                 fixed_check(f"{name} {d}: dh, dW (rel.)", ref_name + f" {d}", f"{d}_fused_grads", [m["grads"]], t0=t0),
                 fixed_check(f"{name} {d}: err / transformers' err", f"fp32 reference", "dtype_error_ratio",
                             [m["ratio"]], t0=t0)]
    return rows


def fp16_range_row(device: str | torch.device = "cpu", tokens: int = 4096, vocab: int = 1000, hidden: int = 64) -> Row:
    """fp16 where it is tight: half the labels one token and an outlier hidden dimension of 40, so d W of
    that token is ~ 0.5 * tokens * 40 before the 1/tokens scale (the pre-fp32-accumulation code overflowed to
    inf here; transformers stays finite). The row is the error ratio; not finite counts as inf."""
    name = f"fused CE fp16, hot token + outlier dim, {tokens} tok: err / transformers' err"
    if not selected(name):
        return Row(name, "", 0, float("nan"), tol("dtype_error_ratio"), True, "skipped (not selected)")
    t0 = time.perf_counter()
    case = {"B": 1, "T": tokens, "V": vocab, "C": hidden, "chunk_elems": vocab * 512, "items": None,
            "ignore": 0.1, "w_scale": 0.1, "hot": 0.5, "outlier": 40.0, "autocast": False, "seed": 1}
    m = fused_loss_dtype(case, torch.float16, device)
    return fixed_check(name, "fp32 reference", "dtype_error_ratio", [m["ratio"] if m["finite"] else float("inf")], t0=t0)


def rows(budget: float = 1.0, device: str | torch.device = "cpu") -> Iterator[Row]:
    n = lambda k: max(1, int(round(k * budget)))
    ref = f"transformers {transformers.__version__}"
    ce = ref + " ForCausalLMLoss"
    yield from property_rows(
        [("fused CE fp32, many chunks: loss (rel.)", ce, "fused_chunks_loss"),
         ("fused CE fp32, many chunks: dh, dW (rel.)", ce, "fused_chunks_grads")],
        fused_cases(), lambda c: fused_loss_deltas(c, device), n(40))
    for d, dt in DTYPES.items():
        def measure(c, dt=dt):
            m = fused_loss_dtype(c, dt, device)
            return [m["loss"], m["grads"], m["ratio"]]
        # fp16 GEMMs run at a few GFLOP/s on this CPU: smaller vocabularies there
        yield from property_rows(
            [(f"fused CE {d} (+autocast), many chunks: loss (rel.)", ce + f" {d}", f"{d}_fused_loss"),
             (f"fused CE {d} (+autocast), many chunks: dh, dW (rel.)", ce + f" {d}", f"{d}_fused_grads"),
             (f"fused CE {d} (+autocast): err / transformers' err", "fp32 reference", "dtype_error_ratio")],
            fused_cases(vocabs=(61, 500, 3000) if d == "bf16" else (61, 500)), measure, n(12))
    yield from real_vocab_rows(device, tokens=2048, hidden=32, dtypes=("bf16",))
    yield from real_vocab_rows(device, tokens=256, hidden=16, dtypes=("fp16",))  # fp16 GEMMs: ~3 GFLOP/s here
    yield fp16_range_row(device)
    for d, dt in DTYPES.items():
        for autocast in (False, True):  # weights in d, or fp32 weights under autocast(d) as --bf16/--fp16 train
            for fused in (False, True):
                what = f"model {d}" + (" autocast" if autocast else "") + (", fused path" if fused else ", exact path")
                yield from property_rows(
                    [(f"{what}: loss, grads" if fused else f"{what}: logits, loss, grads",
                      ref + f" {d}", f"{d}_model_fused" if fused else "lowp_exact"),
                     (f"{what}: err / transformers' err", "fp32 reference", "dtype_error_ratio")],
                    pm.cases(), lambda c, dt=dt, f=fused, a=autocast: model_dtype_deltas(c, dt, f, device, a),
                    n(2 if autocast else 4))


    # a real fp16 loss scaler (issue 25 item 1): GradScaler's scale multiplies the incoming gradient of the loss, and
    # the fused loss's backward must pass it on to d h and d W (loss.backward() alone has an incoming gradient of 1)
    for fused in (False, True):
        what = "model fp16 autocast + GradScaler(2^10)" + (", fused path" if fused else ", exact path")
        yield from property_rows(
            [(f"{what}: loss, grads" if fused else f"{what}: logits, loss, grads",
              ref + " fp16, same scaler", "fp16_model_fused" if fused else "lowp_exact"),
             (f"{what}: err / transformers' err", "fp32 reference, unscaled", "dtype_error_ratio")],
            pm.cases(), lambda c, f=fused: model_dtype_deltas(c, torch.float16, f, device, True, 2.0**10), n(2))


def gpu_rows(device: str = "cuda", budget: float = 1.0) -> Iterator[Row]:
    """The same checks at real sizes for the GPU lane: every row above on `device`, plus the fused loss at
    Qwen's vocabulary over 16k tokens and hidden 896 (Qwen2.5-0.5B's lm_head) in bf16 and fp16."""
    yield from rows(budget, device)
    yield from real_vocab_rows(device, tokens=16384, hidden=896, dtypes=("bf16", "fp16"), label=" (Qwen 0.5B head)")
    yield fp16_range_row(device, tokens=16384, vocab=REAL_VOCAB, hidden=896)

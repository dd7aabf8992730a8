"""The causal-LM loss: transformers' exact formula, and a fused linear + cross-entropy that is faster.

`causal_lm_loss(logits, labels)` is transformers' ForCausalLMLoss, op for op (the reference path).

`linear_cross_entropy(h, weight, labels)` computes the same loss from the final hidden states without
ever holding the full (tokens, vocab) logits: rows are processed in chunks; each chunk's logits are
computed once, turned into the loss *and* (in the same buffer) into d loss / d logits, then folded into
d h and d W right away. Backward only scales those by the incoming gradient. With a 32k vocab this removes
the largest activations of a small model (logits, log-softmax, their gradients) and two passes over them.

Low precision follows transformers' unfused path step by step: the lm_head GEMMs run in the activation
dtype (or the autocast dtype), logits are rounded to it and the loss is taken in fp32; d loss / d logits is
scaled by 1/denominator in fp32 *before* it is rounded to the activation dtype, as autograd does there.
d W, the one sum that runs across chunks, is accumulated in fp32. Rounding differs from the reference by a
few ulps (chunked GEMMs, another summation order); `python -m parity` reports by how much.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Logits held per chunk: 16 MB in fp32; at a 32k vocab 128 rows, large enough for efficient GEMMs, small
# enough to keep the peak low. An argument of linear_cross_entropy too, so checks can draw tiny chunks.
CHUNK_ELEMS = 1 << 22
# ...but never fewer rows than this by default: at Qwen's 151,936 vocab CHUNK_ELEMS is 27 rows, and GEMMs that
# thin ran the fused loss 1.45x slower than transformers' unfused one (parity.bench train_v152k; profile: 70% of
# it in aten::mm). Measured (loss alone, V=151936, C=512, 1,024 tokens, 2 threads): 27 rows 1.8x transformers'
# time (two runs each), 128 rows 1.03-1.12x, 256 rows 0.97-0.99x. 128, not 256: 256 would also apply at 32k
# (131 rows now), where it raised train_v32k's peak to 0.59x transformers' (target <= 0.6) for no speed-up.
MIN_CHUNK_ROWS = 128


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Token t predicts label t+1: shift left, pad the end with ignore_index. (B, T) -> (B, T)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: int | torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """transformers' ForCausalLMLoss: cross-entropy in fp32, mean over non-ignored tokens or, given
    `num_items_in_batch`, sum / num_items_in_batch (exact gradient accumulation over uneven micro-batches)."""
    logits = logits.float()
    logits = logits.view(-1, logits.shape[-1])
    target = shift_labels(labels, ignore_index).view(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean")
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _add_matmul_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for a, b in fp32 or a low-precision dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        # Tensor cores multiply in bf16/fp16 and sum in fp32; the chunk's partial is rounded once to that dtype
        # before it joins the fp32 sum (an fp32 GEMM would be ~10x slower on a GPU).
        acc.add_(a @ b)
    else:
        # On a CPU, low-precision GEMMs are slow (fp16 ~50x slower than fp32) and products of two bf16/fp16
        # numbers are exact in fp32: an fp32 GEMM is faster and sums exactly what a tensor core would.
        acc.addmm_(a.float(), b.float())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, denominator, chunk_rows: int, dtype: torch.dtype):
        # h (N, C), weight (V, C): any float dtypes; the GEMMs run in `dtype`. target (N,), IGNORE_INDEX for
        # rows without a label. denominator: fp32 scalar, the loss is sum(row losses) / denominator.
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):  # we cast explicitly; autocast would undo the fp32 sums
            w = weight.to(dtype)  # (V, C); a copy only under autocast, where F.linear makes the same one
            dh = torch.empty(h.shape, dtype=dtype, device=h.device) if want_dh else None
            # d W sums over every row of every chunk: in fp32, whatever `dtype`, so rounding does not build up
            # and fp16 cannot overflow where the reference (one GEMM of pre-scaled gradients) does not
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_dw else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.shape[0], chunk_rows):
                hc, tc = h[s:s + chunk_rows].to(dtype), target[s:s + chunk_rows]
                valid = tc != IGNORE_INDEX
                tc = tc.clamp(min=0)[:, None]
                # (n, V): the only logits buffer, rounded to `dtype` as the lm_head's output is, then fp32 as the
                # reference loss takes it; it becomes the gradient in place
                z = (hc @ w.t()).float()
                zmax = z.amax(dim=-1, keepdim=True)  # (n, 1)
                z_target = z.gather(1, tc) - zmax  # (n, 1), before z is overwritten
                z.sub_(zmax).exp_()  # one exp pass serves the loss and the gradient
                sumexp = z.sum(dim=-1, keepdim=True)  # (n, 1)
                total += ((sumexp.log() - z_target).squeeze(1) * valid).sum()  # logsumexp - z[target]
                if want_dh or want_dw:
                    # d loss / d logits = (softmax - onehot(target)) / denominator, zero on ignored rows. Scaled in
                    # fp32 before the cast, as the reference's backward does: this is what keeps fp16 in range
                    # (unscaled, d W of a frequent token sums N rows of h and overflows 65504).
                    scale = valid[:, None] / denominator  # (n, 1)
                    grad = z.mul_(scale / sumexp)
                    grad.scatter_add_(1, tc, -scale)
                    grad = grad.to(dtype)
                    if want_dh:
                        torch.mm(grad, w, out=dh[s:s + chunk_rows])  # (n, C)
                    if want_dw:
                        _add_matmul_fp32(dw, grad.t(), hc)  # (V, C) += (V, n) @ (n, C)
        # Kept on ctx, not save_for_backward: backward scales them in place (no second (V, C) buffer), so
        # this graph can be backpropagated once only — which is all training does.
        ctx.dh, ctx.dw = dh, dw
        return total / denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        dh, dw, ctx.dh, ctx.dw = ctx.dh, ctx.dw, None, None
        if dh is None and dw is None:
            raise RuntimeError("linear_cross_entropy: backward called twice on the same graph")
        # grad_out is 1 in training (the loss is the output), and x * 1 is exact in any dtype. Under fp16 loss
        # scaling the reference multiplies before rounding to fp16, we after: equal up to that rounding.
        # Autograd casts each gradient to its input's dtype (d W: fp32 -> the weight's dtype, rounded once).
        return (None if dh is None else dh.mul_(grad_out.to(dh.dtype)),
                None if dw is None else dw.mul_(grad_out.float()), None, None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch: int | torch.Tensor | None = None,
                         chunk_elems: int | None = None) -> torch.Tensor:
    """causal_lm_loss(h @ weight.T, labels, num_items_in_batch) without materialising the logits.

    h (B, T, C) final hidden states, weight (V, C) the lm_head, labels (B, T). Chunks hold <= chunk_elems
    logits (at least one row each; by default CHUNK_ELEMS, but at least MIN_CHUNK_ROWS rows). Under autocast the
    GEMMs run in the autocast dtype, as F.linear's would.
    """
    target = shift_labels(labels).view(-1).to(h.device)
    h = h.reshape(-1, h.shape[-1])
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
    elif h.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden states are {h.dtype} but the lm_head weight is "
                         f"{weight.dtype}; cast the model to one dtype or use autocast")
    else:
        dtype = h.dtype
    if num_items_in_batch is None:
        denominator = (target != IGNORE_INDEX).sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=h.device).float()
    if chunk_elems is None:
        chunk_rows = max(MIN_CHUNK_ROWS, CHUNK_ELEMS // weight.shape[0])
    else:
        chunk_rows = max(1, chunk_elems // weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, target, denominator, chunk_rows, dtype)

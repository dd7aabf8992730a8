"""The causal-LM loss: transformers' exact formula, and a fused linear + cross-entropy that is faster.

`causal_lm_loss(logits, labels)` is transformers' ForCausalLMLoss, op for op (the reference path).

`linear_cross_entropy(h, weight, labels)` computes the same loss from the final hidden states without
ever holding the full (tokens, vocab) logits: rows are processed in chunks; each chunk's logits are
computed once, turned into the loss *and* (in the same buffer) into d loss / d logits = softmax - onehot,
then folded into d h and d W right away. Backward only scales those by the incoming gradient. With a 32k
vocab this removes the largest activations of a small model (logits, log-softmax, their gradients) and
two passes over them. Rounding differs from the reference by a few ulps (chunked GEMMs, another
summation order); `python -m parity` reports by how much.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


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


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, denominator, chunk_rows: int):
        # h (N, C), weight (V, C), target (N,) with IGNORE_INDEX for rows without a label
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if want_dh else None
        # the first chunk writes dw, later ones add to it (no memset of a (V, C) buffer); zeros if no rows
        dw = (torch.empty_like if h.shape[0] else torch.zeros_like)(weight) if want_dw else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk_rows):
            hc, tc = h[s:s + chunk_rows], target[s:s + chunk_rows]
            valid = tc != IGNORE_INDEX
            tc = tc.clamp(min=0)[:, None]
            z = (hc @ weight.t()).float()  # (n, V): the only logits buffer; it becomes the gradient in place
            zmax = z.amax(dim=-1, keepdim=True)  # (n, 1)
            z_target = z.gather(1, tc) - zmax  # (n, 1), before z is overwritten
            z.sub_(zmax).exp_()  # one exp pass serves the loss and the gradient
            sumexp = z.sum(dim=-1, keepdim=True)  # (n, 1)
            total += ((sumexp.log() - z_target).squeeze(1) * valid).sum()  # logsumexp - z[target]
            if want_dh or want_dw:
                # d(sum of row losses)/d logits = softmax - onehot(target), zero on ignored rows
                grad = z.mul_(valid[:, None] / sumexp)
                grad.scatter_add_(1, tc, -valid[:, None].to(grad.dtype))
                grad = grad.to(h.dtype)
                if want_dh:
                    torch.mm(grad, weight, out=dh[s:s + chunk_rows])
                if want_dw:
                    if s == 0:
                        torch.mm(grad.t(), hc, out=dw)
                    else:
                        dw.addmm_(grad.t(), hc)
        # Kept on ctx, not save_for_backward: backward scales them in place (no second (V, C) buffer), so
        # this graph can be backpropagated once only — which is all training does.
        ctx.dh, ctx.dw = dh, dw
        ctx.save_for_backward(denominator)
        return total / denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (denominator,) = ctx.saved_tensors
        dh, dw, ctx.dh, ctx.dw = ctx.dh, ctx.dw, None, None
        if dh is None and dw is None:
            raise RuntimeError("linear_cross_entropy: backward called twice on the same graph")
        scale = grad_out / denominator
        return (None if dh is None else dh.mul_(scale.to(dh.dtype)),
                None if dw is None else dw.mul_(scale.to(dw.dtype)), None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch: int | torch.Tensor | None = None,
                         chunk_elems: int = 1 << 22) -> torch.Tensor:
    """causal_lm_loss(h @ weight.T, labels, num_items_in_batch) without materialising the logits.

    h (B, T, C) final hidden states, weight (V, C) the lm_head. Chunks hold <= chunk_elems logits (16 MB fp32:
    at a 32k vocab 128 rows, large enough for efficient GEMMs, small enough to keep the peak low).
    """
    target = shift_labels(labels).view(-1).to(h.device)
    h = h.reshape(-1, h.shape[-1])
    if num_items_in_batch is None:
        denominator = (target != IGNORE_INDEX).sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=h.device).float()
    chunk_rows = max(1, chunk_elems // weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, target, denominator, chunk_rows)

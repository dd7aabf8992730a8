"""Direct preference optimisation (DPO), written out: the numbers of TRL 1.16's DPOTrainer, one by one.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))          (loss_type "sigmoid")

pi_c is the summed log-probability the policy gives the chosen completion after the prompt, ref_c the same under
the reference model (the starting point; for an adapter run, the same model with its adapter switched off), and
r the rejected completion. Chosen and rejected go through the model in ONE batch, all chosen rows first, then
all rejected rows (TRL's layout), and `chunk(2)` splits the results.

What is unusual, and why:
- Log-probabilities: TRL 1.16 does not take `log_softmax` of the logits: its fused LM head computes each token's
  `z[target] - (max(z) + log(sum(exp(z - max(z)))))` in fp32 (an online log-sum-exp over vocabulary tiles of
  32,768, one tile below that size). `token_logps` is that formula on full logits; `_FusedLogps` the same per
  chunk of rows, never holding the (tokens, vocab) logits, recomputing each chunk in backward.
- A token's log-prob counts when the token it predicts is in the completion: the completion mask shifted by one.
- `label_smoothing` is used by "robust" only: since TRL 0.29 "sigmoid" ignores it (before, it was cDPO).
- Rows are tokenised and collated as TRL does in minillm/preference.py; a batch here is its `collate` output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minillm.loss import CHUNK_ELEMS, MIN_CHUNK_ROWS
from minillm.pack import best_fit
from minillm.peft import disable_adapter
from minillm.preference import collate

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


# ---------------------------------------------------------------------------------------------
# Per-sequence log-probabilities of the completion
# ---------------------------------------------------------------------------------------------
def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, TRL 1.16's formula in fp32: z[target] - (max z + log sum exp(z - max z)).
    logits (..., V), targets (...) -> (...)."""
    z = logits.float()
    m = z.amax(dim=-1, keepdim=True)  # the shift that keeps exp() in range; its gradient cancels
    log_z = m.squeeze(-1) + (z - m).exp().sum(dim=-1).log()
    return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z


class _FusedLogps(torch.autograd.Function):
    """token_logps(h @ weight.T, targets) for h (N, C), weight (V, C), chunk by chunk of rows: each chunk's
    (n, V) logits live only inside the loop, in forward and again (recomputed) in backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int):
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        log_z = torch.empty_like(out)
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, h.shape[0], chunk_rows):
                z = (h[s:s + chunk_rows].to(dtype) @ w.t()).float()  # (n, V): rounded as the lm_head's output is
                m = z.amax(dim=-1)
                log_z[s:s + chunk_rows] = m + (z - m[:, None]).exp().sum(dim=-1).log()
                out[s:s + chunk_rows] = z.gather(1, targets[s:s + chunk_rows, None]).squeeze(1) - log_z[s:s + chunk_rows]
        ctx.save_for_backward(h, weight, targets, log_z)
        ctx.chunk_rows, ctx.dtype = chunk_rows, dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        h, weight, targets, log_z = ctx.saved_tensors
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if want_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_dw else None
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            for s in range(0, h.shape[0], ctx.chunk_rows):
                hc, gc = h[s:s + ctx.chunk_rows].to(ctx.dtype), g[s:s + ctx.chunk_rows, None].float()
                z = (hc @ w.t()).float()
                # d logp / d z = onehot(target) - softmax(z), times the incoming gradient of each row
                grad = (z - log_z[s:s + ctx.chunk_rows, None]).exp_().mul_(-gc)
                grad.scatter_add_(1, targets[s:s + ctx.chunk_rows, None], gc)
                if want_dh:
                    dh[s:s + ctx.chunk_rows] = grad @ w.float()
                if want_dw:
                    dw.addmm_(grad.t(), hc.float())  # (V, C) += (V, n) @ (n, C), summed in fp32
        return (None if dh is None else dh.to(h.dtype), None if dw is None else dw.to(weight.dtype), None, None)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The minillm CausalLM inside `model` (itself, or the one a prompt/prefix wrapper holds)."""
    return next(m for m in model.modules() if hasattr(m, "lm_head") and hasattr(getattr(m, "model", None), "norm"))


def completion_logps(model: nn.Module, batch: Mapping[str, torch.Tensor], fused: bool = True,
                     chunk_elems: int | None = None) -> torch.Tensor:
    """Per-sequence sum of log p(token) over the completion tokens: (2B,). fused=False takes the full logits.
    A packed batch (preference.collate_packed: no attention_mask, position_ids restarting per sequence) is summed
    per `sequence_id` instead of per row."""
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
    targets, mask = input_ids[:, 1:], completion_mask[:, 1:].bool()  # position t predicts token t + 1
    T = targets.shape[1]
    inputs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    if not fused:
        logits = model(input_ids, **inputs).logits
        per_token = token_logps(logits[:, -T - 1:-1], targets)  # prompt tuning prepends virtual tokens: the last T
    else:
        # The final hidden states are caught at the final norm, so every PEFT wrapper's forward runs unchanged;
        # the model computes the logits of the last position only (logits_to_keep=1).
        lm = _causal_lm(model)
        caught = []
        hook = lm.model.norm.register_forward_hook(lambda module, args, output: caught.append(output))
        try:
            model(input_ids, **inputs, logits_to_keep=1)
        finally:
            hook.remove()
        h = caught[-1][:, -T - 1:-1]  # (rows, T, C)
        V = lm.lm_head.weight.shape[0]
        rows = max(MIN_CHUNK_ROWS, CHUNK_ELEMS // V) if chunk_elems is None else max(1, chunk_elems // V)
        logps = _FusedLogps.apply(h[mask], lm.lm_head.weight, targets[mask], rows)  # completion positions only
        per_token = torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).masked_scatter(mask, logps)
    per_token = per_token.masked_fill(~mask, 0.0)
    if "sequence_id" not in batch:
        return per_token.sum(dim=1)
    seq = batch["sequence_id"][:, 1:][mask]  # the sequence each completion token's log-prob belongs to
    return per_token.new_zeros(int(batch["sequence_id"].max()) + 1).index_add(0, seq, per_token[mask])


def pack_batch(batch: Mapping[str, torch.Tensor], width: int | None = None) -> dict[str, torch.Tensor]:
    """A padded batch (preference.collate) as packed rows of `width` tokens (default: its longest sequence): the
    sequences best-fit into rows (minillm.pack), position_ids restarting per sequence, no attention_mask (so each
    attends only to itself: minillm.pack's packed documents), `sequence_id` naming each token's sequence (-1: pad)."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    rows = best_fit(lengths, width or max(lengths))
    W = max(sum(lengths[i] for i in row) for row in rows)
    out = {"input_ids": torch.zeros(len(rows), W, dtype=torch.long), "completion_mask": torch.zeros(len(rows), W,
           dtype=torch.long), "position_ids": torch.arange(W).repeat(len(rows), 1),  # the tail: one pad document
           "sequence_id": torch.full((len(rows), W), -1)}
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            out["input_ids"][r, at:at + n] = batch["input_ids"][i, :n]
            out["completion_mask"][r, at:at + n] = batch["completion_mask"][i, :n]
            out["position_ids"][r, at:at + n] = torch.arange(n)
            out["sequence_id"][r, at:at + n] = i
            at += n
        out["position_ids"][r, at:] = torch.arange(W - at)
    return {**out, **{k: v for k, v in batch.items() if k.startswith("ref_")}}


def completion_lengths(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Completion tokens per sequence (2B,), counted on the unshifted completion mask as TRL counts them (ipo)."""
    mask = batch["completion_mask"]
    if "sequence_id" not in batch:
        return mask.sum(dim=1)
    seq = batch["sequence_id"]
    return mask.new_zeros(int(seq.max()) + 1).index_add(0, seq[seq >= 0], mask[seq >= 0])


# ---------------------------------------------------------------------------------------------
# The losses and the metrics
# ---------------------------------------------------------------------------------------------
@dataclass
class DPOConfig:
    """TRL's DPOConfig fields that change the numbers (defaults as TRL 1.16's)."""

    beta: float = 0.1
    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None  # one per loss type; None: 1.0 each
    label_smoothing: float = 0.0  # used by "robust" only
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"

    def __post_init__(self):
        self.loss_type = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        bad = [t for t in self.loss_type if t not in LOSS_TYPES]
        if bad:
            raise ValueError(f"loss_type {bad} not implemented here; choose from {LOSS_TYPES}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"{len(self.loss_weights)} loss_weights for {len(self.loss_type)} loss types")
        if "robust" in self.loss_type and not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, not {self.label_smoothing}")


def dpo_loss(cfg: DPOConfig, logps: torch.Tensor, ref_logps: torch.Tensor, lengths: torch.Tensor
             ) -> torch.Tensor:
    """The weighted sum of each loss type's mean over pairs. logps, ref_logps, lengths (completion_lengths) (2B,):
    chosen sequences, then rejected."""
    chosen, rejected = (logps - ref_logps).chunk(2)  # log-ratios, (B,) each
    delta = chosen - rejected
    loss = 0.0
    for loss_type, weight in zip(cfg.loss_type, cfg.loss_weights or [1.0] * len(cfg.loss_type)):
        if loss_type == "sigmoid":
            per_pair = -F.logsigmoid(cfg.beta * delta)
        elif loss_type == "hinge":
            per_pair = torch.relu(1 - cfg.beta * delta)
        elif loss_type == "ipo":
            # log-ratios averaged over each completion's tokens
            n_chosen, n_rejected = lengths.clamp(min=1.0).chunk(2)
            per_pair = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * cfg.beta)) ** 2
        else:  # "robust": unbiased under labels flipped with probability label_smoothing
            eps = cfg.label_smoothing
            clean = -(1 - eps) * F.logsigmoid(cfg.beta * delta)
            flipped = -eps * F.logsigmoid(-cfg.beta * delta)
            per_pair = (clean - flipped) / (1 - 2 * eps)
        loss = loss + per_pair.mean() * weight
    return loss


def dpo_metrics(cfg: DPOConfig, logps: torch.Tensor, ref_logps: torch.Tensor, gather=None) -> dict[str, float]:
    """TRL's logged rewards/* and logps/*: means over the pairs of the batch, of every rank's pairs when `gather`
    (accelerate's gather: each rank's per-pair values, concatenated) is given, as TRL logs them."""
    gather = gather or (lambda t: t)
    chosen_logps, rejected_logps = logps.detach().chunk(2)
    chosen_rewards, rejected_rewards = (cfg.beta * (logps - ref_logps).detach()).chunk(2)
    return {"rewards/chosen": gather(chosen_rewards).mean().item(),
            "rewards/rejected": gather(rejected_rewards).mean().item(),
            "rewards/accuracies": gather((chosen_rewards > rejected_rewards).float()).mean().item(),
            "rewards/margins": gather(chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": gather(chosen_logps).mean().item(), "logps/rejected": gather(rejected_logps).mean().item()}


@torch.no_grad()
def reference_logps(model: nn.Module, batch: Mapping[str, torch.Tensor], ref_model: nn.Module | None = None,
                    fused: bool = True) -> torch.Tensor:
    """The reference's completion log-probs (2B,): precomputed in the batch, a separate frozen model, or (an
    adapter run) the same model with its adapter switched off: TRL + peft's `disable_adapter()`."""
    if "ref_chosen_logps" in batch:
        return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    if ref_model is not None:
        return completion_logps(ref_model, batch, fused)
    with disable_adapter(model):
        return completion_logps(model, batch, fused)


def dpo_step(cfg: DPOConfig, model: nn.Module, batch: Mapping[str, torch.Tensor], ref_model: nn.Module | None = None,
             fused: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch: (loss to backpropagate, TRL's metrics)."""
    logps = completion_logps(model, batch, fused)  # the policy first, then the reference, as TRL
    ref = reference_logps(model, batch, ref_model, fused)
    return dpo_loss(cfg, logps, ref, completion_lengths(batch)), dpo_metrics(cfg, logps, ref)


@torch.no_grad()
def precompute_ref_logps(model: nn.Module, rows: Sequence[dict], pad_token_id: int, cfg: DPOConfig,
                         batch_size: int, ref_model: nn.Module | None = None, fused: bool = True) -> list[dict]:
    """TRL's precompute_ref_log_probs: the reference's log-probs of every row, stored in the row (in batches of
    batch_size, as TRL's precompute_ref_batch_size), so training needs no reference forward."""
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id, cfg.max_length, cfg.truncation_mode).items()}
        ref = reference_logps(model, batch, ref_model, fused).cpu()
        out += [{**r, "ref_chosen_logps": c.item(), "ref_rejected_logps": j.item()}
                for r, c, j in zip(chunk, *ref.chunk(2))]
    return out

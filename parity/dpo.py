"""minillm.dpo and minillm.preference vs TRL 1.16's DPOTrainer: the same rows, batches, log-probs, losses,
gradients and logged metrics.

The reference is TRL's own trainer object, built on a tiny transformers model holding the same weights as the
minillm model (parity.lora.base_models), the bundled tokenizer and hypothesis-drawn preference rows (plain or
conversational, English and Chinese words, multi-turn prompts with or without a system turn, ties, empty
completions, prompts longer than max_length, both truncation modes). Its numbers are read where TRL makes them:
`train_dataset` (tokenised rows), `data_collator` (the batch), `compute_loss` (loss; `.backward()` gives the
gradients) and `_metrics["train"]` (what it logs). Per-sequence log-probs are its fused LM head's output summed
per sequence, the two lines of `DPOTrainer._compute_loss` that do it. The policy is the starting model with
every weight perturbed (the same perturbation on both sides), so that log-ratios, rewards and losses are not 0.

TRL's DPOConfig defaults `bf16=True` (autocast, also on a CPU); the rows run `bf16=False`: fp32 is the reference.
The loss types are changed on one trainer between measurements (`loss_types`, `label_smoothing` are what
`_compute_loss` reads), so one tokenisation serves all four.

Adapters: TRL is given the plain model and a peft config (then its reference is `disable_adapter()`); the
adapter's weights are randomised on the minillm side after both are wrapped and copied into TRL's PeftModel in
construction order (shapes checked), and minillm.dpo's reference is `minillm.peft.disable_adapter`.

    python -m parity.dpo [--budget B]      # this area alone, with its table
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from minillm import dpo, preference
from parity.harness import Row, format_table, property_rows
from parity.lora import Case, base_models
from parity.tolerances import TOLERANCES

REFERENCE = "TRL 1.16 DPOTrainer"


EN = "the sun is hot cold a model learns weights loss data token blue red answer question yes no".split()
ZH = list("太阳是热的冷模型学习数据问题答案红蓝")


def tokenizer():
    from transformers import AutoTokenizer

    from minillm.infra.corpus import TOKENIZER_DIR
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@dataclass
class Draw:
    rows: list
    max_length: int | None = 32
    truncation_mode: str = "keep_start"
    beta: float = 0.1
    label_smoothing: float = 0.2
    seed: int = 0


@st.composite
def texts(draw, lo: int = 0, hi: int = 8) -> str:
    zh = draw(st.booleans())
    words = draw(st.lists(st.sampled_from(ZH if zh else EN), min_size=lo, max_size=hi))
    return ("" if zh else " ").join(words) if not zh else "".join(words)


@st.composite
def preference_rows(draw) -> list:
    conversational = draw(st.booleans())
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        long_prompt = draw(st.integers(0, 5)) == 0  # now and then a prompt beyond max_length
        prompt = draw(texts(1, 40 if long_prompt else 8))
        chosen = draw(texts(0, 8))
        rejected = chosen if draw(st.integers(0, 5)) == 0 else draw(texts(0, 8))  # ties
        if not conversational:
            rows.append({"prompt": prompt, "chosen": " " + chosen if chosen else chosen, "rejected": rejected})
            continue
        turns = [{"role": "user", "content": prompt}]
        for _ in range(draw(st.integers(0, 2))):  # multi-turn prompts
            turns = [{"role": "user", "content": draw(texts(1, 4))}, {"role": "assistant", "content": draw(texts(1, 4))},
                     *turns]
        if draw(st.booleans()):
            turns = [{"role": "system", "content": draw(texts(1, 4))}, *turns]
        rows.append({"prompt": turns, "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


@st.composite
def draws(draw) -> Draw:
    return Draw(rows=draw(preference_rows()), max_length=draw(st.sampled_from([None, 16, 32, 64])),
                truncation_mode=draw(st.sampled_from(["keep_start", "keep_end"])),
                beta=draw(st.sampled_from([0.1, 0.5, 2.0])), label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.3])),
                seed=draw(st.integers(0, 3)))


@contextlib.contextmanager
def _quiet():
    """TRL's progress bars and warnings (datasets' map, the fused-head notices) off the table's output."""
    os.environ["TQDM_DISABLE"] = "1"
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        import datasets
        datasets.disable_progress_bars()
        yield


def trl_trainer(model, d: Draw, tok, ref_model=None, peft_config=None, precompute: bool = False,
                loss_type: str = "sigmoid"):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    with _quiet(), tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                         per_device_train_batch_size=max(1, len(d.rows)), max_length=d.max_length,
                         truncation_mode=d.truncation_mode, beta=d.beta, loss_type=[loss_type],
                         label_smoothing=d.label_smoothing, precompute_ref_log_probs=precompute)
        return DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=tok,
                          train_dataset=Dataset.from_list(d.rows), peft_config=peft_config)


def trl_logps(tr, batch) -> torch.Tensor:
    """Per-sequence completion log-probs as DPOTrainer._compute_loss makes them (its fused LM head, summed)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                       labels=labels, fused_lm_head=True)
    return out.log_probs[:, -(batch["input_ids"].shape[1] - 1):].sum(dim=1)


def _logp_weight(cfg: dpo.DPOConfig, ours, mb, ref_model=None) -> float:
    """max |d loss / d logp| over the sequences: the weight with which each sequence's log-prob gradient (a sum of
    per-token gradients of size ~1) enters the loss. Gradient rows divide |Δ| by it: a tied pair's true gradient is
    0, and what both sides compute is the rounding noise of two cancelling terms of this size (IPO's is ~200x
    sigmoid's: 2 (delta - 1/(2 beta)) / length vs beta / 2)."""
    with torch.no_grad():
        logps = dpo.completion_logps(ours, mb, fused=False)
        ref = dpo.reference_logps(ours, mb, ref_model, fused=False)
    x = logps.clone().requires_grad_()
    (g,) = torch.autograd.grad(dpo.dpo_loss(cfg, x, ref, dpo.completion_lengths(mb)), x)
    return float(g.abs().max()) or 1.0


def _max_abs(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _perturbed_pair(seed: int, vocab: int):
    """(policy ours, policy transformers, reference ours, reference transformers): the references hold the
    starting weights, the policies the same weights + the same noise."""
    ours, hf = base_models(Case(vocab=vocab), seed)
    ours_ref, hf_ref = copy.deepcopy(ours).eval(), copy.deepcopy(hf).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    hf.load_state_dict(ours.state_dict(), strict=False)
    return ours.train(), hf.train(), ours_ref, hf_ref


def _config(d: Draw, loss_type: str) -> dpo.DPOConfig:
    return dpo.DPOConfig(beta=d.beta, loss_type=loss_type, label_smoothing=d.label_smoothing,
                         max_length=d.max_length, truncation_mode=d.truncation_mode)


def _tokens_delta(tr, d: Draw, tok):
    """(|Δ| of the tokenised rows, |Δ| of the collated batch, TRL's batch, ours)."""
    mine, _ = preference.tokenize_rows(tok, d.rows, tok.eos_token, d.max_length, d.truncation_mode)
    theirs = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in tr.train_dataset]
    rows_delta = 0.0 if mine == theirs else 1.0
    if not theirs:
        return rows_delta, 0.0, None, None
    batch = tr.data_collator(list(tr.train_dataset))
    ours = preference.collate(mine or theirs, tok.pad_token_id, d.max_length, d.truncation_mode)
    same = batch.keys() >= ours.keys() and all(torch.equal(batch[k], ours[k]) for k in ours)
    return rows_delta, 0.0 if same else 1.0, batch, ours


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def measure(d: Draw, tok) -> list[float]:
    """[rows, batch, logps, fused logps, (loss, grads) per loss type, metrics, fused grads]."""
    ours, hf, ours_ref, hf_ref = _perturbed_pair(d.seed, len(tok))
    tr = trl_trainer(hf, d, tok, ref_model=hf_ref)
    rows_delta, batch_delta, batch, mb = _tokens_delta(tr, d, tok)
    if batch is None:  # every row dropped (prompt too long), on both sides: nothing more to compare
        return [rows_delta, batch_delta] + [0.0] * (3 + 2 * len(dpo.LOSS_TYPES))
    plain = dpo.completion_logps(ours, mb, fused=False)
    fused = dpo.completion_logps(ours, mb, fused=True, chunk_elems=len(tok) * 3)  # chunks of 3 rows
    out = [rows_delta, batch_delta, _max_abs(plain, trl_logps(tr, batch)),
           _max_abs(fused, plain) / max(1.0, float(plain.abs().max()))]
    metrics, fused_grads = 0.0, 0.0
    params = dict(ours.named_parameters())
    for loss_type in dpo.LOSS_TYPES:
        tr.loss_types, tr.loss_weights = [loss_type], [1.0]  # what _compute_loss reads
        tr._metrics["train"].clear()
        hf.zero_grad(), ours.zero_grad()
        with _quiet():
            theirs = tr.compute_loss(hf, batch)
        theirs.backward()
        mine, logged = dpo.dpo_step(_config(d, loss_type), ours, mb, ref_model=ours_ref, fused=False)
        mine.backward()
        weight = _logp_weight(_config(d, loss_type), ours, mb, ours_ref)
        grads = max(_max_abs(params[n].grad, p.grad) for n, p in hf.named_parameters() if p.grad is not None)
        out += [_max_abs(mine, theirs), grads / weight]
        metrics = max(metrics, *(abs(logged[k] - tr._metrics["train"][k][-1]) for k in METRICS))
        plain_grads = {n: p.grad.clone() for n, p in params.items()}
        ours.zero_grad()
        dpo.dpo_step(_config(d, loss_type), ours, mb, ref_model=ours_ref, fused=True)[0].backward()
        fused_grads = max(fused_grads, max(_max_abs(params[n].grad, g) for n, g in plain_grads.items()) / weight)
    return out + [metrics, fused_grads]


def _specs() -> list[tuple[str, str, str]]:
    specs = [("dpo tokenised rows", "TRL train_dataset", "dpo_tokens"),
             ("dpo batch + masks", "TRL DataCollatorForPreference", "dpo_tokens"),
             ("dpo logps per sequence", "TRL fused LM head", "dpo_logps"),
             ("dpo fused logps = plain (rel)", "minillm full logits", "dpo_fused")]
    for t in dpo.LOSS_TYPES:
        specs += [(f"dpo loss {t}", REFERENCE, "dpo_loss"), (f"dpo grads {t} (per dL/dlogp)", REFERENCE, "dpo_grads")]
    return specs + [("dpo metrics (6 logged)", "TRL _metrics", "dpo_metrics"),
                    ("dpo fused grads = plain", "minillm full logits", "dpo_fused_grads")]


# ---- precompute_ref_log_probs: TRL's precomputed columns and losses vs on-the-fly ----------------------
def measure_precompute(d: Draw, tok) -> list[float]:
    """TRL with precompute and no ref model takes the starting policy as reference: minillm's precomputed
    reference log-probs vs TRL's columns, and minillm's loss with them vs with a reference model forward."""
    ours, hf, _, _ = _perturbed_pair(d.seed, len(tok))
    tr = trl_trainer(hf, d, tok, precompute=True)
    mine, _ = preference.tokenize_rows(tok, d.rows, tok.eos_token, d.max_length, d.truncation_mode)
    if not mine:
        return [0.0, 0.0]
    cfg = _config(d, "sigmoid")
    ours.eval()  # TRL precomputes with the model as it was handed over
    pre = dpo.precompute_ref_logps(ours, mine, tok.pad_token_id, cfg, batch_size=len(mine),
                                   ref_model=copy.deepcopy(ours), fused=False)
    cols = torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in tr.train_dataset])
    ref_delta = _max_abs(torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in pre]), cols)
    on = dpo.dpo_step(cfg, ours, preference.collate(pre, tok.pad_token_id, d.max_length, d.truncation_mode),
                      fused=False)[0]
    off = dpo.dpo_step(cfg, ours, preference.collate(mine, tok.pad_token_id, d.max_length, d.truncation_mode),
                       ref_model=copy.deepcopy(ours), fused=False)[0]
    return [ref_delta, _max_abs(on, off)]


# ---- packed DPO (beyond TRL: its padding_free is unavailable in 1.16): packed rows = padded rows ----------
def measure_packed(d: Draw, tok) -> list[float]:
    """[logps, loss, grads] of minillm.dpo (sigmoid + ipo, fused log-probs) on the padded batch vs the same
    sequences packed into rows of max_length (dpo.pack_batch: positions restarting per sequence, no attention_mask).
    The fp32 per-sequence sums add the same terms in another order, so they agree to about an ulp of |logp|
    (~4e-6 at |logp| 30; also with a float64 model: the sums are fp32 by TRL's formula), which the loss scales by
    d loss / d logp (IPO's ~ 1 / (beta x length) ~ 2.5): logps relative to max |logp|, the loss per unit of
    max |d loss / d logp| x max |logp| (the same relative error), grads per unit of max |d loss / d logp| x
    max |d sum(logps) / d weight| (a tied pair's gradients cancel exactly only when both sequences are computed
    alike, as in a padded batch; packed, each side carries its own rounding, ~1e-7 of its gradient)."""
    ours, _, ours_ref, _ = _perturbed_pair(d.seed, len(tok))
    mine, _ = preference.tokenize_rows(tok, d.rows, tok.eos_token, d.max_length, d.truncation_mode)
    if not mine:
        return [0.0, 0.0, 0.0]
    cfg = dpo.DPOConfig(beta=d.beta, loss_type=("sigmoid", "ipo"), max_length=d.max_length,
                        truncation_mode=d.truncation_mode)
    padded = preference.collate(mine, tok.pad_token_id, d.max_length, d.truncation_mode)
    out = []
    for batch in (padded, dpo.pack_batch(padded, d.max_length)):
        ours.zero_grad()
        loss = dpo.dpo_step(cfg, ours, batch, ref_model=ours_ref)[0]
        loss.backward()
        out.append((dpo.completion_logps(ours, batch).detach(), loss, [p.grad.clone() for p in ours.parameters()]))
    (la, a, ga), (lb, b, gb) = out
    weight, size = _logp_weight(cfg, ours, padded, ours_ref), max(1.0, float(la.abs().max()))
    ours.zero_grad()
    dpo.completion_logps(ours, padded).sum().backward()  # the size of a sequence's log-prob gradient
    grad_size = max(float(p.grad.abs().max()) for p in ours.parameters())
    return [_max_abs(la, lb) / size, _max_abs(a, b) / weight / size,
            max(_max_abs(x, y) for x, y in zip(ga, gb)) / weight / grad_size]


# ---- adapters: the reference is the adapter switched off -------------------------------------------
METHODS = ("lora", "prompt", "prefix", "ia3")


def _adapter_configs(method: str):
    import peft

    from minillm.peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig
    from minillm.peft.ia3 import IA3Config
    if method == "lora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=3), peft.PromptTuningConfig(num_virtual_tokens=3,
                                                                                  task_type="CAUSAL_LM")
    if method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=3), peft.PrefixTuningConfig(num_virtual_tokens=3,
                                                                                  task_type="CAUSAL_LM")
    return (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                           task_type="CAUSAL_LM"))


def measure_adapter(method: str, d: Draw, tok) -> list[float]:
    """[loss, adapter grads, metrics] of a DPO step on an adapter model, the reference being the adapter off."""
    from minillm import peft as minipeft
    ours, hf = base_models(Case(vocab=len(tok)), d.seed)
    mine_cfg, peft_cfg = _adapter_configs(method)
    ours = minipeft.apply(ours, mine_cfg)
    tr = trl_trainer(hf, d, tok, peft_config=peft_cfg)
    mine_p = [p for p in ours.parameters() if p.requires_grad]
    theirs_p = [p for p in tr.model.parameters() if p.requires_grad]
    if [p.shape for p in mine_p] != [p.shape for p in theirs_p]:
        return [float("inf")] * 3
    g = torch.Generator().manual_seed(d.seed + 1)
    with torch.no_grad():  # adapter != identity: policy and reference differ
        for a, b in zip(mine_p, theirs_p):
            a.add_(0.1 * torch.randn(a.shape, generator=g))
            b.copy_(a)
    _, _, batch, mb = _tokens_delta(tr, d, tok)
    if batch is None:
        return [0.0] * 3
    tr.model.train(), ours.train()
    with _quiet():
        theirs = tr.compute_loss(tr.model, batch)
    theirs.backward()
    mine, logged = dpo.dpo_step(_config(d, "sigmoid"), ours, mb, fused=True)
    mine.backward()
    grads = max(_max_abs(a.grad, b.grad) for a, b in zip(mine_p, theirs_p)) / _logp_weight(_config(d, "sigmoid"), ours, mb)
    metrics = max(abs(logged[k] - tr._metrics["train"][k][-1]) for k in METRICS)
    return [_max_abs(mine, theirs), grads, metrics]


def rows(budget: float = 1.0) -> list[Row]:
    tok = tokenizer()
    n = max(1, round(6 * budget))
    out = property_rows(_specs(), draws(), lambda d: measure(d, tok), n)
    out += property_rows([("dpo precompute_ref_log_probs: ref logps", "TRL precomputed columns", "dpo_logps"),
                          ("dpo precompute on = off (loss)", "minillm with a reference forward", "dpo_precompute")],
                         draws(), lambda d: measure_precompute(d, tok), max(1, n // 2))
    padded = "minillm padded batch"
    out += property_rows([("dpo packed = padded: logps (rel)", padded, "dpo_fused"),
                          ("dpo packed = padded: loss (rel, per dL/dlogp)", padded, "dpo_fused"),
                          ("dpo packed = padded: grads (rel, per dL/dlogp)", padded, "dpo_fused_grads")],
                         draws(), lambda d: measure_packed(d, tok), max(1, n // 2))
    for method in METHODS:
        out += property_rows([(f"dpo {method}: loss, ref = adapter off", f"{REFERENCE} + peft", "dpo_loss"),
                              (f"dpo {method}: adapter grads (per dL/dlogp)", f"{REFERENCE} + peft", "dpo_grads"),
                              (f"dpo {method}: metrics", f"{REFERENCE} + peft", "dpo_metrics")],
                             draws(), lambda d, m=method: measure_adapter(m, d, tok), max(1, n // 2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.dpo", description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1.0, help="multiplier on the number of drawn configs")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    table = rows(args.budget)
    print(format_table(table))
    failed = [r for r in table if r.verdict == "FAIL"]
    print(f"\n{len(table) - len(failed)}/{len(table)} checks passed in {time.perf_counter() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

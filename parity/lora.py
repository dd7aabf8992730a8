"""minillm.peft.lora vs peft: same base weights, same A/B, same outputs, gradients and merged weights.

The minillm side is `minillm.CausalLM` + `minillm.peft.lora.apply_lora`; the reference is the transformers
model of the same architecture holding the same state dict (`load_state_dict(strict=True)`) +
`peft.get_peft_model`. Adapter weights are randomised on the peft side (B = 0 would hide most bugs)
and copied over by name: peft's `X.lora_A.default.weight` is minillm's `X.lora_A.weight`.

Rows: property checks over hypothesis-drawn cases (model shape and type, r, alpha, targets incl. a
tied lm_head, rsLoRA, DoRA, modules_to_save, dropout > 0 in eval mode or in train mode under the
same seed), fixed named variants, activation checkpointing (re-entrant and not, frozen embeddings:
grads vs peft under transformers' checkpointing, and vs minillm without it), and file interop both
ways (adapter trained with one library, saved, loaded by the other; merge -> save_pretrained -> plain
transformers load).

One deliberate difference: LoRA on a tied lm_head. peft 0.21 merges into the weight it shares with
embed_tokens (warning that this "can lead to complications" and advising to untie first), so its
merged model differs from its unmerged one; minillm unties by itself. The merged rows untie peft's
lm_head before its merge (its advice), and a separate row checks minillm's merged == unmerged.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from minillm import peft as peft_format
from minillm.peft import lora as ml
from parity.harness import Row, fixed_check, named_check, property_rows
from parity.model import hf_copy


REFERENCE = "peft LoRA on transformers"
TARGET_SETS = {
    "qv": None,  # LoraConfig default: ["q_proj", "v_proj"]
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp-suffix": ["mlp.gate_proj", "up_proj", "down_proj"],  # dotted suffix and plain names
    "regex": r".*\.layers\.0\.self_attn\.(q|k)_proj",
    "all-linear": "all-linear",
    "qv+lm_head": ["q_proj", "v_proj", "lm_head"],  # lm_head may be tied to embed_tokens
    "qv+embed_tokens": ["q_proj", "v_proj", "embed_tokens"],  # LoRA on nn.Embedding (lora_embedding_A/B)
}


@dataclass(frozen=True)
class Case:
    model_type: str = "llama"
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    inter: int = 40
    vocab: int = 64
    tie: bool = False
    r: int = 4
    alpha: int = 8
    targets: str = "qv"
    modules_to_save: tuple[str, ...] = ()
    rslora: bool = False
    dora: bool = False
    dropout: float = 0.0
    train: bool = False  # train mode: dropout active, both sides seeded the same (same masks, same order)
    ckpt: str = ""  # "", "reentrant", "non-reentrant": activation checkpointing on both sides (train mode)


def _lora_config(case: Case) -> ml.LoraConfig:
    return ml.LoraConfig(r=case.r, lora_alpha=case.alpha, lora_dropout=case.dropout,
                         target_modules=TARGET_SETS[case.targets], use_rslora=case.rslora,
                         modules_to_save=list(case.modules_to_save) or None, use_dora=case.dora)


def _peft_config(case: Case):
    import peft
    c = _lora_config(case)
    return peft.LoraConfig(r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=c.target_modules,
                           use_rslora=c.use_rslora, modules_to_save=c.modules_to_save, use_dora=c.use_dora,
                           task_type="CAUSAL_LM")


def base_models(case: Case, seed: int = 0):
    """(minillm.CausalLM, transformers model) with identical weights, fp32, eager attention."""
    from minillm.config import ModelConfig
    from minillm.model import CausalLM

    cfg = ModelConfig(model_type=case.model_type, vocab_size=case.vocab, hidden_size=case.hidden,
                      intermediate_size=case.inter, num_hidden_layers=case.layers, num_attention_heads=case.heads,
                      num_key_value_heads=case.kv_heads, tie_word_embeddings=case.tie)
    torch.manual_seed(seed)
    ours = CausalLM(cfg, attn_implementation="eager", fused=False)  # exact path: logits compared
    return ours, hf_copy(ours, "eager")


def peft_to_minillm_name(name: str) -> str | None:
    """peft's parameter name -> minillm's; None for peft's frozen copies (base_layer, original_module)."""
    name = name.removeprefix("base_model.model.")
    if ".original_module." in name:
        return None
    name = name.replace(".modules_to_save.default.", ".")
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
    name = name.removesuffix(".default")  # lora_embedding_A.default is a ParameterDict entry, no ".weight"
    return name.replace(".default.", ".")


def lora_pair(case: Case, seed: int = 0):
    """(ours, peft model), adapters applied, peft's adapter weights randomised and copied into ours."""
    import peft
    ours, ref = base_models(case, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(ref, _peft_config(case))
        ml.apply_lora(ours, _lora_config(case), verbose=False)  # both warn about a tied lm_head target
    g = torch.Generator().manual_seed(seed + 1)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            mine[peft_to_minillm_name(n)].copy_(p)
    return ours, pm


def _inputs(case: Case, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2)
    return torch.randint(0, case.vocab, (2, 7), generator=g)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def tied_lm_head_target(case: Case) -> bool:
    targets = TARGET_SETS[case.targets]
    saved = case.modules_to_save  # a saved lm_head is not a LoRA target; a saved embed_tokens is untied anyway
    return case.tie and isinstance(targets, list) and "lm_head" in targets and not saved


def tied_embedding_target(case: Case) -> bool:
    targets = TARGET_SETS[case.targets]
    return case.tie and isinstance(targets, list) and "embed_tokens" in targets and not case.modules_to_save


def enable_checkpointing(ours, pm, mode: str) -> None:
    """Activation checkpointing on both sides as the HF Trainer enables it (model.activation_checkpointing_enable)."""
    kwargs = {"use_reentrant": mode == "reentrant"}
    ours.activation_checkpointing_enable(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.base_model.model.activation_checkpointing_enable(kwargs)


def measure_all(case: Case, seed: int = 0) -> dict[str, float]:
    """max |Δ| of logits, of every trainable parameter's gradient, and of the merged weights and logits."""
    ours, pm = lora_pair(case, seed)
    x = _inputs(case, seed)
    with torch.no_grad():  # eval: dropout > 0 must then be inactive on both sides
        ours.eval(), pm.eval()
        eval_delta = _max_abs(ours(x).logits, pm(input_ids=x).logits)
    if case.ckpt:
        enable_checkpointing(ours, pm, case.ckpt)
    if case.train or case.ckpt:
        ours.train(), pm.train()
    torch.manual_seed(seed + 4)  # the same dropout masks on both sides (drawn in the same order)
    out_o = ours(x, labels=x)
    torch.manual_seed(seed + 4)
    out_r = pm(input_ids=x, labels=x)
    logits = max(eval_delta, _max_abs(out_o.logits, out_r.logits))
    out_o.loss.backward()
    out_r.loss.backward()
    ref_grads = {peft_to_minillm_name(n): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    if set(ref_grads) != set(our_grads) or any(g is None for g in [*ref_grads.values(), *our_grads.values()]):
        grads = float("inf")  # not the same trainable parameters: fail loudly
    else:
        grads = max(_max_abs(our_grads[n], ref_grads[n]) for n in our_grads)
    if tied_lm_head_target(case):
        # peft would merge into the weight lm_head shares with embed_tokens, moving the embedding too; untie its
        # lm_head first, as peft's own warning advises. minillm does that by itself (module docstring).
        lm_head = pm.base_model.model.lm_head.base_layer
        lm_head.weight = torch.nn.Parameter(lm_head.weight.detach().clone(), requires_grad=False)
    if tied_embedding_target(case):  # the same for a LoRA on a tied embed_tokens: lm_head keeps the plain table
        emb = pm.base_model.model.model.embed_tokens.base_layer
        emb.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_ref_model = pm.merge_and_unload()
        merged_model = ml.merge_and_unload(ours)
    merged_ref, merged_ours = merged_ref_model.state_dict(), merged_model.state_dict()
    if set(merged_ref) != set(merged_ours):
        merged = float("inf")
    else:
        merged = max(_max_abs(merged_ours[k], merged_ref[k]) for k in merged_ours)
    with torch.no_grad():  # and the merged models' logits (a merge that moved a tied embedding shows here)
        merged_model.eval(), merged_ref_model.eval()
        merged = max(merged, _max_abs(merged_model(x).logits, merged_ref_model(x).logits))
    return {"logits": logits, "grads": grads, "merged": merged}


@st.composite
def cases(draw) -> Case:
    heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([8, 12, 16]))
    targets = draw(st.sampled_from(sorted(TARGET_SETS)))
    mts = draw(st.sampled_from([(), ("lm_head",), ("embed_tokens",), ("lm_head", "embed_tokens")]))
    return Case(
        model_type=draw(st.sampled_from(["llama", "qwen2", "qwen3"])),
        hidden=heads * head_dim, heads=heads, kv_heads=draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
        layers=draw(st.integers(1, 2)), inter=draw(st.sampled_from([24, 40, 64])),
        vocab=draw(st.sampled_from([64, 97])),
        tie=draw(st.booleans()), r=draw(st.integers(1, 8)), alpha=draw(st.sampled_from([1, 4, 8, 16, 32])),
        targets=targets,  # DoRA's embedding variant is not implemented in minillm (refused)
        modules_to_save=mts, rslora=draw(st.booleans()), dora=draw(st.booleans()) and "embed" not in targets,
        dropout=draw(st.sampled_from([0.0, 0.1])), train=draw(st.booleans()),
    )


NAMED = {
    "q/v (default)": Case(),
    "rslora r=8": Case(r=8, alpha=16, rslora=True),
    "dora attn": Case(targets="attn", dora=True),
    "all-linear + lm_head, embed_tokens": Case(targets="all-linear", modules_to_save=("lm_head", "embed_tokens")),
    "dora all-linear + lm_head, qwen2": Case(model_type="qwen2", targets="all-linear", dora=True,
                                             modules_to_save=("lm_head",)),
    "regex, qwen3, dropout 0.1 (eval)": Case(model_type="qwen3", targets="regex", dropout=0.1),
    "mlp suffixes, tied, dora+rslora": Case(targets="mlp-suffix", tie=True, dora=True, rslora=True),
    "tied lm_head targeted": Case(targets="qv+lm_head", tie=True, train=True),
    "tied lm_head targeted, dora, qwen3": Case(model_type="qwen3", targets="qv+lm_head", tie=True, dora=True),
    "train mode dropout 0.2, dora all-linear": Case(targets="all-linear", dora=True, dropout=0.2, train=True),
    "embed_tokens + q/v, train, dropout 0.1": Case(targets="qv+embed_tokens", train=True, dropout=0.1),
    "embed_tokens tied, rslora, qwen3": Case(model_type="qwen3", targets="qv+embed_tokens", tie=True, rslora=True),
}

# Activation checkpointing with frozen embeddings (nothing before the first layer requires grad) in both
# torch modes; dropout active in train mode, so the recomputation must replay the same masks.
CKPT = {
    f"{mode}, {label}": Case(ckpt=mode, **kw)
    for mode in ("reentrant", "non-reentrant")
    for label, kw in (("q/v", {}),
                      ("all-linear dora + lm_head saved, dropout 0.1", dict(targets="all-linear", dora=True,
                                                                             modules_to_save=("lm_head",),
                                                                             dropout=0.1)))
}


TIED = {
    "q/v + lm_head": Case(targets="qv+lm_head", tie=True),
    "dora q/v + lm_head, qwen3": Case(model_type="qwen3", targets="qv+lm_head", tie=True, dora=True),
    "rslora q/v + lm_head, qwen2, vocab 97": Case(model_type="qwen2", targets="qv+lm_head", tie=True, rslora=True,
                                                  vocab=97),
    "q/v + embed_tokens": Case(targets="qv+embed_tokens", tie=True),
}


def merge_gap(case: Case, seed: int = 0) -> float:
    """minillm's logits after merge_and_unload vs before: max |Δ| (merging into a tied weight moved the embedding
    by the whole update before minillm untied it: |Δ| ~ 1)."""
    ours, _ = lora_pair(case, seed)
    x = _inputs(case, seed)
    ours.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unmerged = ours(x).logits
        return _max_abs(ml.merge_and_unload(ours)(x).logits, unmerged)


def ckpt_vs_plain(case: Case, seed: int = 0) -> float:
    """minillm with checkpointing vs without: max |Δ| over loss and every trainable gradient (exact expected)."""
    ours, _ = lora_pair(case, seed)
    x = _inputs(case, seed)
    ours.train()
    results = []
    for mode in ("", case.ckpt):
        if mode:
            ours.activation_checkpointing_enable({"use_reentrant": mode == "reentrant"})
        ours.zero_grad(set_to_none=True)
        torch.manual_seed(seed + 4)
        loss = ours(x, labels=x).loss
        loss.backward()
        grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
        if any(g is None for g in grads.values()):
            return float("inf")  # a LoRA weight the checkpointed backward did not reach
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    return max(_max_abs(l0, l1), *(_max_abs(g0[n], g1[n]) for n in g0))


# ---------------------------------------------------------------------------------------------------------
# interop through files


def _train(model, case: Case, steps: int = 3, seed: int = 0) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(seed + 3)
    for _ in range(steps):
        x = torch.randint(0, case.vocab, (2, 9), generator=g)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def minillm_to_peft(case: Case, seed: int = 0) -> float:
    """Adapter trained with minillm, saved by save_adapter, loaded by peft on the HF model: logits |Δ|."""
    import peft
    ours, ref = base_models(case, seed)
    ml.apply_lora(ours, _lora_config(case), verbose=False)
    _train(ours, case, seed=seed)
    x = _inputs(case, seed)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_format.save_adapter(ours, d)
        pm = peft.PeftModel.from_pretrained(ref, d).eval()
        with torch.no_grad():
            return _max_abs(ours(x).logits, pm(input_ids=x).logits)


def peft_to_minillm(case: Case, seed: int = 0) -> float:
    """Adapter trained with peft, saved by save_pretrained, loaded by minillm's load_adapter: logits |Δ|."""
    import peft
    ours, ref = base_models(case, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(ref, _peft_config(case))
        _train(pm, case, seed=seed)
    x = _inputs(case, seed)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(d)
        peft_format.load_adapter(ours, d)
        ours.eval()
        with torch.no_grad():
            return _max_abs(ours(x).logits, pm(input_ids=x).logits)


def merged_to_transformers(case: Case, seed: int = 0) -> float:
    """minillm adapter trained, merge_and_unload, save_pretrained, plain transformers load: logits |Δ| vs unmerged."""
    import transformers
    ours, _ = base_models(case, seed)
    ml.apply_lora(ours, _lora_config(case), verbose=False)
    _train(ours, case, seed=seed)
    x = _inputs(case, seed)
    with torch.no_grad():
        unmerged = ours(x).logits
    merged = ml.merge_and_unload(ours)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
        with torch.no_grad():
            return _max_abs(unmerged, hf(x).logits)


INTEROP = {
    "q/v": Case(),
    "dora all-linear + lm_head": Case(targets="all-linear", dora=True, modules_to_save=("lm_head",)),
    "rslora regex qwen3, tied + lm_head": Case(model_type="qwen3", targets="regex", rslora=True, tie=True,
                                               modules_to_save=("lm_head",), dropout=0.1),
    "tied lm_head targeted": Case(targets="qv+lm_head", tie=True),
    "embed_tokens targeted, tied": Case(targets="qv+embed_tokens", tie=True),
}


def init_same_seed(case: Case, seed: int = 0) -> float:
    """Same seed before peft.get_peft_model and apply_lora: the random A matrices must be identical."""
    import peft
    ours, ref = base_models(case, seed)
    torch.manual_seed(seed + 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(ref, _peft_config(case))
    torch.manual_seed(seed + 10)
    ml.apply_lora(ours, _lora_config(case), verbose=False)
    theirs = {peft_to_minillm_name(n): p for n, p in pm.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    if set(theirs) != set(mine):
        return float("inf")
    return max(_max_abs(mine[n], theirs[n]) for n in mine)


def _fixed(check: str, tol_name: str, fn, named: dict[str, Case], reference: str = REFERENCE) -> Row:
    return named_check(check, reference, tol_name, fn, named)


def rows(budget: float = 1.0):
    n = max(2, round(8 * budget))
    specs = [("lora logits (drawn cases)", REFERENCE, "lora_logits"),
             ("lora grads of A, B, m, saved modules", REFERENCE, "lora_grads"),
             ("lora merged weights (drawn cases)", REFERENCE, "lora_merged")]
    yield from property_rows(specs, cases(), lambda c: list(measure_all(c).values()), n)
    named = NAMED if budget >= 1 else dict(list(NAMED.items())[2:5])
    results = {}
    t0 = time.perf_counter()
    for label, case in named.items():
        results[label] = measure_all(case)
    secs = (time.perf_counter() - t0) / 3
    for key, tol_name in (("logits", "lora_logits"), ("grads", "lora_grads"), ("merged", "lora_merged")):
        row = fixed_check(f"lora {key}: {len(named)} named variants", REFERENCE, tol_name,
                          [r[key] for r in results.values()])
        row.seconds = secs
        yield row
    ckpt = CKPT if budget >= 1 else {k: v for k, v in CKPT.items() if "dora" in k}
    t0 = time.perf_counter()
    ckpt_results = {label: measure_all(case)["grads"] for label, case in ckpt.items()}
    yield fixed_check(f"lora grads, activation checkpointing ({len(ckpt)} cases)", REFERENCE + " + checkpointing",
                      "lora_grads", list(ckpt_results.values()), t0=t0)
    yield _fixed("lora loss+grads: checkpointing == none", "lora_ckpt", ckpt_vs_plain, ckpt,
                 "minillm without checkpointing")
    yield _fixed("lora on tied lm_head: merged == unmerged", "lora_merge_gap", merge_gap, TIED,
                 "minillm unmerged")
    yield _fixed("lora init: same seed -> same A as peft", "lora_init", init_same_seed,
                 {"all-linear dora": NAMED["dora all-linear + lm_head, qwen2"], "q/v": Case(),
                  "embed_tokens (B ~ N(0, 1))": Case(targets="qv+embed_tokens")})
    interop = INTEROP if budget >= 1 else dict(list(INTEROP.items())[1:2])
    yield _fixed("adapter minillm -> peft (trained, saved)", "lora_logits", minillm_to_peft, interop,
                 "peft.PeftModel.from_pretrained")
    yield _fixed("adapter peft -> minillm (trained, saved)", "lora_logits", peft_to_minillm, interop,
                 "peft save_pretrained")
    yield _fixed("merge -> save_pretrained -> transformers", "lora_merged", merged_to_transformers, interop,
                 "unmerged adapter vs transformers load")

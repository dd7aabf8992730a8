"""Step cases for the other PEFT methods: prompt tuning, prefix tuning (without and with the projection) and
Houlsby adapters, measured exactly as lora_qv / lora_all (train.py: one child process per side, stepped in turn,
same weights, same batch, same AdamW on the trainable tensors; peak = VmHWM over the post-build baseline).
LoRA on embed_tokens is a plain LoRA case (`lora_embed`, train.LORA_TARGETS["embed"]).

Both sides start from the same weights: the base model comes from train._build (minillm's init, seed 0, loaded
on each side), then each side constructs its prompt/prefix encoder right after `torch.manual_seed(10)`, in
the same order as peft, so the initial tensors are equal (parity/peft_methods.py's "same seed" row checks
exactly that on drawn configs; here the first step's loss agreeing to 1e-5 and the last to 1e-3 check it).

Houlsby adapters: peft 0.21 has none. The reference is minillm's own LoRA on q_proj + v_proj (r=8, the
lora_qv build) on the same frozen base, at a matched trainable budget (bottleneck m = 8: 34,880 vs 28,672
parameters at the small preset): what the adapter costs per step next to the method one would use instead.
Both are the identity at init (W_up = 0, B = 0), so their first losses agree; later ones differ by design,
and the trainable counts differ, so "same output" is the first loss only. No target (the issue's targets
are vs peft).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

P = 16  # virtual tokens for prompt and prefix tuning (T = 256 real tokens)
HOULSBY_BOTTLENECK = 8  # m, matched to lora_qv's r = 8 (see the docstring)


class Method(NamedTuple):
    reference: str  # what the reference side runs (bench.json "reference")
    same_model: bool  # both sides train the same model (else "same output" = the first loss only)


METHODS: dict[str, Method] = {
    "prompt_tuning": Method("peft PromptTuningConfig (RANDOM init) on transformers", True),
    "prefix_tuning": Method("peft PrefixTuningConfig(prefix_projection=False) on transformers", True),
    "prefix_proj": Method("peft PrefixTuningConfig(prefix_projection=True) on transformers", True),
    "houlsby": Method("minillm LoRA q_proj + v_proj, r=8 (peft has no adapter tuning)", False),
}


def build(side: str, cfg, weights: str, method: str) -> torch.nn.Module:
    """One side's trainable model for `method` on the bench's base weights (called in the child process)."""
    from parity.bench.train import _build

    if method == "houlsby":
        if side == "reference":  # minillm's LoRA q_proj + v_proj, exactly lora_qv's minillm side
            return _build("minillm", cfg, weights, "qv")
        from minillm.peft.houlsby import HoulsbyConfig, apply_adapters
        model = _build("minillm", cfg, weights, None)
        torch.manual_seed(1)
        return apply_adapters(model, HoulsbyConfig(bottleneck=HOULSBY_BOTTLENECK), verbose=False).float().train()
    if method not in METHODS:
        raise ValueError(f"unknown PEFT method case {method!r}; cases are {', '.join(METHODS)}")
    model = _build(side, cfg, weights, None)
    prompt = method == "prompt_tuning"
    torch.manual_seed(10)  # same seed before each side's encoder: same initial tensors (peft_methods "same seed")
    if side == "minillm":
        if prompt:
            from minillm.peft.prompt import PromptTuningConfig, PromptTuningLM
            model = PromptTuningLM(model, PromptTuningConfig(num_virtual_tokens=P))
        else:
            from minillm.peft.prefix import PrefixTuningConfig, PrefixTuningLM
            model = PrefixTuningLM(model, PrefixTuningConfig(num_virtual_tokens=P,
                                                             prefix_projection=method == "prefix_proj"))
    else:
        import peft
        config = (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P) if prompt else
                  peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                          prefix_projection=method == "prefix_proj"))
        model = peft.get_peft_model(model, config)
    return model.float().train()

"""Generation case, in this process: CausalLM.generate vs transformers' generate, greedy."""

from __future__ import annotations

import torch

from minillm.config import ModelConfig
from parity.bench.measure import alternate

GEN = dict(cfg=ModelConfig.preset("small"), B=1, prompt=16, new=64, reps=5)


def generate_case(quick: bool, threads: int) -> dict:
    import transformers
    from minillm.model import CausalLM
    from parity.model import hf_copy

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    g = dict(GEN, new=8, reps=2) if quick else dict(GEN)
    cfg = g["cfg"]
    torch.manual_seed(0)
    ours = CausalLM(cfg).eval()
    ref = hf_copy(ours, "sdpa").eval()
    prompt = torch.randint(0, cfg.vocab_size, (g["B"], g["prompt"]), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        timed = alternate({"minillm": lambda: ours.generate(prompt, max_new_tokens=g["new"], attention_mask=mask),
                            "reference": lambda: ref.generate(prompt, attention_mask=mask, max_new_tokens=g["new"],
                                                              do_sample=False, pad_token_id=0)}, g["reps"])
        (t_ml, a), (t_ref, b) = timed["minillm"], timed["reference"]
    new = g["B"] * g["new"]
    return {"config": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size,
                       "B": g["B"], "prompt": g["prompt"], "new_tokens": g["new"], "reps": g["reps"]},
            "reference": "transformers generate(do_sample=False), sdpa, its default cache",
            "tokens_s": {"minillm": new / t_ml, "reference": new / t_ref},
            "same_output": bool(a.shape == b.shape and torch.equal(a, b)),
            "lengths": {"minillm": a.shape[1], "reference": b.shape[1]}}

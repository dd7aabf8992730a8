"""Train and LoRA step cases: minillm vs transformers (and peft), one child process per side."""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from minillm.config import ModelConfig
from parity.bench.measure import Child, memory_baseline, peak_since_baseline, run_pair
from parity.bench.peft_methods import METHODS

# name -> (config, batch, time steps); `quick` shrinks batch and steps, never the config.
TRAIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(cfg=ModelConfig.preset("tiny"), B=4, T=128, reps=20, warmup=3),
    # the case: Llama, 4 layers, hidden 256, vocab 32000 (~19M parameters); B4 x T256 so that
    # batch x seq >= 1024, where the memory target applies (the timing note was at B2 x T256)
    "v32k": dict(cfg=ModelConfig.preset("small", vocab_size=32000), B=4, T=256, reps=6, warmup=2),
    "h512": dict(cfg=ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024),
                 B=2, T=256, reps=6, warmup=2),
    # Qwen's vocabulary, where the fused loss matters most: lm_head + cross-entropy are ~95% of a step's
    # ~2 TFLOP (tens of seconds on 2 cores: few reps). B x T = 4,096 tokens; the unfused logits alone are
    # 4096 x 151936 x 4 B = 2.3 GiB. `loss_only`: also the loss's own memory (StepWorker.loss_only).
    # `quick_cfg`: --quick keeps the vocabulary but not the hidden size, so the test stays fast.
    "v152k": dict(cfg=ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=512, intermediate_size=1408,
                                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                  max_position_embeddings=1024),
                  quick_cfg=ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
                  B=4, T=1024, reps=3, warmup=1, loss_only=True),
}
LORA_SIZE = dict(cfg=ModelConfig.preset("small"), B=2, T=256, reps=8, warmup=2)
# None: both libraries' default for llama, q_proj + v_proj; "embed": LoRA on nn.Embedding (peft's lora_embedding_A/B)
LORA_TARGETS = {"qv": None, "all": "all-linear", "embed": ["embed_tokens"]}

FLOP_FORMULA = ("6 * (nn.Linear weights incl. lm_head, excl. embedding) * tokens + 12 * layers * T * heads * "
                "head_dim * tokens; rate / matmul rate = best torch.mm GFLOP/s of 10 runs on 1024^2 and 2048^2 "
                "fp32, measured at start, after the steps and at the end, highest taken")
OPTIMIZER = "torch.optim.AdamW(trainable params, lr=1e-4, fused=True), zero_grad(set_to_none=True), both sides"


def _batch(cfg: ModelConfig, B: int, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels = ids.clone()
    # what the Trainer passes with a model that accepts loss kwargs: labels != -100 over labels[..., 1:]
    n_items = (labels[..., 1:] != -100).sum()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "num_items_in_batch": n_items}


def _build(side: str, cfg: ModelConfig, weights: str, lora: str | None) -> torch.nn.Module:
    from safetensors.torch import load_file

    if side == "minillm":
        from minillm.model import CausalLM
        model = CausalLM(cfg)
        model.load_state_dict(load_file(weights), strict=True, assign=True)
        if lora is not None:
            from minillm.peft.lora import LoraConfig, apply_lora
            torch.manual_seed(1)
            apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS[lora]), verbose=False)
    else:
        import transformers
        transformers.logging.set_verbosity_error()
        hf_config = transformers.AutoConfig.for_model(**cfg.to_hf())
        model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        model.load_state_dict(load_file(weights), strict=True, assign=True)
        if lora is not None:
            import peft
            torch.manual_seed(1)  # same seed, same draws: peft's A equals minillm's
            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS[lora],
                                                               task_type="CAUSAL_LM"))
    return model.float().train()


class StepWorker:
    """One side's model, optimizer and batch in a child process, stepped on command (see `child_main`)."""

    def __init__(self, side: str, job: dict):
        cfg = ModelConfig(**job["cfg"])
        if job.get("method"):  # prompt/prefix tuning, Houlsby adapters: parity/bench/peft_methods.py
            from parity.bench.peft_methods import build
            self.model = build(side, cfg, job["weights"], job["method"])
        else:
            self.model = _build(side, cfg, job["weights"], job.get("lora"))
        self.batch = _batch(cfg, job["B"], job["T"])
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, fused=True)
        self.side, self.job = side, job
        self.baseline = memory_baseline()

    def step(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(**self.batch)["loss"]
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0, loss.item()

    def result(self) -> dict:
        out = {"peak_bytes": peak_since_baseline(self.baseline), "baseline_bytes": self.baseline,
               "trainable": sum(p.numel() for p in self.params)}
        if self.job.get("loss_only"):
            out["loss_only"] = self.loss_only()
        return out

    def loss_only(self) -> dict:
        """The loss alone: lm_head + cross-entropy, forward + backward, from a fixed hidden state (B, T, C), as
        each side's model computes it (minillm: fused linear_cross_entropy; transformers: lm_head, then its
        loss_function on the full logits). Peak = VmHWM - VmRSS just before; d W (V x C) counts on both sides."""
        B, T, V = self.batch["input_ids"].shape + (self.job["cfg"]["vocab_size"],)
        weight = self.model.lm_head.weight
        h = torch.randn(B, T, weight.shape[1], generator=torch.Generator().manual_seed(1)).requires_grad_()
        labels, n_items = self.batch["labels"], self.batch["num_items_in_batch"]
        self.opt.zero_grad(set_to_none=True)
        if self.side == "minillm":
            from minillm.loss import linear_cross_entropy
            fn = lambda: linear_cross_entropy(h, weight, labels, n_items)
        else:  # what LlamaForCausalLM / Qwen2ForCausalLM.forward do with labels
            fn = lambda: self.model.loss_function(logits=self.model.lm_head(h), labels=labels, vocab_size=V,
                                                  num_items_in_batch=n_items)
        baseline = memory_baseline()
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()
        seconds = time.perf_counter() - t0
        peak = peak_since_baseline(baseline)
        self.opt.zero_grad(set_to_none=True)
        return {"peak_bytes": peak, "seconds": seconds, "loss": loss.item()}


def child_main(side: str, threads: int) -> None:
    """Line protocol on stdin/stdout: `job <json>` -> `ok`, `step` -> `<seconds> <loss>`, `done` -> `<json>`.

    The parent steps the two sides' children in turn (ABBA...), so load from other jobs on a shared
    machine falls on both sides alike, while each side's memory stays in its own process."""
    torch.set_num_threads(threads)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not break the protocol
    worker = None
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "job":
                worker = None
                gc.collect()
                worker = StepWorker(side, json.loads(arg))
                reply = "ok"
            elif cmd == "step":
                reply = "%r %r" % worker.step()
            elif cmd == "done":
                reply = json.dumps(worker.result())
                worker = None
            else:
                break
        except Exception as e:  # reported in the table, not fatal for the other cases
            reply = "error " + f"{type(e).__name__}: {e}".replace("\n", " ")
        out.write(reply + "\n")
        out.flush()


def linear_flops_per_token(cfg: ModelConfig, T: int) -> float:
    """Training FLOPs per token (see FLOP_FORMULA): 6 x Linear weights + 12 x layers x T x H x D."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    n_linear = cfg.num_hidden_layers * per_layer + h * cfg.vocab_size  # lm_head (tied or not: a matmul either way)
    return 6.0 * n_linear + 12.0 * cfg.num_hidden_layers * T * q


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def step_cases(names: list[str], quick: bool, threads: int, tmp: Path) -> dict[str, dict]:
    """Train and LoRA step cases: weights saved once per config, one child per side (per case unless quick)."""
    from safetensors.torch import save_file
    from minillm.model import CausalLM

    jobs: dict[str, dict] = {}
    cfgs: dict[str, ModelConfig] = {}
    for name in names:
        if name.startswith("train_"):
            size = dict(TRAIN_SIZES[name[len("train_"):]])
            lora = None
        elif name.startswith("lora_"):
            size, lora = dict(LORA_SIZE), name[len("lora_"):]
        else:  # a PEFT method case (parity/bench/peft_methods.py), at the LoRA cases' size
            size, lora = dict(LORA_SIZE), None
        if quick:
            size.update(B=1, T=32, reps=2, warmup=1, cfg=size.get("quick_cfg", size["cfg"]))
        cfg: ModelConfig = size["cfg"]
        cfgs[name] = cfg
        weights = tmp / f"{abs(hash(repr(cfg)))}.safetensors"
        if not weights.exists():
            torch.manual_seed(0)
            save_file(CausalLM(cfg).state_dict(), str(weights))
        init = {k: v for k, v in asdict(cfg).items() if k not in ("qkv_bias", "o_bias", "qk_norm")}
        jobs[name] = dict(cfg=init, B=size["B"], T=size["T"], reps=size["reps"], warmup=size["warmup"],
                          weights=str(weights), lora=lora, loss_only=size.get("loss_only", False),
                          method=None if name.startswith(("train_", "lora_")) else name)
    results: dict[str, dict[str, dict]] = {}
    children: dict[str, Child] | None = None
    for name in names:
        # a fresh pair of processes per case (clean memory figures); --quick reuses one pair for every case
        if children is None:
            children = {side: Child(side, threads) for side in ("minillm", "reference")}
        try:
            results[name] = run_pair(children, jobs[name])
        except RuntimeError as e:
            results[name] = {"minillm": {"error": str(e)}, "reference": {"error": str(e)}}
            for c in children.values():
                c.proc.kill()
            children = None
            continue
        if not quick:
            for c in children.values():
                c.close()
            children = None
    if children is not None:
        for c in children.values():
            c.close()

    out = {}
    for name in names:
        job, cfg = jobs[name], cfgs[name]
        a, b = results[name]["minillm"], results[name]["reference"]
        case: dict[str, Any] = {"config": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                                           "vocab": cfg.vocab_size, "heads": cfg.num_attention_heads,
                                           "kv_heads": cfg.num_key_value_heads, "intermediate": cfg.intermediate_size,
                                           "params": cfg.num_params(), "B": job["B"], "T": job["T"],
                                           "reps": job["reps"], "warmup": job["warmup"], "lora": job["lora"],
                                           "method": job["method"]},
                                "reference": "peft get_peft_model on transformers" if job["lora"] else "transformers"}
        method = METHODS[job["method"]] if job["method"] else None
        if method is not None:
            case["reference"] = method.reference
        if "error" in a or "error" in b:
            case.update(error=a.get("error") or b.get("error"), same_output=False)
            out[name] = case
            continue
        tokens = job["B"] * job["T"]
        ta, tb = statistics.median(a["times"]), statistics.median(b["times"])
        first, last = _rel(a["losses"][0], b["losses"][0]), _rel(a["losses"][-1], b["losses"][-1])
        case.update(
            step_s={"minillm": ta, "reference": tb}, step_s_all={"minillm": a["times"], "reference": b["times"]},
            tokens_s={"minillm": tokens / ta, "reference": tokens / tb},
            peak_mb={"minillm": a["peak_bytes"] / 2**20, "reference": b["peak_bytes"] / 2**20},
            baseline_mb={"minillm": a["baseline_bytes"] / 2**20, "reference": b["baseline_bytes"] / 2**20},
            trainable={"minillm": a["trainable"], "reference": b["trainable"]},
            # gradients + AdamW's two moments of the trainable fp32 parameters: a floor both sides share
            grads_adam_mb=3 * 4 * a["trainable"] / 2**20,
            loss_first={"minillm": a["losses"][0], "reference": b["losses"][0]},
            loss_rel_diff={"first": first, "last": last},
            # Houlsby vs LoRA: both the identity at init, so only the first loss must agree
            same_output=bool(first <= 1e-5 and (method is not None and not method.same_model
                                                or last <= 1e-3 and a["trainable"] == b["trainable"])),
        )
        if job["loss_only"]:
            la, lb = a["loss_only"], b["loss_only"]
            case["loss_only"] = {"peak_mb": {"minillm": la["peak_bytes"] / 2**20, "reference": lb["peak_bytes"] / 2**20},
                                 "seconds": {"minillm": la["seconds"], "reference": lb["seconds"]},
                                 "loss_rel_diff": _rel(la["loss"], lb["loss"])}
            case["same_output"] = case["same_output"] and case["loss_only"]["loss_rel_diff"] <= 1e-5
        if name.startswith("train_"):
            case["gflop_per_step"] = linear_flops_per_token(cfg, job["T"]) * tokens / 1e9  # rate: in main()
        out[name] = case
    return out


def profile(size: str, threads: int, rows: int = 25, side: str = "minillm") -> str:
    """torch.profiler table (top ops by self CPU time) of 3 train steps after 2 warm-up steps, on one side:
    minillm or transformers, same weights (minillm's init, seed 0) and batch as the bench."""
    import tempfile
    from safetensors.torch import save_file
    from torch.profiler import ProfilerActivity, profile as prof
    from minillm.model import CausalLM

    torch.set_num_threads(threads)
    s = TRAIN_SIZES[size]
    with tempfile.TemporaryDirectory(prefix="minillm-profile-") as tmp:
        torch.manual_seed(0)
        save_file(CausalLM(s["cfg"]).state_dict(), f"{tmp}/w.safetensors")
        model = _build(side, s["cfg"], f"{tmp}/w.safetensors", None)
    batch = _batch(s["cfg"], s["B"], s["T"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch)["loss"].backward()
        opt.step()

    for _ in range(2):
        step()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            step()
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)

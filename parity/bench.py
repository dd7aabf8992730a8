"""`python -m parity.bench`: minillm vs transformers/peft/datasets/the course, measured side by side in one run.

    python -m parity.bench                    # every case (a few minutes on 2 cores), table + bench.json
    python -m parity.bench --quick            # the same cases at toy sizes (< 1 min; what the test runs)
    python -m parity.bench --only train       # cases whose name starts with "train" (repeatable)
    python -m parity.bench --profile v32k     # torch.profiler table of minillm's train step (top ops by self CPU)

How it measures (also written into bench.json):
- Time: wall clock (`time.perf_counter`) per repetition after warm-up repetitions; the figure is the
  median. The two sides' repetitions alternate (ABBA order) in every case. Both sides run on the same machine in the same invocation, one after the other, with
  `torch.set_num_threads(--threads)` (default: min(2, cores)).
- Train / LoRA steps run in a fresh child process per side and case (`python -m parity.bench --child
  SIDE`; --quick reuses one per side), which the parent steps in turn (A B, B A, A B, ...) so that load
  from other jobs falls on both sides alike, while each side's memory is its own: after imports, model construction, weight loading and batch
  creation, the child frees what it can (`gc.collect`, glibc `malloc_trim`), records VmRSS as the
  baseline and resets the peak (`echo 5 > /proc/self/clear_refs`, Linux); after the warm-up and timed
  steps, peak = VmHWM - baseline (activations, gradients, AdamW state, temporaries). A child imports
  only its own side's libraries (the minillm child never imports transformers).
- Both sides get the same weights (minillm's init, seed 0, saved once with safetensors and loaded with
  `load_state_dict(assign=True)` on each side), the same batch (B x T random ids, labels = input_ids,
  attention_mask of ones), are called the way the HF Trainer calls them (`model(input_ids=,
  attention_mask=, labels=, num_items_in_batch=)`, loss taken from the output) and step the same
  optimizer: `torch.optim.AdamW(trainable params, lr=1e-4, fused=True)` (the Trainer's
  `adamw_torch_fused`; fused AdamW runs on CPU in torch >= 2.4). "Same output": the first step's loss
  agrees to 1e-5 (relative) and the last one to 1e-3.
- FLOP rate: 6 x (weights of every nn.Linear, lm_head included, embedding table excluded) x tokens
  + 12 x layers x T x (heads x head_dim) x tokens for attention scores and weighted sum (forward 4BT^2HD
  per layer, backward twice that; full T x T as in PaLM's MFU, not halved for causality), divided by the
  step time and by the machine's fp32 matmul rate measured in this run (GFLOP/s of the best of 10
  `torch.mm` runs on 1024^2 and 2048^2 fp32 squares, same thread count; measured at the start, after
  the steps and at the end, the highest taken: a peak capability, where step times are medians).
- Chunker, masker and generation run in this process (no memory figure), same input for both sides,
  outputs compared in the run.
Timings on a shared CPU are noisy; bench.json records the load average at start and end.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

# Before torch loads OpenMP: on a CPU shared with other jobs, OpenMP's default spin-waiting at every parallel
# region turns a descheduled thread into seconds-long stalls (measured: a 7 ms tiny step took 0.05-2 s with
# 2 threads under load 5). PASSIVE makes waiting threads sleep; same setting for both sides; override by env.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from minillm.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

# name -> (config, batch, time steps); `quick` shrinks batch and steps, never the config.
TRAIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(cfg=ModelConfig.preset("tiny"), B=4, T=128, reps=20, warmup=3),
    # the case: Llama, 4 layers, hidden 256, vocab 32000 (~19M parameters); B4 x T256 so that
    # batch x seq >= 1024, where the memory target applies (the timing note was at B2 x T256)
    "v32k": dict(cfg=ModelConfig.preset("small", vocab_size=32000), B=4, T=256, reps=6, warmup=2),
    "h512": dict(cfg=ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024),
                 B=2, T=256, reps=6, warmup=2),
}
LORA_SIZE = dict(cfg=ModelConfig.preset("small"), B=2, T=256, reps=8, warmup=2)
LORA_TARGETS = {"qv": None, "all": "all-linear"}  # None: both libraries' default for llama, q_proj + v_proj
GEN = dict(cfg=ModelConfig.preset("small"), B=1, prompt=16, new=64, reps=5)
CASES = ("train_tiny", "train_v32k", "train_h512", "lora_qv", "lora_all", "chunker", "chunker_stream", "masker",
         "generate")
TARGETS = {  # (metric, comparison, value) of the targets; ratios are minillm / reference
    "train_tiny": ("tokens/s", ">=", 1.5),
    "train_v32k": ("tokens/s", ">=", 1.1),
    "train_h512": ("tokens/s", ">=", 1.1),
    "lora_qv": ("step time", "<=", 1.0),
    "lora_all": ("step time", "<=", 1.0),
    "chunker": ("tokens/s", ">=", 10.0),
    "chunker_stream": ("tokens/s", ">=", 10.0),
    "masker": ("conversations/s", ">=", 5.0),
    "generate": ("tokens/s", ">=", 1.0),
}
MEMORY_TARGET = {"train_v32k": 0.6}  # peak memory minillm / transformers, at vocab >= 32k and B x T >= 1024
FLOP_TARGET = {"train_h512": 0.5}  # minillm's FLOP rate / matmul rate
MEMORY_METHOD = ("per side a fresh child process per case, the two stepped in turn; peak = VmHWM - VmRSS after imports, model construction, "
                 "weight load and batch creation (peak reset via /proc/self/clear_refs, after gc + malloc_trim)")
FLOP_FORMULA = ("6 * (nn.Linear weights incl. lm_head, excl. embedding) * tokens + 12 * layers * T * heads * "
                "head_dim * tokens; rate / matmul rate = best torch.mm GFLOP/s of 10 runs on 1024^2 and 2048^2 "
                "fp32, measured at start, after the steps and at the end, highest taken")
OPTIMIZER = "torch.optim.AdamW(trainable params, lr=1e-4, fused=True), zero_grad(set_to_none=True), both sides"


# ---------------------------------------------------------------------------------------------
# Process memory (Linux /proc)
# ---------------------------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _memory_baseline() -> int:
    """Free what can be freed, reset the peak-RSS counter, return the current RSS in bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so they are not reused unseen
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return _status_kb("VmRSS") * 1024


def _peak_since_baseline(baseline: int) -> int:
    return _status_kb("VmHWM") * 1024 - baseline


# ---------------------------------------------------------------------------------------------
# Train / LoRA step: one side per child process
# ---------------------------------------------------------------------------------------------

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
            from minillm.lora import LoraConfig, apply_lora
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
    """One side's model, optimizer and batch in a child process, stepped on command (see `_child_main`)."""

    def __init__(self, side: str, job: dict):
        cfg = ModelConfig(**job["cfg"])
        self.model = _build(side, cfg, job["weights"], job.get("lora"))
        self.batch = _batch(cfg, job["B"], job["T"])
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, fused=True)
        self.baseline = _memory_baseline()

    def step(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(**self.batch)["loss"]
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0, loss.item()

    def result(self) -> dict:
        return {"peak_bytes": _peak_since_baseline(self.baseline), "baseline_bytes": self.baseline,
                "trainable": sum(p.numel() for p in self.params)}


def _child_main(side: str, threads: int) -> None:
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


class _Child:
    def __init__(self, side: str, threads: int):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "parity.bench", "--child", side, "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env=env, cwd=Path(__file__).resolve().parents[1])

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def recv(self) -> str:
        reply = self.proc.stdout.readline().strip()
        if not reply:
            self.stderr.seek(0)
            tail = " | ".join(self.stderr.read().strip().splitlines()[-3:])
            raise RuntimeError(f"child exited {self.proc.poll()}: {tail}")
        if reply.startswith("error "):
            raise RuntimeError(reply[len("error "):])
        return reply

    def close(self) -> None:
        try:
            self.send("exit")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        self.proc.wait(timeout=60)
        self.stderr.close()


def _run_pair(children: dict[str, _Child], job: dict) -> dict[str, dict]:
    """Both sides build the job's model (concurrently), then step in turn: AB, BA, AB, ... ."""
    for c in children.values():
        c.send("job " + json.dumps(job))
    for c in children.values():
        c.recv()
    sides = list(children)
    times: dict[str, list[float]] = {s: [] for s in sides}
    losses: dict[str, list[float]] = {s: [] for s in sides}
    for i in range(job["warmup"] + job["reps"]):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            children[side].send("step")
            t, loss = map(float, children[side].recv().split())
            if i >= job["warmup"]:
                times[side].append(t)
            losses[side].append(loss)
    out = {}
    for side in sides:
        children[side].send("done")
        out[side] = dict(json.loads(children[side].recv()), times=times[side], losses=losses[side])
    return out


def linear_flops_per_token(cfg: ModelConfig, T: int) -> float:
    """Training FLOPs per token (see FLOP_FORMULA): 6 x Linear weights + 12 x layers x T x H x D."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    n_linear = cfg.num_hidden_layers * per_layer + h * cfg.vocab_size  # lm_head (tied or not: a matmul either way)
    return 6.0 * n_linear + 12.0 * cfg.num_hidden_layers * T * q


def matmul_gflops(threads: int, sizes: tuple[int, ...] = (1024, 2048), reps: int = 10) -> float:
    """The machine's fp32 matmul rate: torch.mm of n x n squares, best run of `reps` (the least disturbed
    one on a shared CPU: a peak capability, unlike the step times, which are medians), best size."""
    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            torch.mm(a, b)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n**3 / min(times) / 1e9)
    return best


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def step_cases(names: list[str], quick: bool, threads: int, tmp: Path) -> dict[str, dict]:
    """Train and LoRA step cases: weights saved once per config, one child per side (per case unless quick)."""
    from safetensors.torch import save_file
    from minillm.model import CausalLM

    jobs: dict[str, dict] = {}
    for name in names:
        if name.startswith("train_"):
            size = dict(TRAIN_SIZES[name[len("train_"):]])
            lora = None
        else:
            size, lora = dict(LORA_SIZE), name[len("lora_"):]
        if quick:
            size.update(B=1, T=32, reps=2, warmup=1)
        cfg: ModelConfig = size["cfg"]
        weights = tmp / f"{abs(hash(repr(cfg)))}.safetensors"
        if not weights.exists():
            torch.manual_seed(0)
            save_file(CausalLM(cfg).state_dict(), str(weights))
        init = {k: v for k, v in asdict(cfg).items() if k not in ("qkv_bias", "o_bias", "qk_norm")}
        jobs[name] = dict(cfg=init, B=size["B"], T=size["T"], reps=size["reps"], warmup=size["warmup"],
                          weights=str(weights), lora=lora)
    results: dict[str, dict[str, dict]] = {}
    children: dict[str, _Child] | None = None
    for name in names:
        # a fresh pair of processes per case (clean memory figures); --quick reuses one pair for every case
        if children is None:
            children = {side: _Child(side, threads) for side in ("minillm", "reference")}
        try:
            results[name] = _run_pair(children, jobs[name])
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
        job, cfg = jobs[name], TRAIN_SIZES.get(name[len("train_"):], LORA_SIZE)["cfg"]
        a, b = results[name]["minillm"], results[name]["reference"]
        case: dict[str, Any] = {"config": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                                           "vocab": cfg.vocab_size, "heads": cfg.num_attention_heads,
                                           "kv_heads": cfg.num_key_value_heads, "intermediate": cfg.intermediate_size,
                                           "params": cfg.num_params(), "B": job["B"], "T": job["T"],
                                           "reps": job["reps"], "warmup": job["warmup"], "lora": job["lora"]},
                                "reference": "peft get_peft_model on transformers" if job["lora"] else "transformers"}
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
            same_output=bool(first <= 1e-5 and last <= 1e-3 and a["trainable"] == b["trainable"]),
        )
        if name.startswith("train_"):
            case["gflop_per_step"] = linear_flops_per_token(cfg, job["T"]) * tokens / 1e9  # rate: in main()
        out[name] = case
    return out


# ---------------------------------------------------------------------------------------------
# Chunker: minillm.chunk vs transformers' run_clm group_texts through datasets.map
# ---------------------------------------------------------------------------------------------

def _alternate(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, tuple[float, Any]]:
    """Median seconds and last result of each function, run in turn (forward and reverse order alternately),
    so that load from other jobs on a shared CPU falls on every side alike."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, Any] = {}
    for i in range(warmup + reps):
        for n in (names if i % 2 == 0 else names[::-1]):
            results.pop(n, None)
            gc.collect()
            gc.disable()  # as timeit does: a cyclic-GC pass over the other side's inputs is not this side's cost
            t0 = time.perf_counter()
            results[n] = fns[n]()
            dt = time.perf_counter() - t0
            gc.enable()
            if i >= warmup:
                times[n].append(dt)
    return {n: (statistics.median(times[n]), results[n]) for n in names}


def _synthetic_docs(n_tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flat token ids and document offsets: lengths 1..600 (mean ~300), ids < 32000."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 600, size=n_tokens // 300 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_tokens) + 1]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return rng.integers(0, 32000, size=int(offsets[-1])).astype(np.int32), offsets


def chunker_cases(names: list[str], quick: bool, block_size: int = 1024, map_batch: int = 1000) -> dict[str, dict]:
    import datasets
    import pyarrow as pa

    from minillm.chunk import Chunker, group_texts
    from parity.data import run_clm_group_texts

    datasets.disable_progress_bars()
    n_tokens = 200_000 if quick else 10_000_000
    reps = 1 if quick else 3
    flat, offsets = _synthetic_docs(n_tokens)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    mask = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ones_like(flat, dtype=np.int8)))
    ds = datasets.Dataset(pa.table({"input_ids": ids, "attention_mask": mask}))
    n = len(flat)
    kw = dict(batched=True, batch_size=map_batch, load_from_cache_file=False, keep_in_memory=True)
    out = {}
    common = {"tokens": n, "documents": len(ds), "block_size": block_size, "map_batch_size": map_batch, "reps": reps}

    eos = 0
    docs = np.split(flat.astype(np.int64), offsets[1:-1])
    lists = [d.tolist() for d in docs]
    batches = [{"input_ids": lists[i:i + map_batch]} for i in range(0, len(lists), map_batch)]

    def stream():
        return np.concatenate([b["input_ids"] for b in Chunker(block_size, eos_token_id=eos).blocks(batches)])

    fns = {"reference": lambda: ds.map(run_clm_group_texts, fn_kwargs={"block_size": block_size}, **kw)}
    if "chunker" in names:
        # the same mode as run_clm (eos_token_id=None, each map batch's tail dropped): identical blocks expected
        fns["chunker"] = lambda: ds.with_format("arrow").map(group_texts, fn_kwargs={"block_size": block_size}, **kw)
    if "chunker_stream" in names:
        fns["chunker_stream"] = stream
    timed = _alternate(fns, reps, warmup=1)  # the first map call also pays datasets' one-off set-up
    t_ref, ref = timed["reference"]
    if "chunker" in names:
        t_ml, got = timed["chunker"]
        same = all(got.data.column(c).equals(ref.data.column(c)) for c in ("input_ids", "attention_mask", "labels"))
        out["chunker"] = dict(common, path="ds.with_format('arrow').map(minillm.chunk.group_texts, batched=True)",
                              reference="ds.map(run_clm group_texts, batched=True)",
                              tokens_s={"minillm": n / t_ml, "reference": n / t_ref}, same_output=bool(same),
                              blocks={"minillm": len(got), "reference": len(ref)})
    if "chunker_stream" in names:
        # the training scripts' path (train/pretrain.py): streaming Chunker with EOS after every document over
        # batches of token-id lists. Its blocks differ from run_clm's by design (EOS, no per-batch tail dropped),
        # so the check is against the stream built by hand: concat(doc + [eos]) cut into blocks.
        t_ml, got = timed["chunker_stream"]
        with_eos = np.insert(flat.astype(np.int64), offsets[1:], eos)
        want = with_eos[: len(with_eos) // block_size * block_size].reshape(-1, block_size)
        out["chunker_stream"] = dict(common, path="Chunker(eos).blocks(batches of token-id lists), as train/pretrain.py",
                                     reference="ds.map(run_clm group_texts, batched=True) (different mode)",
                                     tokens_s={"minillm": n / t_ml, "reference": n / t_ref},
                                     same_output=bool(np.array_equal(got, want)),
                                     check="blocks == concat(doc + [eos]) cut into blocks (run_clm's mode differs)")
    return out


# ---------------------------------------------------------------------------------------------
# Masker: minillm.sft.mask_batch vs the course's per-sample loop
# ---------------------------------------------------------------------------------------------

def course_preprocess_corrected(sources: list[list[dict]], tokenizer: Any, max_len: int,
                                system_message: str) -> dict[str, list[list[int]]]:
    """The course's loop (parity/data.py `course_preprocess`), same per-turn tokenizer calls, with its label
    bugs fixed as minillm defines them: -100 is the ignore label; system and user turns, every turn's
    header and the "\\n" after <|im_end|> are ignored; the reply and its <|im_end|> are labelled; samples
    are cut at max_len, not padded, and a sample left without labels is dropped."""
    role_ids = {r: tokenizer(f"<|im_start|>{r}").input_ids for r in ("system", "human", "assistant")}
    im_end = tokenizer("<|im_end|>").input_ids
    nl = tokenizer("\n").input_ids
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for source in sources:
        if source[0]["from"] != "human":
            source = source[1:]
        turns = [("system", system_message)] + [(t["from"], t["value"]) for t in source]
        input_id, target = [], []
        for role, text in turns:
            header = role_ids[role] + nl
            content = tokenizer(text).input_ids
            input_id += header + content + im_end + nl
            if role == "assistant":
                target += [-100] * len(header) + content + im_end + [-100] * len(nl)
            else:
                target += [-100] * (len(header) + len(content) + len(im_end) + len(nl))
        input_id, target = input_id[:max_len], target[:max_len]
        if any(t != -100 for t in target):
            out["input_ids"].append(input_id)
            out["labels"].append(target)
    return out


def masker_case(quick: bool, max_len: int = 1024, batch: int = 1000) -> dict:
    from minillm.corpus import SAMPLE_SFT, iter_sft_conversations
    from minillm.sft import DEFAULT_SYSTEM_PROMPT, mask_batch
    from parity.data import course_preprocess, tokenizer

    tok = tokenizer("bundled")
    convs = list(iter_sft_conversations(SAMPLE_SFT))[: 100 if quick else 3000]
    # A leading system turn: the course drops it and renders its default system prompt, minillm renders it
    # (as Qwen's template does). A mode difference, not a bug: both sides get the conversations without it.
    with_system = sum(1 for c in convs if c and c[0]["from"] == "system")
    convs = [c[1:] if c and c[0]["from"] == "system" else c for c in convs]
    reps = 1 if quick else 3

    def minillm():
        out = {"input_ids": [], "labels": []}
        for i in range(0, len(convs), batch):
            b = mask_batch(convs[i:i + batch], tok, max_len, user_role="human")  # the course renders "human"
            out["input_ids"] += b["input_ids"]
            out["labels"] += b["labels"]
        return out

    timed = _alternate({"minillm": minillm, "course": lambda: course_preprocess(convs, tok, max_len),
                        "fixed": lambda: course_preprocess_corrected(convs, tok, max_len, DEFAULT_SYSTEM_PROMPT)}, reps)
    (t_ml, got), (t_course, course), (t_fixed, fixed) = timed["minillm"], timed["course"], timed["fixed"]
    # 1. identical ids and labels to the corrected course loop
    same_fixed = got["input_ids"] == fixed["input_ids"] and got["labels"] == fixed["labels"]
    # 2. against the faithful loop: identical ids (then its pad filler), and agreement where both mean the same
    #    thing: every token minillm labels carries the same label there, and every position the course
    #    ignores (its ignore label is pad_token_id) is -100 in minillm. The course also labels <|im_start|>,
    #    <|im_end|> and "\n" of every turn; those positions are counted, not compared.
    pad = tok.pad_token_id
    ids_ok, agree_ok, course_extra = len(got["input_ids"]) == len(convs), True, 0
    for i, (ids, labels) in enumerate(zip(got["input_ids"], got["labels"])):
        c_ids, c_lab = course["input_ids"][i].tolist(), course["labels"][i].tolist()
        n = len(ids)
        ids_ok &= c_ids[:n] == ids and all(x == pad for x in c_ids[n:])
        for m, c in zip(labels, c_lab[:n]):
            if m != -100:
                agree_ok &= m == c
            elif c == pad:
                pass  # both ignore
            else:
                course_extra += 1  # a marker the course trains on
    return {"conversations": len(convs), "system_turns_removed": with_system, "max_len": max_len, "batch": batch, "reps": reps,
            "reference": "course chapter-6 preprocess, faithful (parity/data.py course_preprocess)",
            "conv_s": {"minillm": len(convs) / t_ml, "reference": len(convs) / t_course,
                       "course_corrected": len(convs) / t_fixed},
            "same_as_corrected_course": bool(same_fixed), "ids_same_as_course": bool(ids_ok),
            "labels_agree_with_course_where_defined": bool(agree_ok),
            "course_labelled_markers": course_extra,
            "same_output": bool(same_fixed and ids_ok and agree_ok)}


# ---------------------------------------------------------------------------------------------
# Generation: CausalLM.generate vs transformers' generate, greedy
# ---------------------------------------------------------------------------------------------

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
        timed = _alternate({"minillm": lambda: ours.generate(prompt, max_new_tokens=g["new"], attention_mask=mask),
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


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------

def _met(ratio: float | None, op: str, target: float) -> bool | None:
    if ratio is None:
        return None
    return ratio >= target if op == ">=" else ratio <= target


def table_rows(cases: dict[str, dict]) -> list[dict]:
    rows = []

    def add(case, metric, a, b, ratio, target=None, op=None, note=""):
        rows.append({"case": case, "metric": metric, "minillm": a, "reference": b, "ratio": ratio,
                     "target": None if target is None else f"{op} {target:g}",
                     "met": None if target is None else _met(ratio, op, target), "note": note})

    for name, c in cases.items():
        if "error" in c:
            add(name, "error", None, None, None, note=c["error"][:200])
            continue
        same = "" if c.get("same_output") else "OUTPUT DIFFERS"
        if name.startswith("train_"):
            (_, op, tv) = TARGETS[name]
            t = c["tokens_s"]
            add(name, "tokens/s", t["minillm"], t["reference"], t["minillm"] / t["reference"], tv, op, same)
            m = c["peak_mb"]
            add(name, "peak MiB", m["minillm"], m["reference"], m["minillm"] / m["reference"],
                MEMORY_TARGET.get(name), "<=" if name in MEMORY_TARGET else None)
            g = c["grads_adam_mb"]
            add(name, "peak-grad-Adam", m["minillm"] - g, m["reference"] - g, (m["minillm"] - g) / (m["reference"] - g),
                note=f"peak minus grads+AdamW state ({g:.0f} MiB)")
            f = c["flop_rate_fraction"]
            add(name, "FLOP/matmul", f["minillm"], f["reference"], f["minillm"] / f["reference"],
                FLOP_TARGET.get(name), ">=" if name in FLOP_TARGET else None,
                "target on minillm's fraction" if name in FLOP_TARGET else "")
        elif name.startswith("lora_"):
            s = c["step_s"]
            add(name, "step s", s["minillm"], s["reference"], s["minillm"] / s["reference"], 1.0, "<=", same)
            m = c["peak_mb"]
            add(name, "peak MiB", m["minillm"], m["reference"], m["minillm"] / m["reference"])
        elif name.startswith("chunker"):
            t = c["tokens_s"]
            add(name, "tokens/s", t["minillm"], t["reference"], t["minillm"] / t["reference"], 10.0, ">=", same)
        elif name == "masker":
            t = c["conv_s"]
            add(name, "conv/s", t["minillm"], t["reference"], t["minillm"] / t["reference"], 5.0, ">=", same)
        elif name == "generate":
            t = c["tokens_s"]
            add(name, "tokens/s", t["minillm"], t["reference"], t["minillm"] / t["reference"], 1.0, ">=", same)
    # a target on the ratio of a metric where minillm's own figure is the target (FLOP fraction)
    for r in rows:
        if r["metric"] == "FLOP/matmul" and r["target"] is not None:
            r["met"] = _met(r["minillm"], ">=", FLOP_TARGET[r["case"]])
    return rows


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 10 else f"{x:,.0f}"
    return str(x)


def format_table(rows: list[dict]) -> str:
    head = ("case", "metric", "minillm", "reference", "ratio", "target", "met?", "note")
    body = [(r["case"], r["metric"], _fmt(r["minillm"]), _fmt(r["reference"]),
             _fmt(r["ratio"]) if r["ratio"] is None else f"{r['ratio']:.2f}", r["target"] or "-", _fmt(r["met"]),
             r["note"]) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def machine_info(threads: int) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for lib in ("transformers", "peft", "datasets"):
        try:
            versions[lib] = __import__(lib).__version__
        except ImportError:
            versions[lib] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_available": len(os.sched_getaffinity(0)),
            "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "loadavg_start": os.getloadavg(), **versions}


# ---------------------------------------------------------------------------------------------
# Profile (for whoever optimises the model): minillm's train step under torch.profiler
# ---------------------------------------------------------------------------------------------

def profile(size: str, threads: int, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile as prof
    from minillm.model import CausalLM

    torch.set_num_threads(threads)
    s = TRAIN_SIZES[size]
    torch.manual_seed(0)
    model = CausalLM(s["cfg"]).train()
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


# ---------------------------------------------------------------------------------------------

def _select(only: list[str] | None) -> list[str]:
    if not only:
        return list(CASES)
    chosen = [c for c in CASES if any(c == o or c.startswith(o) for o in only)]
    if not chosen:
        raise SystemExit(f"--only {only}: no such case; cases are {', '.join(CASES)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes, one child per side (< 1 min)")
    ap.add_argument("--out", default="bench.json", help="where to write the JSON results")
    ap.add_argument("--only", action="append", help=f"case name or prefix, repeatable: {', '.join(CASES)}")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--profile", choices=sorted(TRAIN_SIZES), help="print a profile of minillm's train step and exit")
    ap.add_argument("--child", choices=("minillm", "reference"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child_main(args.child, args.threads)
        return 0
    if args.profile:
        print(profile(args.profile, args.threads))
        return 0
    names = _select(args.only)
    t_start = time.perf_counter()
    info = machine_info(args.threads)
    print(f"parity.bench on {info['cpu']} ({info['cores']} cores, {args.threads} threads), torch {info['torch']}, "
          f"transformers {info['transformers']}, peft {info['peft']}{', QUICK sizes' if args.quick else ''}",
          flush=True)
    mm_n = (256, 512) if args.quick else (1024, 2048)
    mm_all = [matmul_gflops(args.threads, mm_n)]
    print(f"fp32 matmul rate: {mm_all[0]:.1f} GFLOP/s", flush=True)
    cases: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="minillm-bench-") as tmp:
        step_names = [n for n in names if n.startswith(("train_", "lora_"))]
        if step_names:
            t0 = time.perf_counter()
            cases.update(step_cases(step_names, args.quick, args.threads, Path(tmp)))
            print(f"train/LoRA steps done ({time.perf_counter() - t0:.0f}s)", flush=True)
            mm_all.append(matmul_gflops(args.threads, mm_n))
    chunk_names = [n for n in names if n.startswith("chunker")]
    if chunk_names:
        t0 = time.perf_counter()
        cases.update(chunker_cases(chunk_names, args.quick))
        print(f"chunker done ({time.perf_counter() - t0:.0f}s)", flush=True)
    if "masker" in names:
        t0 = time.perf_counter()
        cases["masker"] = masker_case(args.quick)
        print(f"masker done ({time.perf_counter() - t0:.0f}s)", flush=True)
    if "generate" in names:
        t0 = time.perf_counter()
        cases["generate"] = generate_case(args.quick, args.threads)
        print(f"generate done ({time.perf_counter() - t0:.0f}s)", flush=True)
    mm_all.append(matmul_gflops(args.threads, mm_n))
    mm = max(mm_all)  # the rate the machine gave at its least loaded moment of this run
    for c in cases.values():
        if "gflop_per_step" in c:
            c["flop_rate_fraction"] = {s: c["gflop_per_step"] / t / mm for s, t in c["step_s"].items()}
    cases = {n: cases[n] for n in names if n in cases}
    rows = table_rows(cases)
    info["loadavg_end"] = os.getloadavg()
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": info,
              "quick": args.quick, "threads": args.threads, "matmul_gflops": mm, "matmul_gflops_all": mm_all, "memory_method": MEMORY_METHOD,
              "flop_formula": FLOP_FORMULA, "optimizer": OPTIMIZER, "timing": "median of reps after warm-up",
              "seconds": time.perf_counter() - t_start, "cases": cases, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print()
    print(format_table(rows))
    print(f"\nmemory: {MEMORY_METHOD}\nFLOPs: {FLOP_FORMULA}\noptimizer: {OPTIMIZER}\n"
          f"threads: {args.threads}; load average {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f} "
          f"(a shared CPU makes timings noisy)\nwrote {args.out} in {result['seconds']:.0f}s")
    failed = [n for n, c in cases.items() if not c.get("same_output")]
    if failed:
        print(f"OUTPUT CHECK FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m parity.bench`: minillm vs transformers/peft/datasets/the course, measured side by side in one run.

    python -m parity.bench                    # every case (a few minutes on 2 cores), table + bench.json
    python -m parity.bench --quick            # the same cases at toy sizes (< 1 min; what the test runs)
    python -m parity.bench --only train       # cases whose name starts with "train" (repeatable)
    python -m parity.bench --profile v32k     # torch.profiler table of minillm's train step (top ops by self CPU)

One file per job: targets.py (the cases and the issue's targets, one table), measure.py (child processes, peak
memory from /proc, alternating timing, the matmul rate), train.py / data.py / generate.py (the case families),
report.py (the table, driven by targets.TARGETS), __main__.py (the command line).

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

import os

# Before torch loads OpenMP (this package's modules import torch after this line runs): on a CPU shared with
# other jobs, OpenMP's default spin-waiting at every parallel region turns a descheduled thread into
# seconds-long stalls (measured: a 7 ms tiny step took 0.05-2 s with 2 threads under load 5). PASSIVE makes
# waiting threads sleep; same setting for both sides; override by env.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from parity.bench.targets import CASES, TARGETS  # noqa: E402

__all__ = ["CASES", "TARGETS"]

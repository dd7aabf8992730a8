"""How the benchmark measures: one child process per side (a line protocol), peak memory from /proc,
alternating timing for in-process cases, and the machine's fp32 matmul rate."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

MEMORY_METHOD = ("per side a fresh child process per case, the two stepped in turn; peak = VmHWM - VmRSS after imports, model construction, "
                 "weight load and batch creation (peak reset via /proc/self/clear_refs, after gc + malloc_trim)")


# ---------------------------------------------------------------------------------------------
# Process memory (Linux /proc)
# ---------------------------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def memory_baseline() -> int:
    """Free what can be freed, reset the peak-RSS counter, return the current RSS in bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so they are not reused unseen
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return _status_kb("VmRSS") * 1024


def peak_since_baseline(baseline: int) -> int:
    return _status_kb("VmHWM") * 1024 - baseline


# ---------------------------------------------------------------------------------------------
# Child processes: one side each, stepped in turn by the parent (the worker is train.StepWorker)
# ---------------------------------------------------------------------------------------------

class Child:
    def __init__(self, side: str, threads: int):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "parity.bench", "--child", side, "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env=env, cwd=Path(__file__).resolve().parents[2])

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


def run_pair(children: dict[str, Child], job: dict) -> dict[str, dict]:
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


# ---------------------------------------------------------------------------------------------
# Timing in this process, and the machine's matmul rate
# ---------------------------------------------------------------------------------------------

def alternate(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, tuple[float, Any]]:
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

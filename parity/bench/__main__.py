"""`python -m parity.bench`: the command line (see parity/bench/__init__.py for the method)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from parity.bench import __doc__ as BENCH_DOC
from parity.bench.data import chunker_cases, masker_case
from parity.bench.dpo import dpo_case
from parity.bench.generate import generate_case
from parity.bench.measure import MEMORY_METHOD, matmul_gflops
from parity.bench.peft_methods import METHODS
from parity.bench.preprocess import preprocess_case
from parity.bench.report import format_table, table_rows
from parity.bench.targets import CASES, TARGETS
from parity.bench.train import FLOP_FORMULA, OPTIMIZER, TRAIN_SIZES, child_main, profile, step_cases

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


def _select(only: list[str] | None) -> list[str]:
    if not only:
        return list(CASES)
    chosen = [c for c in CASES if any(c == o or c.startswith(o) for o in only)]
    if not chosen:
        raise SystemExit(f"--only {only}: no such case; cases are {', '.join(CASES)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.bench", description=BENCH_DOC.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="toy sizes, one child per side (< 1 min): checks the bench runs, no verdicts against targets")
    ap.add_argument("--out", default="bench.json", help="where to write the JSON results")
    ap.add_argument("--only", action="append", help=f"case name or prefix, repeatable: {', '.join(CASES)}")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--profile", choices=sorted(TRAIN_SIZES), help="print a profile of minillm's train step and exit")
    ap.add_argument("--profile-side", choices=("minillm", "reference"), default="minillm",
                    help="with --profile: whose train step (reference = transformers)")
    ap.add_argument("--child", choices=("minillm", "reference"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child, args.threads)
        return 0
    if args.profile:
        print(profile(args.profile, args.threads, side=args.profile_side))
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
        step_names = [n for n in names if n.startswith(("train_", "lora_")) or n in METHODS]
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
    if "sft_epoch" in names:
        from parity.bench.sft_epoch import sft_epoch_case
        t0 = time.perf_counter()
        cases["sft_epoch"] = sft_epoch_case(args.quick, args.threads)
        print(f"sft_epoch done ({time.perf_counter() - t0:.0f}s)", flush=True)
    if "generate" in names:
        t0 = time.perf_counter()
        cases["generate"] = generate_case(args.quick, args.threads)
        print(f"generate done ({time.perf_counter() - t0:.0f}s)", flush=True)
    if "preprocess" in names:
        t0 = time.perf_counter()
        cases["preprocess"] = preprocess_case(args.quick, workers=args.threads)
        print(f"preprocess done ({time.perf_counter() - t0:.0f}s)", flush=True)
    for name in ("dpo", "dpo_v152k"):  # one DPO step vs TRL's, fresh children per side, in rounds
        if name in names:
            t0 = time.perf_counter()
            cases[name] = dpo_case(args.quick, args.threads, case=name)
            print(f"{name} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    if "eval" in names:
        # imported here, not at the top: it loads lm-eval and transformers, which the minillm side's child
        # processes (python -m parity.bench --child, this module) must never import (their memory would not be
        # minillm's alone)
        from parity.bench.eval import eval_case
        t0 = time.perf_counter()
        cases["eval"] = eval_case(args.quick, args.threads)
        print(f"eval done ({time.perf_counter() - t0:.0f}s)", flush=True)
    mm_all.append(matmul_gflops(args.threads, mm_n))
    mm = max(mm_all)  # the rate the machine gave at its least loaded moment of this run
    for c in cases.values():
        if "gflop_per_step" in c:
            c["flop_rate_fraction"] = {s: c["gflop_per_step"] / t / mm for s, t in c["step_s"].items()}
    cases = {n: cases[n] for n in names if n in cases}
    rows = table_rows(cases, verdicts=not args.quick)
    info["loadavg_end"] = os.getloadavg()
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": info,
              "quick": args.quick, "threads": args.threads, "matmul_gflops": mm, "matmul_gflops_all": mm_all, "memory_method": MEMORY_METHOD,
              "flop_formula": FLOP_FORMULA, "optimizer": OPTIMIZER,
              "targets": [t._asdict() for t in TARGETS], "timing": "median of reps after warm-up",
              "seconds": time.perf_counter() - t_start, "cases": cases, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print()
    print(format_table(rows))
    print(f"\nmemory: {MEMORY_METHOD}\nFLOPs: {FLOP_FORMULA}\noptimizer: {OPTIMIZER}\n"
          f"threads: {args.threads}; load average {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f} "
          f"(a shared CPU makes timings noisy)\nwrote {args.out} in {result['seconds']:.0f}s")
    if args.quick:
        print("quick mode: toy sizes, to check that the bench runs and both sides agree; no verdicts (the targets "
              "in parity/bench/targets.py are for the full sizes: python -m parity.bench)")
    failed = [n for n, c in cases.items() if not c.get("same_output")]
    if failed:
        print(f"OUTPUT CHECK FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

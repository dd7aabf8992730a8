"""`make compare`: train with --impl minillm and --impl hf under DeepSpeed ZeRO-2, side by side.

Both runs use the same launcher, ranks, seed, data and hyper-parameters, and start from identical
weights (train/common.py builds the hf model from the minillm one), so their loss curves should be
the same curve: fp32, step by step, within TARGET. Pretraining from scratch is compared, then LoRA
SFT on top of the minillm pretrain output (the same base directory for both impls).

Writes to --out: compare.md (the table), compare.json (every number), compare.png (curves and |Δ|),
and each run's output directory and log. Exits 1 if a curve pair differs by more than TARGET.

    python train/compare.py --out out/compare [--steps 60] [--nproc 2] [--launcher torchrun|deepspeed]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

TARGET = 1e-5  # max |Δ loss| per step between the two fp32 curves (the target)
ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("minillm", "hf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, nproc: int, launcher: str, args: list[str], log: Path) -> float:
    """Run one training job to completion; its output goes to `log`. Returns the wall time in seconds."""
    py = sys.executable
    port = str(free_port())
    if launcher == "deepspeed":
        cmd = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port]
    else:
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]
    cmd += [str(ROOT / "train" / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    print("$ " + " ".join(cmd[2:] if launcher != "deepspeed" else cmd), flush=True)
    t0 = time.perf_counter()
    total = args[args.index("--max_steps") + 1] if "--max_steps" in args else "?"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while proc.poll() is None:  # a progress line every few seconds, read from the Trainer's log lines
            time.sleep(5)
            losses = re.findall(r"'loss': '?([0-9.]+)", log.read_text(errors="replace"))
            print(f"  {script}: step {len(losses)}/{total}" + (f", loss {losses[-1]}" if losses else ", starting")
                  + f" ({time.perf_counter() - t0:.0f} s, log: {log.name})", flush=True)
        rc = proc.returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(open(log).readlines()[-30:])
        raise SystemExit(f"compare.py: error: {script} failed (exit {rc}); last lines of {log}:\n{tail}")
    return wall


def build_ops() -> float:
    """Compile DeepSpeed's CPU op (deepspeed_shm_comm) now if it is not built yet, saying so; returns the seconds.

    Left to the first launch, the build is a silent 1-3 min "starting" that a timing would charge to training.
    On a CUDA machine nothing is compiled for ZeRO-2 with torch's Adam, so nothing happens."""
    if torch_cuda():
        return 0.0
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or ROOT / ".venv" / "torch_extensions")
    if list(root.glob("deepspeed_shm_comm/*.so")):
        return 0.0
    print(f"compiling DeepSpeed's CPU op deepspeed_shm_comm (shared-memory collectives between ranks) into {root}: "
          "1-3 minutes, once; later runs reuse it", flush=True)
    t0 = time.perf_counter()
    build = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
    subprocess.run([sys.executable, "-c", build],
                   check=True, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}, cwd=ROOT)
    took = time.perf_counter() - t0
    print(f"compiled in {took:.0f} s (not counted in the timings below)", flush=True)
    return took


def torch_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def read_run(out_dir: Path, wall: float) -> dict:
    state = json.loads((out_dir / "trainer_state.json").read_text())
    results = json.loads((out_dir / "train_results.json").read_text())
    losses = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    runtime = results.get("train_runtime") or float("nan")
    tokens = state.get("num_input_tokens_seen") or 0
    return {"steps": sorted(losses), "loss": [losses[s] for s in sorted(losses)], "wall_s": wall,
            "train_runtime_s": runtime, "tokens": tokens, "tokens_per_s": tokens / runtime if runtime else 0.0,
            "peak_memory_mb": results.get("peak_memory_mb")}


def compare_stage(name: str, script: str, common_args: list[str], extra: dict[str, list[str]], out: Path,
                  nproc: int, launcher: str) -> dict:
    runs = {}
    for impl in IMPLS:
        run_dir = out / f"{name}-{impl}"
        args = ["--impl", impl, "--output_dir", str(run_dir), "--overwrite_output_dir", *common_args,
                *extra.get(impl, [])]
        wall = launch(script, nproc, launcher, args, out / f"{name}-{impl}.log")
        runs[impl] = read_run(run_dir, wall)
    a, b = runs["minillm"], runs["hf"]
    if a["steps"] != b["steps"]:
        raise SystemExit(f"compare.py: error: {name}: the runs logged different steps "
                         f"({len(a['steps'])} vs {len(b['steps'])})")
    deltas = [abs(x - y) for x, y in zip(a["loss"], b["loss"])]
    return {"stage": name, "runs": runs, "delta": deltas, "max_delta": max(deltas), "steps": len(deltas),
            "passed": max(deltas) <= TARGET}


def table(stages: list[dict]) -> str:
    lines = []
    for st in stages:
        a, b = st["runs"]["minillm"], st["runs"]["hf"]
        lines += [f"## {st['stage']}: {st['steps']} steps, max |Δ loss| = {st['max_delta']:.3g} "
                  f"(target {TARGET:g}: {'PASS' if st['passed'] else 'FAIL'})", "",
                  "| | minillm | hf |", "|---|---|---|",
                  f"| final loss | {a['loss'][-1]:.6f} | {b['loss'][-1]:.6f} |",
                  f"| tokens/s (train loop) | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} |",
                  f"| peak memory, rank 0 (MB) | {a['peak_memory_mb']:.0f} | {b['peak_memory_mb']:.0f} |",
                  f"| train loop (s) | {a['train_runtime_s']:.1f} | {b['train_runtime_s']:.1f} |",
                  f"| wall time incl. start-up (s) | {a['wall_s']:.1f} | {b['wall_s']:.1f} |", "",
                  "| step | minillm loss | hf loss | \\|Δ\\| |", "|---:|---:|---:|---:|"]
        lines += [f"| {s} | {x:.8f} | {y:.8f} | {d:.2e} |"
                  for s, x, y, d in zip(a["steps"], a["loss"], b["loss"], st["delta"])]
        lines.append("")
    return "\n".join(lines)


def plot(stages: list[dict], path: Path) -> None:
    """Loss curves on top; |Δ loss| per step below on a log axis. A step with Δ = 0 (bit-identical losses) has
    no place on a log axis, so it is marked as a tick on the bottom edge and counted in the legend.
    Legends sit outside the axes, so they never cover data."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(stages), figsize=(7.5 * len(stages), 7), squeeze=False)
    outside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8, "borderaxespad": 0}
    for col, st in enumerate(stages):
        ax = axes[0][col]
        for impl, style in (("minillm", "-"), ("hf", "--")):
            r = st["runs"][impl]
            ax.plot(r["steps"], r["loss"], style, label=f"--impl {impl}")
        ax.set_title(f"{st['stage']}: loss (ZeRO-2)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(**outside)
        ax = axes[1][col]
        steps = st["runs"]["minillm"]["steps"]
        nonzero = [(s, d) for s, d in zip(steps, st["delta"]) if d > 0]
        zero = [s for s, d in zip(steps, st["delta"]) if d == 0]
        if nonzero:
            ax.semilogy(*zip(*nonzero), ".", label=f"|Δ loss| > 0 ({len(nonzero)} steps)")
        else:
            ax.set_yscale("log")
        ax.axhline(TARGET, color="red", linestyle=":", label=f"target {TARGET:g}")
        if zero:  # x in data units, y on the bottom edge of the axes
            ax.scatter(zero, [0.03] * len(zero), marker="|", color="green", s=80,
                       transform=ax.get_xaxis_transform(), label=f"Δ = 0, equal ({len(zero)} steps)")
        ax.set_ylim(min([d for _, d in nonzero] + [TARGET * 1e-3]) / 3, TARGET * 10)
        ax.set_xlim(min(steps) - 1, max(steps) + 1)
        ax.set_title(f"{st['stage']}: max |Δ loss| = {st['max_delta']:.2g}; {len(zero)}/{len(steps)} steps equal")
        ax.set_xlabel("step")
        ax.set_ylabel("|Δ loss| (minillm vs hf)")
        ax.legend(**outside)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/compare")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run (>= 50 for the target)")
    ap.add_argument("--sft_steps", type=int, default=50)
    ap.add_argument("--nproc", type=int, default=2, help="ranks (CPU processes or GPUs)")
    ap.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    ap.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "zero2.json"))
    ap.add_argument("--config_name", default="tiny")
    ap.add_argument("--block_size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="per-device batch size")
    ap.add_argument("--no_sft", dest="sft", action="store_false", help="compare pretraining only")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    build_ops()  # once, before the timed runs

    shared = ["--deepspeed", args.deepspeed, "--seed", "42", "--logging_steps", "1", "--report_to", "none",
              "--save_strategy", "no", "--include_num_input_tokens_seen", "true", "--disable_tqdm", "true",
              "--per_device_train_batch_size", str(args.batch), "--dataloader_num_workers", "0"]
    pre_args = [*shared, "--config_name", args.config_name, "--block_size", str(args.block_size),
                "--max_steps", str(args.steps), "--learning_rate", "1e-3", "--warmup_steps", "5",
                "--lr_scheduler_type", "cosine"]
    stages = [compare_stage("pretrain", "pretrain.py", pre_args, {}, out, args.nproc, args.launcher)]
    if args.sft:
        base = out / "pretrain-minillm"  # one base for both impls: the curves differ only by the code
        sft_args = [*shared, "--model_name_or_path", str(base), "--use_lora", "--lora_r", "8",
                    "--lora_alpha", "16", "--lora_target_modules", "all-linear", "--max_len", "128",
                    "--max_steps", str(args.sft_steps), "--learning_rate", "2e-3"]
        stages.append(compare_stage("sft-lora", "finetune.py", sft_args, {}, out, args.nproc, args.launcher))

    md = table(stages)
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps(stages, indent=1))
    plot(stages, out / "compare.png")
    print(md)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
    failed = [st["stage"] for st in stages if not st["passed"]]
    if failed:
        print(f"compare.py: curves differ by more than {TARGET:g} in: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Smoke test of the benchmark harness: `python -m parity.bench --quick` runs end to end (both sides, every
case, at toy sizes), writes bench.json with the documented keys, and every case's output check passes.
No timing is asserted: timings on a shared CPU prove nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

from parity.bench import CASES

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_runs_and_outputs_agree(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "parity.bench", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("date", "machine", "matmul_gflops", "memory_method", "flop_formula", "optimizer", "cases", "rows"):
        assert key in result, key
    for key in ("cpu", "cores", "threads", "torch", "transformers", "peft"):
        assert key in result["machine"], key
    assert result["quick"] is True and result["matmul_gflops"] > 0
    assert list(result["cases"]) == list(CASES)
    for name, case in result["cases"].items():
        assert "error" not in case, (name, case.get("error"))
        assert case["same_output"] is True, (name, case)
    for name in ("train_tiny", "train_v32k", "train_h512", "train_v152k", "lora_qv", "lora_all", "lora_embed",
                 "prompt_tuning", "prefix_tuning", "prefix_proj", "houlsby"):
        case = result["cases"][name]
        assert case["loss_rel_diff"]["first"] <= 1e-5
        assert case["peak_mb"]["minillm"] > 0 and case["peak_mb"]["reference"] > 0
        assert set(case["tokens_s"]) == {"minillm", "reference"}
    # the loss alone at Qwen's vocabulary: both sides measured, same loss (checked in same_output above)
    loss_only = result["cases"]["train_v152k"]["loss_only"]
    assert loss_only["loss_rel_diff"] <= 1e-5 and result["cases"]["train_v152k"]["config"]["vocab"] == 151936
    assert loss_only["peak_mb"]["minillm"] > 0 and loss_only["peak_mb"]["reference"] > 0
    assert result["cases"]["masker"]["same_as_corrected_course"] is True
    # the printed table names every case and has the documented columns
    for col in ("case", "metric", "minillm", "reference", "ratio", "target", "met?"):
        assert col in proc.stdout
    for name in CASES:
        assert name in proc.stdout
    rows = {(r["case"], r["metric"]) for r in result["rows"]}
    assert ("train_v32k", "peak MiB") in rows and ("masker", "conv/s") in rows
    assert ("train_v152k", "loss peak MiB") in rows
    # issue 14's PEFT methods: both rows per case, trainable counts equal where the reference is peft's same method
    for name in ("lora_embed", "prompt_tuning", "prefix_tuning", "prefix_proj", "houlsby"):
        assert (name, "step s") in rows and (name, "peak MiB") in rows, name
    # issue 21: a DPO step vs TRL's at vocab 4,096 and 151,936 (toy widths), both rows each, the same first loss
    for name, vocab in (("dpo", 4096), ("dpo_v152k", 151936)):
        assert (name, "step s") in rows and (name, "peak MiB") in rows, name
        case = result["cases"][name]
        assert case["size"]["vocab"] == vocab and case["peak_mb"]["minillm"] > 0 and case["peak_mb"]["reference"] > 0
    if "eval" in result["cases"]:  # issue 22 (parity/bench/eval.py): items/s vs lm-eval, equal results
        assert ("eval", "items/s") in rows and result["cases"]["eval"]["items_s"]["minillm"] > 0
    for name in ("lora_embed", "prompt_tuning", "prefix_tuning", "prefix_proj"):
        t = result["cases"][name]["trainable"]
        assert t["minillm"] == t["reference"] > 0 and result["cases"][name]["loss_rel_diff"]["last"] <= 1e-3, name


def test_gpu_lane_without_cuda_says_so_and_passes():
    proc = subprocess.run([sys.executable, "-m", "parity.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no CUDA device" in proc.stdout


def test_gpu_lane_dry_run_on_cpu():
    """The GPU lane's whole code path (bf16 model rows, parity/dtype.py's fused-loss rows in bf16 and fp16 over
    many chunks, the bf16 train-step benchmark) at toy sizes on the CPU, so a typo cannot wait for a GPU."""
    proc = subprocess.run([sys.executable, "-m", "parity.gpu", "--device", "cpu", "--tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for check in ("gpu bf16 logits, drawn configs", "gpu bf16 grads error ratio, Qwen3-0.6B shape",
                  "fused CE bf16 (+autocast), many chunks: dh, dW", "fused CE fp16 (+autocast): err / transformers' err"):
        assert check in out, check
    assert "FAIL" not in out and "SKIP" not in out
    assert "| minillm " in out and "| transformers " in out and "first losses agree" in out


def test_report_gives_the_ratio_spread_of_cases_measured_in_rounds():
    """The dpo / eval rows carry the ratio's range over rounds (worst first), and targets from targets.TARGETS."""
    from parity.bench.report import table_rows

    spread = {"minillm": (1.0, 2.0), "reference": (2.0, 4.0)}
    dpo = {"size": {"vocab": 32000}, "rounds": 3, "same_output": True, "step_s": {"minillm": 1.5, "reference": 3.0},
           "peak_mb": {"minillm": 100.0, "reference": 400.0}, "step_s_spread": spread,
           "peak_mb_spread": {"minillm": (100.0, 100.0), "reference": (400.0, 400.0)}}
    ev = {"same_output": True, "runs": {"minillm": [{}, {}, {}]}, "items_s": {"minillm": 30.0, "reference": 10.0},
          "items_s_spread": {"minillm": (20.0, 40.0), "reference": (10.0, 10.0)}}
    rows = {(r["case"], r["metric"]): r for r in table_rows({"dpo": dpo, "eval": ev})}
    step = rows[("dpo", "step s")]
    assert step["ratio"] == 0.5 and step["target"] == "<= 1" and step["met"] is True
    assert "ratio 1.00 (worst) to 0.25 (best) over 3 rounds" in step["note"]
    assert rows[("dpo", "peak MiB")]["met"] is True and rows[("dpo", "peak MiB")]["target"] == "<= 0.6"
    items = rows[("eval", "items/s")]
    assert items["ratio"] == 3.0 and items["met"] is True and "ratio 2.00 (worst) to 4.00 (best)" in items["note"]

"""Smoke test of the benchmark harness: `python -m parity.bench --quick` runs end to end (both sides, every
case, at toy sizes), writes bench.json with the documented keys, and every case's output check passes.
No timing is asserted: timings on a shared CPU prove nothing."""

import json
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
    for name in ("train_tiny", "train_v32k", "train_h512", "lora_qv", "lora_all"):
        case = result["cases"][name]
        assert case["loss_rel_diff"]["first"] <= 1e-5
        assert case["peak_mb"]["minillm"] > 0 and case["peak_mb"]["reference"] > 0
        assert set(case["tokens_s"]) == {"minillm", "reference"}
    assert result["cases"]["masker"]["same_as_corrected_course"] is True
    # the printed table names every case and has the documented columns
    for col in ("case", "metric", "minillm", "reference", "ratio", "target", "met?"):
        assert col in proc.stdout
    for name in CASES:
        assert name in proc.stdout
    rows = {(r["case"], r["metric"]) for r in result["rows"]}
    assert ("train_v32k", "peak MiB") in rows and ("masker", "conv/s") in rows

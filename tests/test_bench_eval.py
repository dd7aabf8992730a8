"""parity/bench/eval.py's eval_case: dpo_case's keys (what parity/bench registers), both tasks, equal results."""

from __future__ import annotations

from parity.bench.eval import eval_case


def test_eval_case_quick_has_dpo_cases_shape_and_equal_results():
    c = eval_case(quick=True, threads=1)
    for key in ("size", "runs", "step_s", "step_s_spread", "same_output"):
        assert key in c
    assert set(c["step_s"]) == set(c["runs"]) == {"minillm", "reference", "reference_default"}
    assert c["same_output"] and c["long_context"]["same_output"]
    assert c["batch_size"]["reference_default"] == 1 and c["items_s"]["minillm"] > 0
    lo, hi = c["ratio_spread"]["reference"]
    assert lo <= c["ratio"]["reference"] <= hi

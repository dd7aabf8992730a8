"""train/dpo_sweep.py's pieces that need no training: the on-policy pairs and the table's counts (the sweep itself
trains ~20 models: `python train/dpo_sweep.py`, README "Preference training")."""

from __future__ import annotations

from pathlib import Path

from train import dpo_sweep


def _row(q: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def test_greedy_pairs_take_the_models_own_wrong_reply():
    rows = [_row("q1", "right 1", "wrong 1"), _row("q2", "right 2", "wrong 2"), _row("q3", "right 3", "wrong 3"),
            _row("q4", "right 4", "wrong 4")]
    before = [{"question": "q1", "reply": "right 1", "stopped": True, "kind": "preferred"},
              {"question": "q2", "reply": "its own", "stopped": True, "kind": "rejected-style"},
              {"question": "q3", "reply": "cut off", "stopped": False, "kind": "other"},  # never finished: no answer
              {"question": "q4", "reply": "right 4", "stopped": False, "kind": "other"}]  # the chosen text, unfinished
    pairs = dpo_sweep.pairs_for("greedy", Path("unused"), rows, before)
    by_q = {p["prompt"][0]["content"]: p["rejected"][0]["content"] for p in pairs}
    assert len(pairs) == 4 and by_q == {"q1": "wrong 1", "q2": "its own", "q3": "wrong 3", "q4": "wrong 4"}
    assert all(p["chosen"] == r["chosen"] for p in pairs for r in rows if r["prompt"] == p["prompt"])
    assert dpo_sweep.pairs_for("bundled", Path("unused"), rows, before) is rows


def test_row_counts_kinds_and_changes():
    kinds = lambda *ks: [{"kind": k} for k in ks]  # noqa: E731
    r = dpo_sweep.row("DPO", "1e-4", kinds("preferred", "rejected-style", "rejected-style", "other"),
                      kinds("preferred", "preferred", "other", "other"))
    assert r["before"] == [1, 2, 1] and r["after"] == [2, 0, 2]
    assert r["changes"] == {"rejected-style -> preferred": 1, "rejected-style -> other": 1}


def test_with_flags_replaces_values_and_keeps_the_original():
    args = ["--learning_rate", "3e-4", "--max_steps", "60", "--beta", "0.1"]
    assert dpo_sweep.with_flags(args, learning_rate="1e-4", max_steps="85") == [
        "--learning_rate", "1e-4", "--max_steps", "85", "--beta", "0.1"]
    assert args[1] == "3e-4"  # a copy: the demo's own argument lists stay as they are

"""train/compare.py's PEFT-methods table: one real 2-rank ZeRO-2 comparison (prefix tuning, both impls) and the
table's checks on made-up runs (they must be able to fail); its DPO stage (train/compare_dpo.py): the issue's
trajectory, 2 ranks, ZeRO-2, 20 steps, max |Δ loss| and |Δ rewards/margins| within 1e-5.

The real run starts from a random `tiny` model (--base tiny), not a pretrained one, so it costs two launches
(~25 s of start-up each, well under a second of training); the full four-method table is `make compare`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
from train import compare, compare_dpo, ops


def run(loss: list[float], before: float | None = 7.0, after: float | None = 6.5, params: dict | None = None) -> dict:
    return {"steps": list(range(1, len(loss) + 1)), "loss": loss, "step_s": 0.05, "eval_loss_start": before,
            "eval_loss": after, "params": params or {"trainable": 100, "all": 1000, "percent": 10.0}}


def stage(runs: dict, delta: list[float] | None) -> dict:
    return {"stage": "x", "runs": runs, "delta": delta or [], "steps": 3,
            "max_delta": max(delta) if delta else None, "passed": not delta or max(delta) <= compare.TARGET}


def test_prefix_tuning_both_impls_table(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cmp"
    rc = compare.main(["--out", str(out), "--base", "tiny", "--methods", "prefix", "--sft_steps", "12", "--no_dpo"])
    assert rc == 0
    result = json.loads((out / "compare.json").read_text())
    assert [st["stage"] for st in result["stages"]] == []  # no pretrain stage (--base), no LoRA stage (not listed)
    prefix = result["methods"]["prefix"]
    assert prefix["steps"] == 12 and prefix["max_delta"] <= compare.TARGET
    a, b = prefix["runs"]["minillm"], prefix["runs"]["hf"]
    assert a["params"] == b["params"] and 0 < a["params"]["trainable"] < a["params"]["all"]
    for r in (a, b):
        assert all(math.isfinite(x) for x in r["loss"]) and r["eval_loss"] < r["eval_loss_start"]
        assert 0 < r["step_s"] < r["train_runtime_s"]
    assert abs(a["eval_loss"] - b["eval_loss"]) <= compare.TARGET
    md = (out / "compare.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| prefix |"))
    assert f"{a['params']['trainable']:,d}" in row and f"{a['loss'][-1]:.4f} | {b['loss'][-1]:.4f}" in row
    assert (out / "compare.png").stat().st_size > 0


def test_dpo_stage_minillm_equals_trl(tmp_path, monkeypatch):
    """make compare's third stage from a random tiny model (--base tiny: two launches, no pretraining): per step
    loss and TRL's rewards/margins of --impl minillm and --impl hf within compare.TARGET (measured 4.8e-7 and 1e-6)."""
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cmp"
    assert compare.main(["--out", str(out), "--base", "tiny", "--no_sft"]) == 0
    stage, = json.loads((out / "compare.json").read_text())["stages"]
    assert stage["stage"] == "dpo" and stage["steps"] == 20 and stage["passed"]
    assert stage["max_delta"] <= compare.TARGET and stage["max_margin_delta"] <= compare.TARGET, stage
    a, b = stage["runs"]["minillm"], stage["runs"]["hf"]
    assert len(a["margin"]) == len(b["margin"]) == 20 and any(m != 0 for m in a["margin"])
    md = (out / "compare.md").read_text()
    assert "max |Δ rewards/margins|" in md and f"| 20 | {a['loss'][-1]:.8f} | {b['loss'][-1]:.8f} |" in md
    assert (out / "dpo.png").stat().st_size > 0 and not (out / "compare.png").exists()  # nothing else ran


def test_dpo_margins_apart_fail_the_stage(tmp_path):
    for impl, m in (("minillm", [0.0, 0.1]), ("hf", [0.0, 0.2])):
        (tmp_path / f"dpo-{impl}").mkdir()
        (tmp_path / f"dpo-{impl}" / "trainer_state.json").write_text(json.dumps(
            {"log_history": [{"step": i + 1, "loss": 0.69, "rewards/margins": x} for i, x in enumerate(m)]}))
    timed = lambda: {**run([0.69, 0.69]), "train_runtime_s": 1.0, "wall_s": 2.0}  # noqa: E731
    st = compare_dpo.with_margins({**stage({"minillm": timed(), "hf": timed()}, [0.0, 0.0]), "stage": "dpo"},
                                  tmp_path, compare.TARGET)
    assert not st["passed"] and abs(st["max_margin_delta"] - 0.1) < 1e-9
    assert "FAIL" in compare_dpo.dpo_table({**st, "steps": 2}, compare.TARGET)


def test_method_problems_can_fail():
    good = stage({"minillm": run([7.0, 6.9, 6.8]), "hf": run([7.0, 6.9, 6.8])}, [0.0, 1e-7, 0.0])
    assert compare.method_problems("m", good) == []
    apart = stage({"minillm": run([7.0, 6.9, 6.8]), "hf": run([7.0, 6.9, 6.7])}, [0.0, 0.0, 0.1])
    assert "curves differ" in compare.method_problems("m", apart)[0]
    nan = stage({"minillm": run([7.0, float("nan"), 6.8])}, None)
    assert "not finite" in compare.method_problems("m", nan)[0]
    missing = stage({"minillm": run([7.0, 6.9], after=None)}, None)
    assert "not finite or missing" in compare.method_problems("m", missing)[0]
    stuck = stage({"minillm": run([7.0, 6.9], before=7.0, after=7.0)}, None)
    assert "not below" in compare.method_problems("m", stuck)[0]


def test_methods_table_one_impl_and_param_mismatch():
    adapter = stage({"minillm": run([7.0, 6.5])}, None)
    lora = stage({"minillm": run([7.0, 6.4]), "hf": run([7.0, 6.4], params={"trainable": 99, "all": 1000,
                                                                            "percent": 9.9})}, [0.0, 0.0])
    md = compare.methods_table({"lora": lora, "adapter": adapter}, {"lora": "1e-2", "adapter": "1e-2"})
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| lora") or
            line.startswith("| adapter")}
    assert "100 (10.00%) / hf 99" in rows["lora"]  # a count that differs between impls is shown, not hidden
    assert rows["adapter"].count(" - ") >= 2 and "7.0000 -> 6.5000 / -" in rows["adapter"]


def test_trainable_params_line():
    log = "noise\ntrainable params: 5,920 || all params: 622,688 || trainable%: 0.9507\nmore\n"
    assert compare.trainable_params(log) == {"trainable": 5920, "all": 622688, "percent": 0.9507}
    assert compare.trainable_params("no such line") is None


def test_methods_flag_names_the_unknown(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path), "--methods", "lora,dora"])
    assert "unknown ['dora']" in capsys.readouterr().err


def test_plot_draws_equal_steps_as_ticks_in_every_panel(tmp_path):
    """issue 20: the PEFT panel drew Δ = 0 as dots at 1e-8 while the stage panels use ticks on the bottom edge."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pair = {"minillm": {**run([7.0, 6.9, 6.8]), "steps": [1, 2, 3]}, "hf": {**run([7.0, 6.9, 6.8]), "steps": [1, 2, 3]}}
    st = {**stage(pair, [0.0, 9.5e-7, 0.0]), "stage": "sft-lora"}
    captured = {}
    real = plt.Figure.savefig

    def keep(fig, *a, **k):
        captured["fig"] = fig
        return real(fig, *a, **k)

    plt.Figure.savefig = keep
    try:
        compare.plot([st], tmp_path / "c.png", {"lora": st, "prefix": {**st, "delta": [0.0, 0.0, 0.0]}})
    finally:
        plt.Figure.savefig = real
    bottoms = [a for a in captured["fig"].axes if "|Δ loss|" in a.get_ylabel()]
    assert len(bottoms) == 2
    for ax in bottoms:
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if line.get_linestyle() == "None"]
        assert ys and min(ys) > compare.TARGET * 1e-2, ys  # no zero drawn as a stand-in value
        ticks = [c for c in ax.collections if c.get_offsets().shape[0]]
        assert ticks, f"no Δ = 0 ticks in {ax.get_title()}"
    assert (tmp_path / "c.png").stat().st_size > 0


def test_op_build_env_pins_one_ninja(monkeypatch):
    """The venv's bin/ first on PATH (its ninja), for this process and the launched ones."""
    env = ops.pin_op_build_env({"PATH": "/usr/bin:/bin"})
    venv_bin = Path(sys.prefix) / "bin"
    if (venv_bin / "ninja").exists():
        assert env["PATH"].split(":")[0] == str(venv_bin) and env["PATH"].count(str(venv_bin)) == 1
        again = ops.pin_op_build_env(dict(env))
        assert again["PATH"] == env["PATH"]
    assert env["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    assert ops.pin_op_build_env({"PATH": "", "TORCH_EXTENSIONS_DIR": "/x"})["TORCH_EXTENSIONS_DIR"] == "/x"


def test_op_not_built_is_announced_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ops.op_build_reason().startswith("not built yet in ")


def test_op_build_is_the_same_in_every_launch_style(tmp_path):
    """issue 20: the op recompiled 5 times after the demo's compile. Two causes, measured: which ninja ran depended
    on PATH (`.venv/bin/python ...` finds the system's ninja 1.11, an activated venv or `deepspeed` the venv's 1.13,
    and each reads the other's build log as invalid), and a venv reached through a symlink (a scratch copy of the
    checkout) put other paths in the build command. Whatever the launch, the pinned plan (ninja + build file) must
    be one and the same, so the op compiles once per venv."""
    import os
    import subprocess

    code = ("import json; from train.ops import pin_op_build_env, op_build_plan; pin_op_build_env(); "
            "print('PLAN' + json.dumps(op_build_plan()))")
    venv_bin = str(Path(sys.prefix) / "bin")
    bare = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    scratch = tmp_path / "checkout"  # a copy of the checkout whose .venv is a link to this one
    scratch.mkdir()
    (scratch / ".venv").symlink_to(Path(sys.prefix))
    (scratch / "train").symlink_to(ROOT / "train")
    plans = {}
    for style, path, python, cwd in (
            ("venv python, PATH without the venv", bare, sys.executable, ROOT),
            ("activated venv / deepspeed launcher", venv_bin + os.pathsep + bare, sys.executable, ROOT),
            ("a checkout copy linking the venv", bare, str(scratch / ".venv" / "bin" / "python"), scratch)):
        env = {**os.environ, "PATH": path, "PYTHONPATH": str(cwd)}
        env.pop("TORCH_EXTENSIONS_DIR", None)
        p = subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        plans[style] = next(l[4:] for l in p.stdout.splitlines() if l.startswith("PLAN"))
    assert len(set(plans.values())) == 1, plans
    ninja, text = json.loads(next(iter(plans.values())))
    assert ninja == str(Path(os.path.realpath(sys.prefix)) / "bin" / "ninja") and "site-packages" in text

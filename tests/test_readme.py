"""Every shell command the README shows runs as written on a fresh clone (briefly).

Commands are extracted from fenced ```bash blocks (one per line, comments dropped) and from table cells holding
a command in backticks. Each runs from a scratch directory that links the repository's code, data and venv,
so relative outputs (out/pretrain, out/sft, out/demo) land in the scratch directory. The only changes made to a
command: a training run gets `--max_steps 2 --save_strategy no --overwrite_output_dir` appended (a short run);
a `deepspeed` launch gets a free `--master_port` (other jobs may hold the default 29500); the interactive chat
gets an empty stdin. Nothing is skipped silently: what is not run is in SKIP with its reason, and every README
command must be either run or skipped by name.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Commands not run here, each with why (matched as a prefix of the command).
SKIP = {
    "make demo": "the whole course, 3-10 min; its pieces run below and in tests/test_train.py",
    "make test": "this test suite itself",
    "make parity": "13 s to 3 min; its areas run in tests/test_*.py",
    "make compare": "nine training runs (~2 min); tests/test_train.py covers both impls, tests/test_compare.py the methods table",
    "make bench": "~2 min of benchmarks; tests/test_bench.py runs the quick mode",
    "make doctor": "runs train/doctor.py, exercised in tests/test_doctor.py on recorded curves",
    "make mutants": "40 mutants x up to a minute each; tests/test_mutants.py runs the runner on small ones",
    "make gpu-check": "needs CUDA; tests/test_bench.py runs its CPU dry run and its no-CUDA exit",
    ".venv/bin/python -m parity.checkpoint ~/models/": "needs a checkpoint you downloaded (~/models/...)",
    "deepspeed --hostfile hostfile --no_ssh": "two nodes started at once; tests/test_multinode.py runs them",
    "torchrun --nnodes 2": "two nodes started at once; tests/test_multinode.py runs them",
    "make eval": "runs train/evaluate.py on the bundled tasks, as the two evaluate.py commands below do",
    "HF_HUB_OFFLINE=1 lm_eval": "lm-eval's own CLI; parity/eval.py runs its hf model on the same task files",
    "llama-cli": "llama.cpp's CLI is not installed here; tests/test_export_llama_cpp.py runs llama.cpp through "
                 "llama-cpp-python (make export-check)",
    "ollama": "Ollama is not available here (no package registry has it)",
    "lms import": "LM Studio is a desktop application, not available here",
    "make export-check": "installs llama-cpp-python (a ~25 min compile); tests/test_export.py runs in make test",
}
# The demo's outputs, which the chat and export commands read, are stood in for by the README's own training outputs.
DEMO_STANDINS = {"out/demo/sft-full-minillm": "out/sft"}  # the README's full SFT: the same kind of model


def readme_commands(text: str) -> list[str]:
    """The commands in README order (later ones use earlier ones' outputs)."""
    found = []  # (position, command)
    for block in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        for i, line in enumerate(re.sub(r"\\\n\s*", "", block.group(1)).splitlines()):  # `\` continuations joined
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                found.append((block.start() + i, line))
    for row in re.finditer(r"^\|.*\|$", text, flags=re.M):
        for cell in row.group(0).strip("|").split("|"):
            m = re.fullmatch(r"\s*`((?:deepspeed|torchrun|python|\.venv/bin/python|make)[^`]*)`\s*", cell)
            if m and ("train/" in m.group(1) or "minillm" in m.group(1) or m.group(1).startswith("make")):
                found.append((row.start(), m.group(1)))
    return [c for _, c in sorted(found, key=lambda x: x[0])]


def skip_reason(cmd: str) -> str | None:
    return next((why for prefix, why in SKIP.items() if cmd.startswith(prefix)), None)


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def brief(cmd: str) -> tuple[list[str], str | None]:
    """The command as argv, shortened as the module docstring says, and its stdin."""
    argv = shlex.split(cmd)
    if argv[0] == "deepspeed":
        argv[1:1] = ["--master_port", _port()]
    if any(a in ("train/pretrain.py", "train/finetune.py", "train/dpo.py") for a in argv):  # the training scripts
        argv += ["--max_steps", "2", "--save_strategy", "no", "--overwrite_output_dir"]
    argv = [DEMO_STANDINS.get(a, a) for a in argv]
    return argv, "" if "--prompt" not in argv and "minillm.generate" in argv else None


def test_readme_commands_extracted_and_accounted_for():
    cmds = readme_commands(README.read_text())
    assert any(c.startswith("deepspeed --num_gpus 2 train/pretrain.py") for c in cmds), cmds
    assert any("train/finetune.py" in c for c in cmds) and any("minillm.generate" in c for c in cmds)
    for c in cmds:
        runnable = c.startswith(("deepspeed", ".venv/bin/python", "make", "torchrun", "python")) or skip_reason(c)
        assert runnable, f"README command neither runnable here nor in SKIP: {c}"
    # every SKIP entry still names a README command (a stale entry would hide nothing and mislead)
    stale = [p for p in SKIP if not any(c.startswith(p) for c in cmds)]
    assert not stale, stale


def link_checkout(tmp: Path) -> None:
    """tmp as a checkout: the code and data linked; `.venv/bin/{python,deepspeed,torchrun}` as scripts that exec
    the real venv's. Not a link to the venv: through tmp/.venv Python would see another sys.prefix, and DeepSpeed's
    op build command (which names the site-packages paths) would differ from the real venv's, so the op would be
    compiled again (issue 20)."""
    for name in ("train", "minillm", "ds_configs", "parity"):
        (tmp / name).symlink_to(ROOT / name)
    bin_dir = tmp / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "deepspeed", "torchrun"):
        (bin_dir / tool).write_text(f'#!/bin/sh\nexec {ROOT / ".venv" / "bin" / tool} "$@"\n')
        (bin_dir / tool).chmod(0o755)


def test_readme_commands_run(tmp_path):
    link_checkout(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "MINILLM_CACHE": str(tmp_path / "cache")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    ran, skipped = [], []
    for cmd in readme_commands(README.read_text()):
        if why := skip_reason(cmd):
            skipped.append((cmd, why))
            continue
        argv, stdin = brief(cmd)
        p = subprocess.run(argv, cwd=tmp_path, env=env, input=stdin, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"README command failed ({p.returncode}): {cmd}\n{(p.stdout + p.stderr)[-3000:]}"
        if "minillm.generate" in cmd and "--prompt" in cmd:
            assert p.stdout.strip(), f"no reply printed by: {cmd}"
        ran.append(cmd)
    print(f"ran {len(ran)} README commands; skipped {len(skipped)}: " + "; ".join(f"{c} ({w})" for c, w in skipped))
    assert len(ran) >= 5, ran


# The README's "Use it" snippet runs as printed: tests/test_layout.py executes it.

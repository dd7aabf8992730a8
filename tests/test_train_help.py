"""Every script in train/ with a command line answers --help: exit 0 and its usage (issue 20.2: a literal % in a
help string crashed argparse for pretrain.py and finetune.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["pretrain.py", "finetune.py", "demo.py", "compare.py", "doctor.py", "lr_curves.py", "reference_curves.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, tmp_path):
    # run as a user would, from another directory: the scripts find the train package without sys.path edits
    out = subprocess.run([sys.executable, str(ROOT / "train" / script), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: {script}"), out.stdout[:500]

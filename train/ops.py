"""DeepSpeed's one CPU op (`deepspeed_shm_comm`, ZeRO-2's shared-memory collectives): built once per venv.

torch compiles it with ninja on first use, keyed by the exact build command. Two things used to change that command
between launch styles and recompile the op (45-91 s each, silently): two ninja binaries on PATH (the venv's and
the system's, each reading the other's build log as invalid), and a venv reached through a symlink (other paths in
the command). `pin_op_build_env` (run when train/args.py is imported, so every script and launcher is covered) puts
the venv's own bin/ first and resolves those paths; `op_build_reason` says why a compile is about to happen, and
`build_ops` does it once, before timed runs, announced on screen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OP = "deepspeed_shm_comm"  # the one C++ op DeepSpeed builds for ZeRO-2 on CPU (torch's Adam: nothing else)


def op_root() -> Path:
    """Where the op is built: $TORCH_EXTENSIONS_DIR, else next to this venv (as the Makefile and train/args.py)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")


def pin_op_build_env(env: dict | None = None) -> dict:
    """Make every launch style build the op the same way; returns `env` (default os.environ), changed in place.

    Measured cause of the silent recompiles: two ninja binaries. pip installs ninja 1.13 into the venv's bin/ (a
    DeepSpeed dependency); the system may have another (here /usr/bin/ninja 1.11). torch runs whichever `ninja`
    PATH finds first: `.venv/bin/python train/demo.py` (venv not activated) finds the system's, `deepspeed ...`
    from an activated venv (or a test putting .venv/bin on PATH) the venv's. Their build logs differ (v5 vs v7,
    MurmurHash vs rapidhash command hashes), so each reads the other's as invalid and recompiles everything:
    45-150 s per switch. Putting this venv's bin/ first makes it one ninja per venv. TORCH_EXTENSIONS_DIR is
    pinned next to the venv as well (a launch outside `make` reuses the same build)."""
    env = os.environ if env is None else env
    venv_bin = Path(os.path.realpath(sys.prefix)) / "bin"
    if (venv_bin / "ninja").exists():
        path = env.get("PATH", "")
        if path.split(os.pathsep)[0] != str(venv_bin):
            env["PATH"] = os.pathsep.join([str(venv_bin), *[p for p in path.split(os.pathsep) if p != str(venv_bin)]])
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    if env is os.environ:
        _canonical_op_paths()
    return env


def _canonical_op_paths() -> None:
    """The second measured cause: a venv reached through a symlink (a scratch copy of the checkout whose .venv links
    to the real one). Python then sees sys.prefix as the link's path, and DeepSpeed's build command names every
    source and include path through it: another command, so ninja compiles again (into the same build directory
    when TORCH_EXTENSIONS_DIR resolves to it). In such a process the paths DeepSpeed and torch put into the
    command are resolved, so it is the command of the real venv. Costs the deepspeed import (~4 s) there only."""
    if os.path.realpath(sys.prefix) == os.path.abspath(sys.prefix):
        return
    from torch.utils import cpp_extension as ce

    ce._TORCH_PATH = os.path.realpath(ce._TORCH_PATH)
    ce.TORCH_LIB_PATH = os.path.join(ce._TORCH_PATH, "lib")
    try:
        from deepspeed.ops.op_builder import builder
    except ImportError:
        return
    src_root = os.path.realpath(Path(builder.__file__).parent.parent)
    builder.OpBuilder.deepspeed_src_path = lambda self, code_path: (
        code_path if os.path.isabs(code_path) else os.path.join(src_root, code_path))


def op_build_plan() -> tuple[str | None, str]:
    """(the ninja this process would run, the build.ninja it would write for the op): DeepSpeed's flags for the op
    through torch's own ninja-file writer. Two launches compile the op once between them only if both are equal."""

    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    from torch.utils import cpp_extension as ce

    b = ShareMemCommBuilder()
    sources = [os.path.abspath(b.deepspeed_src_path(p)) for p in b.sources()]
    includes = [os.path.abspath(b.deepspeed_src_path(p)) for p in b.include_paths()]
    cflags = [*b.strip_empty_entries(b.cxx_args()), "-UC10_USE_GLOG"]  # as DeepSpeed's jit_load adds it
    ldflags = ce._prepare_ldflags(b.strip_empty_entries(b.extra_ldflags()), False, False, False, False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "build.ninja"
        ce._write_ninja_file_to_build_library(str(path), OP, sources, cflags, [], [], ldflags, includes, False, False,
                                              False)
        return shutil.which("ninja", path=os.environ.get("PATH")), path.read_text()


def op_build_reason() -> str | None:
    """Why loading DeepSpeed's CPU op in this process would compile it, or None when the build is up to date.

    The exact build file this process would write (DeepSpeed's flags through torch's own ninja-file writer) is put
    in a scratch copy of the build directory and `ninja -n -d explain` there says whether, and why, it would
    rebuild; the real build directory is not touched. Needs deepspeed importable (~4 s)."""

    build = op_root() / OP
    if not list(build.glob("*.so")):
        return f"not built yet in {build}"
    try:
        ninja, new = op_build_plan()
    except Exception as e:  # noqa: BLE001 - a check that cannot run must not stop training
        return f"unknown (the check failed: {type(e).__name__}: {e})"
    if ninja is None:
        return "no ninja on PATH (DeepSpeed cannot build its op)"
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / OP
        shutil.copytree(build, scratch, symlinks=True, ignore=shutil.ignore_patterns("lock"))
        old = (scratch / "build.ninja").read_text() if (scratch / "build.ninja").exists() else ""
        (scratch / "build.ninja").write_text(new)
        run = subprocess.run([ninja, "-n", "-d", "explain", "-C", str(scratch)], capture_output=True, text=True)
    said = (run.stdout + run.stderr).splitlines()
    if run.returncode == 0 and any("no work to do" in l for l in said):
        return None
    why = [l.split("explain: ", 1)[1] for l in said if "explain: " in l]
    why += [l.split("warning: ", 1)[1] for l in said if "warning: " in l]
    version = subprocess.run([ninja, "--version"], capture_output=True, text=True).stdout.strip()
    if old and old != new:
        gone = sorted(set(old.split()) - set(new.split()))
        came = sorted(set(new.split()) - set(old.split()))
        why.insert(0, f"the build command changed ({', '.join(gone[:3])} -> {', '.join(came[:3])}"
                      + ("; it was built through another path to the venv's files, e.g. a copy of the checkout "
                         "whose .venv links here" if any("site-packages" in w for w in gone) else "") + ")")
    if old == new and any("command line changed" in w for w in why):  # same command, hashed by another ninja
        why.insert(0, "the op was last built by another ninja binary (the same command, hashed another way in the "
                      "build log)")
        why = [w for w in why if "command line changed" not in w and "is dirty" not in w]
    if any("build log version" in w for w in why):  # the other ninja's log: every output looks new to this one
        why.insert(0, "the op was last built by another ninja binary, whose build log this one cannot read")
        why = [w for w in why if "command line not found" not in w and "is dirty" not in w]
    short = "; ".join(dict.fromkeys(w.strip() for w in why if w.strip())) or "ninja says it would rebuild"
    return f"{short} [ninja {version} at {ninja}]"


def build_op_here() -> int:
    """Compile the op in this process if it is not up to date, saying why first. Exit status 0; prints the seconds
    a compile took on the last line as `compiled-in: S` (0 when nothing was compiled)."""
    pin_op_build_env()
    reason = op_build_reason()
    took = 0.0
    if reason is not None:
        print(f"compiling DeepSpeed's CPU op {OP} (shared-memory collectives between ranks) into {op_root()}: "
              f"1-3 minutes, once per venv; why: {reason}", flush=True)
        t0 = time.perf_counter()
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
        ShareMemCommBuilder().load(verbose=False)
        took = time.perf_counter() - t0
    print(f"compiled-in: {took:.1f}", flush=True)
    return 0


def build_ops() -> float:
    """Compile DeepSpeed's CPU op (deepspeed_shm_comm) now if it is not up to date, saying why; returns the seconds.

    Left to the first launch, the build is a silent 1-3 min "starting" that a timing would charge to training.
    On a CUDA machine nothing is compiled for ZeRO-2 with torch's Adam, so nothing happens."""
    import torch
    if torch.cuda.is_available():
        return 0.0
    env = pin_op_build_env(dict(os.environ))
    run = subprocess.run([sys.executable, "-c", "import sys; from train.ops import build_op_here; "
                          "sys.exit(build_op_here())"], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = run.stdout.splitlines()
    for line in lines:
        if not line.startswith("compiled-in: ") and "Setting accelerator to CPU" not in line:
            print(line, flush=True)
    if run.returncode != 0:
        raise SystemExit(f"compare.py: error: building DeepSpeed's op {OP} failed (exit {run.returncode})")
    took = float(next((l.split(": ")[1] for l in lines if l.startswith("compiled-in: ")), 0.0))
    if took:
        print(f"compiled in {took:.0f} s (not counted in the timings below)", flush=True)
    return took

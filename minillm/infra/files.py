"""Files written and read safely: one way to stage and install a save, one check that a file named by an untrusted
directory is a regular file inside it, one reader of JSON objects with messages that name the file and line.

Staging: every save (a model, an adapter, a checkpoint, a cache file) is written into a hidden directory next to
its target, `.{target name}.minillm-staging-{host}-{pid}-{random}`, fsynced, and renamed into place only once
complete, so a failed save (full disk, an exception, Ctrl-C) leaves the previous version loadable. That name is
minillm's own: a later save removes a staging directory only when it carries this pattern, names this host and
its process is gone, so nothing minillm did not write is ever deleted. Files get mode 0666 & ~umask (0644
usually) and directories 0777 & ~umask: safetensors 0.8 (and so transformers' own save_pretrained) writes
weights 0600 beside a 0644 config.json; a checkpoint meant to be shared is readable as a whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Iterator

def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _hf_cache_blob(link: Path, target: Path) -> bool:
    """A Hugging Face cache snapshot (`<repo>/snapshots/<rev>/file`) links into `<repo>/blobs/`: allowed."""
    snapshot = link.parent
    return snapshot.parent.name == "snapshots" and target.parent == (snapshot.parent.parent / "blobs").resolve()


def checked_file(root: Path, name: object, what: str) -> Path:
    """`root/name` if it is a regular file inside `root`, else a ValueError naming it. Never opens it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: file name must be a non-empty string, got {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{what}: {name!r} is outside the checkpoint directory {root} (absolute or '..')")
    path = root / rel
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} does not exist") from None
    if stat.S_ISLNK(link.st_mode):
        target = path.resolve()
        if not (target.is_relative_to(root.resolve()) or _hf_cache_blob(path, target)):
            raise ValueError(f"{what}: {path} is a symlink to {target}, outside the checkpoint directory {root}")
    try:
        mode = os.stat(path).st_mode  # follows the link: the type of what would be opened
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} is a dangling symlink") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what}: {path} is {_file_kind(mode)}, not a regular file")
    return path


_STAGING = ".minillm-staging-"  # a staging directory: .{target name}.minillm-staging-{host}-{pid}-{random}


def _umask() -> int:
    with contextlib.suppress(OSError, StopIteration, ValueError):  # Linux: read it without changing it
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0)  # elsewhere: set and restore at once (racy with other threads creating files)
    os.umask(mask)
    return mask


def _remove_stale_staging(path: Path) -> None:
    """Remove staging directories of `path` left by a killed process of this host (pid no longer alive)."""
    prefix = f".{path.name}{_STAGING}{os.uname().nodename}-"
    for old in path.parent.glob(f".{path.name}{_STAGING}*"):
        rest = old.name[len(prefix):] if old.name.startswith(prefix) else ""
        pid = rest.split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue  # another host's, or one of this process's (in use)
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(staging: Path, path: Path) -> None:
    """Move every file of `staging` into `path`: one rename of the directory when `path` does not exist yet,
    otherwise one rename per file (weights and other files first, *.json last: config.json names the rest)."""
    mask = _umask()
    for root, dirs, files in os.walk(staging):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
            _fsync(Path(root, name))  # on disk before the rename makes it visible
    if not path.exists():
        try:
            os.rename(staging, path)
            _fsync(path.parent)
            return
        except OSError:
            if not path.exists():
                raise  # else another process created it meanwhile: install file by file
    if not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    for entry in sorted(staging.iterdir(), key=lambda p: (p.suffix == ".json", p.name)):
        target = path / entry.name
        if entry.is_dir() and target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    _fsync(path)


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Atomic save: write files into the yielded (empty, hidden) directory; when the block ends without
    an exception they replace their namesakes in `path` (other files of `path` are kept). On an exception
    nothing in `path` changes and the staging directory is removed.

        with staged_dir(out) as tmp:
            save_file(tensors, tmp / "model.safetensors"); (tmp / "config.json").write_text(...)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(path)
    staging = path.parent / f".{path.name}{_STAGING}{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _install(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`; not UTF-8, not JSON (its line named) or not an object is a ValueError naming the
    file. A non-finite number (NaN, Infinity, 1e999) is refused too: no setting of minillm's may be one."""
    def no_constant(name: str) -> Any:
        raise ValueError(name)

    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e} is not a number JSON allows") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a settings file") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def model_fingerprint(model_dir: str | Path, chunks: int = 16, chunk_bytes: int = 1 << 16) -> dict[str, Any]:
    """A cheap identity of a model directory, recorded beside an adapter (minillm_base.json) to notice it being
    loaded on another base: the sha256 of config.json and, per weight file (*.safetensors), its size and the sha256
    of `chunks` slices of `chunk_bytes` at evenly spaced offsets (first and last included). Reads at most 1 MiB per
    file, so a multi-GB checkpoint is fingerprinted in milliseconds; two different trainings of one architecture
    differ in their sampled bytes."""
    import hashlib

    root = Path(model_dir)
    out: dict[str, Any] = {"format": 1, "config_sha256": None, "weights": {}}
    if (root / "config.json").is_file():
        out["config_sha256"] = hashlib.sha256((root / "config.json").read_bytes()).hexdigest()
    for f in sorted(root.glob("*.safetensors")):
        size = f.stat().st_size
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for i in range(chunks):
                fh.seek(0 if chunks == 1 else (max(0, size - chunk_bytes) * i) // (chunks - 1))
                h.update(fh.read(chunk_bytes))
        out["weights"][f.name] = {"size": size, "sampled_sha256": h.hexdigest()}
    return out

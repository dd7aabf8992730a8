"""Files written and read safely: one way to stage and install a save, one check that a file named by an untrusted
directory is a regular file inside it, one reader of JSON objects with messages that name the file and line.

Staging: every save (a model, an adapter, a checkpoint, a cache file) is written into a hidden directory next to
its target, `.{target name}.minillm-staging-{host}-{pid}-{random}`, fsynced, and renamed into place only once
complete, so a failed save (full disk, an exception, Ctrl-C) leaves the previous version loadable. That name is
minillm's own: a later save removes a staging directory only when it carries this pattern, names this host and
its process is gone, so nothing minillm did not write is ever deleted (`remove_stale_staging`). One file is staged
the same way under the same name (`staged_file`, `write_atomic`). Files get mode 0666 & ~umask (0644
usually) and directories 0777 & ~umask: safetensors 0.8 (and so transformers' own save_pretrained) writes
weights 0600 beside a 0644 config.json; a checkpoint meant to be shared is readable as a whole.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Iterator

def file_kind(mode: int) -> str:
    """What a non-regular file is, for a sentence: "a FIFO (named pipe)", "a directory", ..."""
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
        raise ValueError(f"{what}: {path} is {file_kind(mode)}, not a regular file")
    return path


_STAGING = ".minillm-staging-"  # a staging entry: .{target name}.minillm-staging-{host}-{pid}-{random}


def staging_path(path: str | Path, pid: int | None = None, token: str | None = None) -> Path:
    """Where a save of `path` is staged: `.{name}.minillm-staging-{host}-{pid}-{random}` beside it. `pid`/`token`
    default to this process and a fresh random word; ranks that share one staging directory pass rank 0's."""
    path = Path(path)
    return path.parent / (f".{path.name}{_STAGING}{os.uname().nodename}-{os.getpid() if pid is None else pid}-"
                          f"{token or uuid.uuid4().hex[:8]}")


def is_staging(name: str) -> bool:
    """Whether `name` is minillm's staging name (of any host, process, target)."""
    return name.startswith(".") and _STAGING in name


def _dead_writer(name: str) -> bool:
    """A staging entry named by this host and a process that no longer exists (never this process's own)."""
    host, _, rest = name.partition(_STAGING)[2].rpartition("-")[0].rpartition("-")
    pid = rest
    if host != os.uname().nodename or not pid.isdigit() or int(pid) == os.getpid():
        return False  # another host's (its pids say nothing here), or this process's own (in use)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return False


def remove_stale_staging(directory: str | Path, target: str | None = None) -> list[Path]:
    """Remove the staging entries in `directory` (of `target` only, if given) that a killed minillm process of this
    host left: the name carries minillm's pattern, this host and a pid no longer alive. Nothing else is touched.
    Returns what was removed."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for old in directory.glob(f".{glob.escape(target)}{_STAGING}*" if target else f".*{_STAGING}*"):
        if _dead_writer(old.name):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
            removed.append(old)
    return removed


def _umask() -> int:
    with contextlib.suppress(OSError, StopIteration, ValueError):  # Linux: read it without changing it
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0)  # elsewhere: set and restore at once (racy with other threads creating files)
    os.umask(mask)
    return mask


def normalise_modes(directory: str | Path) -> None:
    """Files 0666 & ~umask, directories 0777 & ~umask, as transformers leaves them (safetensors writes 0600)."""
    mask = _umask()
    for root, _, files in os.walk(directory):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(staging: Path, path: Path) -> None:
    """Move every file of `staging` into `path`: one rename of the directory when `path` does not exist yet,
    otherwise one rename per file (weights and other files first, *.json last: config.json names the rest)."""
    normalise_modes(staging)
    for root, _, files in os.walk(staging):
        for name in files:
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
    remove_stale_staging(path.parent, path.name)
    staging = staging_path(path)
    staging.mkdir()
    try:
        yield staging
        _install(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Atomic save of one file: write the yielded path (a staging name beside `path`); when the block ends without
    an exception it is fsynced, given mode 0666 & ~umask and renamed over `path`; on an exception it is removed
    and `path` is unchanged.

        with staged_file(cache / "sft-1234.pt") as tmp:
            torch.save(data, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path.parent, path.name)
    tmp = staging_path(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """`path` holds `data` (text is UTF-8), or, after any failure, what it held before."""
    with staged_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def file_identity(path: str | Path) -> dict[str, Any]:
    """What tells a changed input file from the one a run or a cache was made from: absolute path, size, mtime."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`; not UTF-8, not JSON (its line named) or not an object is a ValueError naming the
    file. A non-finite number (NaN, Infinity, 1e999) is refused too: no setting of minillm's may be one."""
    def no_constant(name: str) -> Any:
        raise ValueError(name)

    def finite(text: str) -> float:
        if not math.isfinite(value := float(text)):
            raise ValueError(f"{text} (beyond a float's range)")
        return value

    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f, parse_constant=no_constant, parse_float=finite)
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

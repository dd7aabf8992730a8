"""Reading the data files, and the cache of what the scripts make of them (SFT's masked samples; pretraining's
token store is keyed here too).

A cache file is keyed by the files' identity (path, size, mtime), the tokenizer and the parameters, so a stale
one is never read; it is written under a temporary name and renamed, and a temporary left by a killed run is
removed once its writer is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from train.args import DataTrainingArguments, TrainingArguments, cache_root, fail

logger = logging.getLogger("minillm.train")


def read_or_fail(reader, files: list[str]):
    """Records of every file from a minillm.infra.corpus reader; a malformed line stops the run with its file:line."""
    for path in files:
        try:
            yield from reader(path)
        except ValueError as e:  # "file:line: what is wrong"
            fail(str(e))


def cache_path(data_args: DataTrainingArguments, kind: str, files: list[str], tokenizer, **params: Any) -> Path:
    """Where preprocessed data lives, keyed by the files' identity (path, size, mtime), the tokenizer and params.

    A changed file, tokenizer or parameter gives a new key, so a stale cache is never read.
    """
    root = cache_root(data_args)
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    return root / f"{kind}-{h.hexdigest()[:16]}.pt"


def cached(path: Path, build, training_args: TrainingArguments, desc: str):
    """Load `path` or build it (main process first; the others then read the file it wrote)."""
    with training_args.main_process_first(desc=desc):
        if training_args.process_index == 0:
            remove_dead_temporaries(path.parent)
        if path.exists():
            try:
                data = torch.load(path, weights_only=True)
                logger.info(f"{desc}: using cache {path}")
                return data
            except Exception as e:  # truncated or corrupt: the data can be rebuilt, so say so and rebuild
                logger.warning(f"{desc}: the cache file {path} is unreadable ({str(e).splitlines()[0][:120]}); "
                               "rebuilding it")
        data = build()
        if training_args.process_index == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(data, tmp)
            os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache
            logger.info(f"{desc}: cached to {path}")
        return data


def remove_dead_temporaries(cache_dir: Path) -> None:
    """Delete `*.tmp<pid>` cache files whose writer is gone (a run killed while caching); a live one is kept."""
    for tmp in cache_dir.glob("*.tmp*") if cache_dir.is_dir() else []:
        pid = tmp.suffix.removeprefix(".tmp")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            tmp.unlink(missing_ok=True)
            logger.warning(f"Removed {tmp}: a partial cache file left by a killed run")

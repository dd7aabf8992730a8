"""Reading the data files, and the cache of what the scripts make of them (SFT's masked samples; pretraining's
token store is keyed here too).

A cache file is keyed by the files' identity (path, size, mtime), the tokenizer and the parameters, so a stale
one is never read; it is written under minillm's staging name (minillm/infra/files.py) and renamed, and a staging
file left by a killed run is removed once its writer is gone. Nothing else in the cache directory is touched: a
user's `*.tmp123` stays where it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from minillm.infra.files import file_identity, remove_stale_staging, staged_file

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
        h.update("{path}|{size}|{mtime_ns}".format(**file_identity(f)).encode())
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
            with staged_file(path) as tmp:  # atomic: a killed run never leaves a half-written cache
                torch.save(data, tmp)
            logger.info(f"{desc}: cached to {path}")
        return data


def remove_dead_temporaries(cache_dir: Path) -> None:
    """Delete the staging files and directories a killed minillm run left in `cache_dir` (its own name, this host, a
    dead pid); a live one, and anything that is not minillm's, is kept."""
    for tmp in remove_stale_staging(cache_dir):
        logger.warning(f"Removed {tmp}: a partial cache file of minillm's, left by a killed run")

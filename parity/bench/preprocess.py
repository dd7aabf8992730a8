"""Pretraining preprocessing at corpus scale: minillm.infra.store.build_store vs the course's datasets pipeline.

    python -m parity.bench --only preprocess            # the bench case (>= 100 MB corpus; --quick: ~2 MB)
    python -m parity.bench.preprocess --scaling          # minillm's peak RSS at 10/40/160 MB, 1 and 2 workers

Both sides start from the same generated jsonl corpus (`synthetic_corpus`: the bundled sample repeated, each
copy shuffled and perturbed) and end with training blocks on disk:
- minillm: `build_store(workers=N)`: jsonl -> tokenizer processes -> uint16 token file;
- reference: the course's chapter-6 code (section 3.1.3): `load_dataset('json')`, `ds.map(tokenize_function,
  batched=True, num_proc=N, remove_columns=...)`, `.map(group_texts, batched=True, num_proc=N,
  batch_size=40000)` (group_texts from parity/course.py), datasets' Arrow cache in a fresh directory.
Each side runs in its own child process (TOKENIZERS_PARALLELISM=false on both: one core per process). Peak
memory: the parent samples the child and all its descendants (the tokenizer processes count) every 20 ms and
keeps the largest sums of PSS (the row: pages shared by forked workers split between them, so counted once)
and of VmRSS (shared pages counted in every process); the child also reports its own ru_maxrss and its
largest child's. Absolute figures: both include the ~260 MB of the imported libraries.
"Same output": the concatenated token ids of all documents agree (minillm's stream without its EOS
separators vs the course's tokenized column), compared by sha256 after the timed part.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 512


def synthetic_corpus(path: os.PathLike | str, n_bytes: int, seed: int = 0) -> Path:
    """A jsonl corpus of about n_bytes: the bundled pretrain.jsonl, then copies of it with the lines
    shuffled, digits permuted and each text rotated at a random character (so copies are not identical text)."""
    from minillm.infra.corpus import SAMPLE_PRETRAIN, iter_pretrain_texts

    texts = list(iter_pretrain_texts(SAMPLE_PRETRAIN))
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        rep = 0
        while written < n_bytes:
            order = list(range(len(texts)))
            digits = list("0123456789")
            if rep:
                rng.shuffle(order)
                rng.shuffle(digits)
            table = str.maketrans("0123456789", "".join(digits))
            for i in order:
                t = texts[i]
                if rep:
                    k = rng.randrange(len(t)) if t else 0
                    t = (t[k:] + " " + t[:k]).translate(table)
                line = json.dumps({"text": t}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                if written >= n_bytes:
                    break
            rep += 1
    return Path(path)


# ---- child side: one pipeline, timed, then its output hashed --------------------------------------------------

def _print(d: dict) -> None:
    print(json.dumps(d), flush=True)


def _peaks() -> dict:
    # VmHWM, not RUSAGE_SELF: Linux carries ru_maxrss across exec, so it would include the launching parent's peak
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"self_maxrss_mb": hwm_kb / 1024,
            "largest_child_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _child(side: str, corpus_path: str, workers: int, block_size: int, tmp: str) -> None:
    from transformers import AutoTokenizer

    from minillm.infra.corpus import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    h = hashlib.sha256()
    _print({"ready": True})
    if side == "minillm":
        from minillm.infra.store import TOKENS, StoreDataset, build_store

        t0 = time.perf_counter()
        report = build_store(Path(tmp) / "store", [corpus_path], tok, block_size, tok.eos_token_id, workers=workers)
        seconds = time.perf_counter() - t0
        _print({"seconds": seconds, **_peaks()})
        ds = StoreDataset(Path(tmp) / "store")
        raw = np.memmap(Path(tmp) / "store" / TOKENS, dtype=ds.dtype, mode="r")
        for i in range(0, len(raw), 1 << 24):
            chunk = np.asarray(raw[i:i + (1 << 24)])
            h.update(chunk[chunk != tok.eos_token_id].astype(np.int32).tobytes())
        tokens, blocks = report.tokens - report.documents, len(ds)
        disk = (Path(tmp) / "store" / TOKENS).stat().st_size
        get = ds.__getitem__
    else:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "hf")
        import datasets
        from datasets import load_dataset

        from parity.course import course_group_texts

        datasets.disable_progress_bars()
        t0 = time.perf_counter()
        # --- the course's code (chapter 6, 3.1.3), num_proc = workers ---
        ds = load_dataset("json", data_files=corpus_path, cache_dir=str(Path(tmp) / "hf"))
        column_names = list(ds["train"].features)

        def tokenize_function(examples):
            output = tok([item for item in examples["text"]])
            return output

        tokenized_datasets = ds.map(tokenize_function, batched=True, num_proc=workers or None,
                                    remove_columns=column_names, load_from_cache_file=True,
                                    desc="Running tokenizer on dataset")
        lm_datasets = tokenized_datasets.map(course_group_texts, fn_kwargs={"block_size": block_size}, batched=True,
                                             num_proc=workers or None, load_from_cache_file=True,
                                             desc=f"Grouping texts in chunks of {block_size}", batch_size=40000)
        train_dataset = lm_datasets["train"]
        seconds = time.perf_counter() - t0
        _print({"seconds": seconds, **_peaks()})
        tokens = 0
        for chunk in tokenized_datasets["train"].data.column("input_ids").chunks:
            flat = np.asarray(chunk.flatten(), dtype=np.int32)
            h.update(flat.tobytes())
            tokens += len(flat)
        blocks = len(train_dataset)
        disk = sum(os.path.getsize(c["filename"]) for d in (tokenized_datasets, lm_datasets)
                   for c in d["train"].cache_files)
        train_dataset = train_dataset.with_format("torch")
        get = train_dataset.__getitem__
    # random access to one block: what a training step's DataLoader does (the store-vs-Arrow question)
    idx = np.random.default_rng(0).integers(0, blocks, size=2000)
    t0 = time.perf_counter()
    for i in idx:
        get(int(i))
    get_us = (time.perf_counter() - t0) / len(idx) * 1e6
    _print({"sha256": h.hexdigest(), "tokens": tokens, "blocks": blocks, "disk_bytes": disk, "getitem_us": get_us})


# ---- parent side ------------------------------------------------------------------------------------------------

def _tree_memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) of pid and all its descendants, summed (kB); processes that vanish mid-read count 0.
    The RSS sum counts pages shared by forked workers (imported libraries) once per process; PSS splits them."""
    rss, pss, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                rss += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            with open(f"/proc/{p}/smaps_rollup") as f:
                pss += next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return rss, pss


def run_side(side: str, corpus_path: Path, workers: int, block_size: int = BLOCK_SIZE,
             nice: int = 0, timeout_s: float = 3600) -> dict:
    """Run one side in a child process; its timing, peak tree RSS (sampled, up to the end of the timed part)
    and output hash."""
    with tempfile.TemporaryDirectory(prefix=f"minillm-pre-{side}-") as tmp:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        cmd = [sys.executable, "-m", "parity.bench.preprocess", "--child", side, "--corpus", str(corpus_path),
               "--workers", str(workers), "--block-size", str(block_size), "--tmp", tmp]
        stderr = open(Path(tmp) / "stderr.txt", "w+")
        proc = subprocess.Popen(["nice", "-n", str(nice), *cmd] if nice else cmd, cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        lines: list[dict] = []

        def read() -> None:
            for line in proc.stdout:
                lines.append(json.loads(line))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        peak, base, t_end = (0, 0), None, time.monotonic() + timeout_s
        while proc.poll() is None:
            if base is None and lines:
                base = _tree_memory_kb(proc.pid)  # after imports and tokenizer load: the pipeline's memory is on top
            if len(lines) < 2:  # up to the end of the timed part
                peak = tuple(map(max, peak, _tree_memory_kb(proc.pid)))
            if time.monotonic() > t_end:
                proc.kill()
                raise TimeoutError(f"{side} ran over {timeout_s}s")
            time.sleep(0.02)
        reader.join()
        stderr.seek(0)
        err = stderr.read()
        stderr.close()
        if proc.returncode != 0 or len(lines) < 3:
            raise RuntimeError(f"{side} child failed ({proc.returncode}): {err.strip()[-2000:]}")
        base = base or (0, 0)
        return {**lines[1], **lines[2], "peak_tree_rss_mb": peak[0] / 1024, "peak_tree_pss_mb": peak[1] / 1024,
                "base_rss_mb": base[0] / 1024, "base_pss_mb": base[1] / 1024}


def preprocess_case(quick: bool, workers: int = 2, nice: int = 0) -> dict:
    """The bench case: both sides on one generated corpus (2 MB --quick, else 120 MB)."""
    n_bytes = (2 if quick else 120) * 10**6
    with tempfile.TemporaryDirectory(prefix="minillm-pre-corpus-") as d:
        path = synthetic_corpus(Path(d) / "corpus.jsonl", n_bytes)
        ml = run_side("minillm", path, workers, nice=nice)
        ref = run_side("reference", path, workers, nice=nice)
    same = ml["sha256"] == ref["sha256"] and ml["tokens"] == ref["tokens"]
    return {"corpus_mb": n_bytes / 1e6, "workers": workers, "block_size": BLOCK_SIZE,
            "path": "minillm.infra.store.build_store(workers=N): jsonl -> tokenizer processes -> uint16 token file",
            "reference": "course 3.1.3: load_dataset('json') + map(tokenize, num_proc=N) + map(group_texts, num_proc=N)",
            "seconds": {"minillm": ml["seconds"], "reference": ref["seconds"]},
            "tokens_s": {"minillm": ml["tokens"] / ml["seconds"], "reference": ref["tokens"] / ref["seconds"]},
            "peak_mb": {"minillm": ml["peak_tree_pss_mb"], "reference": ref["peak_tree_pss_mb"]},
            "peak_rss_sum_mb": {"minillm": ml["peak_tree_rss_mb"], "reference": ref["peak_tree_rss_mb"]},
            "detail": {"minillm": ml, "reference": ref}, "same_output": bool(same),
            "check": "sha256 of all documents' token ids (minillm without EOS) equal"}


def scaling(sizes_mb: list[int], workers: list[int], nice: int = 0) -> list[dict]:
    """minillm's build at several corpus sizes: peak tree RSS and tokens/s."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="minillm-pre-scaling-") as d:
        for mb in sizes_mb:
            path = synthetic_corpus(Path(d) / f"c{mb}.jsonl", mb * 10**6)
            for w in workers:
                r = run_side("minillm", path, w, nice=nice)
                rows.append({"corpus_mb": mb, "workers": w, "seconds": r["seconds"],
                             "tokens_s": r["tokens"] / r["seconds"], "peak_tree_rss_mb": r["peak_tree_rss_mb"],
                             "peak_tree_pss_mb": r["peak_tree_pss_mb"],
                             "main_maxrss_mb": r["self_maxrss_mb"], "worker_maxrss_mb": r["largest_child_maxrss_mb"]})
                print(json.dumps(rows[-1]), flush=True)
            path.unlink()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m parity.bench.preprocess")
    ap.add_argument("--child", choices=("minillm", "reference"))
    ap.add_argument("--corpus")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=BLOCK_SIZE)
    ap.add_argument("--tmp")
    ap.add_argument("--scaling", action="store_true", help="minillm's peak RSS and tokens/s at --sizes x --worker-counts")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 40, 160], help="corpus sizes in MB")
    ap.add_argument("--worker-counts", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--nice", type=int, default=0, help="run the children under nice -n N")
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.corpus, args.workers, args.block_size, args.tmp)
    elif args.scaling:
        scaling(args.sizes, args.worker_counts, args.nice)
    else:
        print(json.dumps(preprocess_case(quick=False, workers=args.workers, nice=args.nice), indent=1, default=float))


if __name__ == "__main__":
    main()

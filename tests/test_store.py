"""The token store (minillm/infra/store.py): blocks equal to the Chunker's, deterministic for any worker count, bounded
memory while building and reading, killed builds never look complete and resume from finished files and from the
last committed segment within a file, the lock file removed safely, the validation split, streaming sharded over
ranks x DataLoader workers, and resume landing on the same block."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minillm.infra import corpus
from minillm.chunk import Chunker
from minillm.infra.store import (INDEX, STORE_VERSION, TOKENS, StoreDataset, StreamingBlocks, _exclusive, build_store,
                                 is_complete, open_store, split_sizes, store_splits, token_dtype, wait_for_store)

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(corpus.TOKENIZER_DIR)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """Three jsonl files cut from the bundled sample (1200, 1 and 800 documents; the middle one tiny, so blocks
    straddle file boundaries)."""
    d = tmp_path_factory.mktemp("corpus")
    lines = corpus.SAMPLE_PRETRAIN.read_text(encoding="utf-8").splitlines(keepends=True)
    out = []
    for i, part in enumerate((lines[:1200], lines[1200:1201], lines[1201:2001])):
        p = d / f"f{i}.jsonl"
        p.write_text("".join(part), encoding="utf-8")
        out.append(str(p))
    return out


def chunker_blocks(files: list[str], tok, block_size: int) -> np.ndarray:
    """Today's path (train/pretrain.py before the store): HF tokenizer calls of 1000 documents, streaming Chunker."""
    texts = [t for f in files for t in corpus.iter_pretrain_texts(f)]
    batches = ({"input_ids": tok(texts[i:i + 1000], add_special_tokens=False)["input_ids"]}
               for i in range(0, len(texts), 1000))
    blocks = [b["input_ids"] for b in Chunker(block_size, eos_token_id=tok.eos_token_id).blocks(batches)]
    return np.concatenate(blocks)


@pytest.fixture(scope="module")
def store(tmp_path_factory, files, tok) -> Path:
    path = tmp_path_factory.mktemp("stores") / "s0.store"
    report = build_store(path, files, tok, BLOCK, tok.eos_token_id, workers=0, batch_docs=300)
    assert report.files_built == 3 and report.documents == 2001
    return path


def test_blocks_equal_the_chunkers_and_index(store, files, tok):
    ds = StoreDataset(store)
    want = chunker_blocks(files, tok, BLOCK)
    got = np.stack([ds.block(i) for i in range(len(ds))])
    np.testing.assert_array_equal(got, want)
    item = ds[3]
    assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (BLOCK,)
    assert torch.equal(item["labels"], item["input_ids"]) and item["labels"] is not item["input_ids"]
    index = json.loads((store / INDEX).read_text())
    assert index["complete"] is True and index["dtype"] == np.dtype(np.uint16).str and index["documents"] == 2001
    assert index["n_blocks"] == len(ds) == index["n_tokens"] // BLOCK
    assert [s["path"] for s in index["sources"]] == [os.path.abspath(f) for f in files]
    assert [s["size"] for s in index["sources"]] == [os.path.getsize(f) for f in files]
    assert (store / TOKENS).stat().st_size == 2 * index["n_tokens"]
    assert sorted(os.listdir(store)) == [INDEX, TOKENS]  # parts removed once joined
    with pytest.raises(IndexError):
        ds.block(len(ds))


def test_same_bytes_with_worker_pool_and_small_batches(store, files, tok, tmp_path):
    """Ordered output: 2 tokenizer processes and other batch sizes give a byte-identical token file."""
    build_store(tmp_path / "s2", files, tok, BLOCK, tok.eos_token_id, workers=2, batch_docs=37, batch_chars=5000)
    assert (tmp_path / "s2" / TOKENS).read_bytes() == (store / TOKENS).read_bytes()
    assert build_store(tmp_path / "s2", files, tok, BLOCK, tok.eos_token_id, workers=2).files_built == 0  # complete


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32 and token_dtype(151_936) == np.uint32


def test_validation_split_as_run_clm(store):
    full = StoreDataset(store)
    train, val = store_splits(store, 10)
    n_val = round(len(full) * 0.10)
    assert len(val) == n_val and len(train) == len(full) - n_val
    np.testing.assert_array_equal(val.block(0), full.block(0))  # run_clm: validation = train[:p%]
    np.testing.assert_array_equal(train.block(0), full.block(n_val))
    np.testing.assert_array_equal(train.block(len(train) - 1), full.block(len(full) - 1))
    assert store_splits(store, 0)[1] is None
    assert split_sizes(1000, 5) == (50, 950)
    for bad in (-1, 100, 150):
        with pytest.raises(ValueError, match="validation_split_percentage"):
            split_sizes(1000, bad)
    with pytest.raises(ValueError, match="leaves 0 for validation"):
        split_sizes(5, 1)


def test_bad_line_named_and_nothing_complete(tmp_path, files, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": 5}\n')
    path = tmp_path / "s"
    with pytest.raises(ValueError, match=f"{bad}:3: 'text' is a JSON int"):
        build_store(path, [files[1], str(bad)], tok, BLOCK, tok.eos_token_id, workers=2)
    assert not path.exists() and not is_complete(path)
    assert (tmp_path / "s.partial" / "part-00000.json").exists()  # the good file before it is kept for a rerun
    with pytest.raises(FileNotFoundError, match="not a complete token store"):
        StoreDataset(path)


KILLER = textwrap.dedent("""
    import sys
    from transformers import AutoTokenizer
    from minillm.infra import corpus
    from minillm.infra.store import build_store
    tok = AutoTokenizer.from_pretrained(corpus.TOKENIZER_DIR)
    build_store(sys.argv[1], sys.argv[2:], tok, 64, tok.eos_token_id, workers=1, batch_docs=20)
""")


def test_killed_build_never_looks_complete_and_resumes(tmp_path, store, files, tok):
    """SIGKILL while the second file is being written: no store under the final name, waiting ranks time out
    with a sentence naming it; the rerun reuses the first file's part and gives the same bytes as a clean build."""
    path = tmp_path / "k.store"
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(path), *files], cwd=ROOT,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    partial = tmp_path / "k.store.partial"
    deadline = time.monotonic() + 120
    while not ((partial / "part-00000.json").exists() and (partial / "part-00001.bin.tmp").exists()
               or (partial / "part-00002.bin.tmp").exists()):
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.2)  # the orphaned pool worker sees its parent gone
    assert not path.exists() and not is_complete(path)
    with pytest.raises(TimeoutError, match="k.store"):
        wait_for_store(path, timeout_s=0.3, poll_s=0.05)
    report = build_store(path, files, tok, BLOCK, tok.eos_token_id, workers=0)
    assert report.files_reused >= 1 and report.files_reused + report.files_built == 3
    assert (path / TOKENS).read_bytes() == (store / TOKENS).read_bytes()
    assert not partial.exists()


def test_waiting_rank_maps_the_builders_store(tmp_path, store, files, tok):
    """A non-building rank waits for the completeness marker of a store that agrees with its own arguments
    (files, tokenizer, block_size, EOS: issue 19), then reads the same blocks."""
    path = tmp_path / "w.store"
    waiter = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from transformers import AutoTokenizer
        from minillm.infra.corpus import TOKENIZER_DIR
        from minillm.infra.store import open_store
        tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        ds = open_store({str(path)!r}, {files!r}, tok, {BLOCK}, tok.eos_token_id, build=False, timeout_s=120)
        print(len(ds), ds.block(len(ds) - 1).tolist())
    """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    ds = open_store(path, files, tok, BLOCK, tok.eos_token_id, build=True, workers=0)
    out, _ = waiter.communicate(timeout=120)
    n, last = out.split(" ", 1)
    assert int(n) == len(ds) and json.loads(last) == ds.block(len(ds) - 1).tolist()


def test_reading_rss_stays_flat(tmp_path):
    """Reading every block of a 32 MB store leaves RSS flat (a kept np.memmap would grow it by the file size)."""
    path = tmp_path / "big.store"
    path.mkdir()
    n = 16 * 2**20  # uint16 tokens: 32 MB
    np.arange(n, dtype=np.uint16).tofile(path / TOKENS)
    (path / INDEX).write_text(json.dumps({  # every key the reader checks (issue 19)
        "version": STORE_VERSION, "dtype": "<u2", "n_tokens": n, "block_size": 1024, "n_blocks": n // 1024,
        "complete": True, "tokenizer": "-", "eos_token_id": None, "specials_as_text": False, "max_token_id": 65535,
        "documents": 0, "max_id": 65535, "sources": [{"path": "-", "size": 0, "mtime_ns": 0, "n_tokens": n}]}))
    code = textwrap.dedent(f"""
        import numpy as np
        from minillm.infra.store import StoreDataset
        def rss():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) // 1024
        ds = StoreDataset({str(path)!r})
        ds[0]
        before = rss()
        s = 0
        for i in range(len(ds)):
            s += int(ds[i]["input_ids"][-1])
        pread = rss() - before
        mm = np.memmap({str(path / TOKENS)!r}, dtype=np.uint16, mode="r")
        before = rss()
        for i in range(0, len(mm), 1024):
            s += int(mm[i + 1023])
        print(pread, rss() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    pread_mb, memmap_mb = map(int, out.stdout.split())
    assert memmap_mb >= 24, memmap_mb  # the measurement can see growth: the mapping's pages count in RSS
    assert pread_mb <= 4, pread_mb


BUILD_RSS = textwrap.dedent("""
    import json, resource, sys
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from minillm.infra.store import build_store
    # A byte-level tokenizer without merges: one token per byte, fast, and the most tokens per corpus byte.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.add_special_tokens(["<eos>"])
    r = build_store(sys.argv[1], [sys.argv[2]], tok, 256, tok.token_to_id("<eos>"), workers=1, batch_docs=200)
    # VmHWM of this process (ru_maxrss would carry pytest's own peak across exec); the pool's largest worker
    hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
    print(json.dumps({"tokens": r.tokens, "main": hwm, "worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
""")


def test_build_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak RSS of the building process and of its tokenizer process, at a 2 MB and an 8 MB corpus: the growth
    stays below what keeping the tokens would cost (5.8M more tokens: 12 MB as uint16, 46 MB as int64)."""
    from parity.bench.preprocess import synthetic_corpus

    peaks = []
    for mb in (2, 8):
        src = synthetic_corpus(tmp_path / f"c{mb}.jsonl", mb * 10**6)
        out = subprocess.run([sys.executable, "-c", BUILD_RSS, str(tmp_path / f"s{mb}"), str(src)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        assert out.returncode == 0, out.stderr[-2000:]
        peaks.append(json.loads(out.stdout))
    small, big = peaks
    assert big["tokens"] > 3.5 * small["tokens"]  # the corpus did grow (~1 token per byte)
    for proc in ("main", "worker"):
        growth_mb = (big[proc] - small[proc]) / 1024
        # measured: main 0.4, tokenizer process 3.2 (tokenizers' BPE word cache filling up; it is capped)
        assert growth_mb < 8, (proc, growth_mb, peaks)


def test_streaming_every_block_once_over_2_ranks_x_2_workers(files, tok):
    """Each of the 4 shards (2 ranks simulated by arguments x 2 real DataLoader workers) yields its own blocks;
    together exactly the blocks of one unsharded pass, each once."""
    def blocks(ds, workers):
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        return [tuple(b["input_ids"].tolist()) for b in dl]

    kw = dict(block_size=BLOCK, eos_token_id=tok.eos_token_id, window_docs=100)
    whole = blocks(StreamingBlocks(files, tok, **kw), 0)
    per_rank = [blocks(StreamingBlocks(files, tok, rank=r, world_size=2, **kw), 2) for r in range(2)]
    assert all(len(p) > 0 for p in per_rank)
    got = per_rank[0] + per_rank[1]
    assert len(got) == len(whole) and sorted(got) == sorted(whole)
    assert not set(per_rank[0]) & set(per_rank[1])
    # the unsharded pass is each window of 100 documents chunked on its own (tail dropped)
    texts = [t for f in files for t in corpus.iter_pretrain_texts(f)]
    want = []
    for i in range(0, len(texts), 100):
        stream = [t for ids in tok(texts[i:i + 100], add_special_tokens=False)["input_ids"]
                  for t in ids + [tok.eos_token_id]]
        want += [tuple(stream[j:j + BLOCK]) for j in range(0, len(stream) // BLOCK * BLOCK, BLOCK)]
    assert whole == want
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        StreamingBlocks(files, tok, rank=2, world_size=2, **kw)


def test_resume_lands_on_the_same_next_block(store):
    """The Trainer's path: a RandomSampler that accelerate replaces with its seeded sampler, and on resume
    skip_first_batches. A fresh process (the store reopened, the seed set again) gets the same next batch."""
    from accelerate import skip_first_batches
    from accelerate.data_loader import prepare_data_loader

    def loader():
        torch.manual_seed(42)  # the Trainer's set_seed(args.seed) before building the dataloader
        ds = StoreDataset(store)
        dl = torch.utils.data.DataLoader(ds, batch_size=4, sampler=torch.utils.data.RandomSampler(ds), num_workers=2)
        return prepare_data_loader(dl, put_on_device=False, use_seedable_sampler=True, data_seed=42)

    first = [b["input_ids"] for _, b in zip(range(6), loader())]
    resumed = next(iter(skip_first_batches(loader(), 5)))["input_ids"]
    assert torch.equal(resumed, first[5])
    assert not torch.equal(first[4], first[5])


def test_huge_document_tokenized_in_pieces_same_ids(tmp_path, tok):
    """A 300k-character document between two small ones: the store holds exactly the whole-text ids (encode_texts
    cuts it into pieces of 64k characters) followed by EOS."""
    texts = list(corpus.iter_pretrain_texts(corpus.SAMPLE_PRETRAIN, limit=3000))
    huge = "\n".join(texts)[:300_000]
    docs = ["short one", huge, "short two"]
    src = tmp_path / "huge.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    build_store(tmp_path / "h", [str(src)], tok, BLOCK, tok.eos_token_id, workers=1, batch_chars=1000)
    want = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    got = np.fromfile(tmp_path / "h" / TOKENS, dtype=np.uint16)
    assert got.tolist() == want


SEGMENT_KILLER = textwrap.dedent("""
    import sys
    from transformers import AutoTokenizer
    from minillm.infra import corpus
    from minillm.infra.store import build_store
    tok = AutoTokenizer.from_pretrained(corpus.TOKENIZER_DIR)
    build_store(sys.argv[1], [sys.argv[2]], tok, 64, tok.eos_token_id, workers=1, batch_docs=50, segment_bytes=1 << 18)
""")


def test_killed_mid_file_resumes_from_the_last_segment(tmp_path, tok):
    """SIGKILL inside one 2 MB file once a segment (256 KB of source) is committed, plus a torn tail past the
    commit: the rerun (2 workers) tokenizes only the documents after the committed offset, drops the tail, and
    writes the bytes and index of an uninterrupted build (0 workers). The killed builder's lock file blocks no one."""
    from parity.bench.preprocess import synthetic_corpus

    src = str(synthetic_corpus(tmp_path / "one.jsonl", 2 * 10**6))
    path, lock = tmp_path / "m.store", tmp_path / "m.store.lock"
    progress = tmp_path / "m.store.partial" / "part-00000.progress.json"
    proc = subprocess.Popen([sys.executable, "-c", SEGMENT_KILLER, str(path), src], cwd=ROOT,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    deadline = time.monotonic() + 120
    while not progress.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    seg = json.loads(progress.read_text())
    assert 0 < seg["offset"] < os.path.getsize(src) and seg["documents"] > 0 and not path.exists()
    with open(progress.with_name("part-00000.bin.tmp"), "ab") as f:
        f.write(b"\xff" * 1001)  # tokens written after the last commit, the last one torn
    assert lock.exists()  # left behind by the killed builder, but its flock died with it (and its tokenizer process)
    with open(lock) as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the killed builder's lock is still held"
                time.sleep(0.05)
    logs: list[str] = []
    report = build_store(path, [src], tok, BLOCK, tok.eos_token_id, workers=2, batch_docs=50, segment_bytes=1 << 18,
                         log=logs.append)
    assert any(f"resuming at byte {seg['offset']} " in line for line in logs), logs
    assert report.documents_reused == seg["documents"]
    assert report.documents_tokenized == report.documents - seg["documents"] > 0
    clean = build_store(tmp_path / "c.store", [src], tok, BLOCK, tok.eos_token_id, workers=0)
    assert clean.documents_tokenized == clean.documents == report.documents
    assert (path / TOKENS).read_bytes() == (tmp_path / "c.store" / TOKENS).read_bytes()
    assert json.loads((path / INDEX).read_text()) == json.loads((tmp_path / "c.store" / INDEX).read_text())
    assert sorted(os.listdir(tmp_path)) == ["c.store", "m.store", "one.jsonl"]  # no partial, no lock files
    assert sorted(os.listdir(path)) == [INDEX, TOKENS]


def test_progress_of_a_changed_file_is_dropped(tmp_path, tok):
    """A build stopped by a malformed last line keeps its committed segments: the rerun resumes there and names the
    same (absolute) line. A file touched since (mtime) or fixed (size) no longer matches the progress: a warning,
    and it is tokenized from the start, into the ids of a direct tokenization."""
    lines = corpus.SAMPLE_PRETRAIN.read_text(encoding="utf-8").splitlines(keepends=True)[:3000]
    src = tmp_path / "one.jsonl"
    src.write_text("".join(lines) + "\n" + '{"text": 5}\n', encoding="utf-8")  # a blank line, then a bad one
    path, kw = tmp_path / "s", dict(workers=0, batch_docs=100, segment_bytes=1 << 16)
    progress = tmp_path / "s.partial" / "part-00000.progress.json"
    bad = f"{src}:{len(lines) + 2}: 'text' is a JSON int"
    logs: list[str] = []
    with pytest.raises(ValueError, match=bad):
        build_store(path, [str(src)], tok, BLOCK, tok.eos_token_id, log=logs.append, **kw)
    seg = json.loads(progress.read_text())
    assert 0 < seg["line"] < len(lines) and not logs
    with pytest.raises(ValueError, match=bad):
        build_store(path, [str(src)], tok, BLOCK, tok.eos_token_id, log=logs.append, **kw)
    assert len(logs) == 1 and f"resuming at byte {seg['offset']} (line {seg['line']}:" in logs[0]
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, another mtime
    logs.clear()
    with pytest.warns(UserWarning, match="another version of the file.*from the start"), \
            pytest.raises(ValueError, match=bad):
        build_store(path, [str(src)], tok, BLOCK, tok.eos_token_id, log=logs.append, **kw)
    assert not logs
    src.write_text("".join(lines) + "\n" + '{"text": "five"}\n', encoding="utf-8")
    with pytest.warns(UserWarning, match="from the start"):
        report = build_store(path, [str(src)], tok, BLOCK, tok.eos_token_id, **kw)
    assert report.documents_reused == 0 and report.documents_tokenized == report.documents == len(lines) + 1
    texts = list(corpus.iter_pretrain_texts(src))
    want = [t for ids in tok(texts, add_special_tokens=False)["input_ids"] for t in ids + [tok.eos_token_id]]
    assert np.fromfile(path / TOKENS, dtype=np.uint16).tolist() == want


def test_lock_file_removed_and_a_waiter_relocks(tmp_path, files, tok):
    """No lock file beside a finished store, also when a stale one (no process holds it) was there first. A builder
    waiting on the lock file that the holder removes as it finishes locks a new file instead (holding the removed
    one would exclude no later builder)."""
    lock = tmp_path / "l.store.lock"
    lock.write_text("")
    build_store(tmp_path / "l.store", files[1:2], tok, BLOCK, tok.eos_token_id)
    assert is_complete(tmp_path / "l.store") and not lock.exists()
    seen: list[bool] = []

    def waiter() -> None:
        with _exclusive(lock):
            seen.append(lock.exists())

    with _exclusive(lock):
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.3)  # the waiter is blocked in flock on this very file
        assert not seen and lock.exists()
    t.join(10)
    assert seen == [True] and not lock.exists()


def test_progress_of_another_tokenizer_is_never_resumed_onto(tmp_path, tok):
    """Build 1 (eos = the tokenizer's) commits segments and stops; build 2 (another eos: another key) starts the
    file afresh and stops before its first commit; build 3 (build 1's set-up again) must not resume build 1's record
    on top of build 2's tokens: it tokenizes from the start and equals a clean build. A damaged record ({}) restarts
    the file too, with a warning."""
    lines = corpus.SAMPLE_PRETRAIN.read_text(encoding="utf-8").splitlines(keepends=True)[:3000]
    src = tmp_path / "one.jsonl"
    src.write_text("".join(lines) + '{"text": 5}\n', encoding="utf-8")
    path, kw = tmp_path / "s", dict(workers=0, batch_docs=100, segment_bytes=1 << 16)
    progress = tmp_path / "s.partial" / "part-00000.progress.json"
    with pytest.raises(ValueError, match="is a JSON int"):
        build_store(path, [str(src)], tok, BLOCK, tok.eos_token_id, **kw)
    assert json.loads(progress.read_text())["n_tokens"] > 0
    with pytest.warns(UserWarning, match="another tokenizer"), pytest.raises(ValueError, match="is a JSON int"):
        build_store(path, [str(src)], tok, BLOCK, tok.eos_token_id + 1, **{**kw, "segment_bytes": 1 << 40})  # no commit
    src.write_text("".join(lines), encoding="utf-8")
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))
    report = build_store(path, [str(src)], tok, BLOCK, tok.eos_token_id, **kw)
    assert report.documents_reused == 0
    clean = tmp_path / "clean"
    build_store(clean, [str(src)], tok, BLOCK, tok.eos_token_id, **kw)
    assert (path / TOKENS).read_bytes() == (clean / TOKENS).read_bytes()
    # a damaged progress record
    src2 = tmp_path / "two.jsonl"
    src2.write_text("".join(lines) + '{"text": 5}\n', encoding="utf-8")
    path2 = tmp_path / "s2"
    with pytest.raises(ValueError, match="is a JSON int"):
        build_store(path2, [str(src2)], tok, BLOCK, tok.eos_token_id, **kw)
    (tmp_path / "s2.partial" / "part-00000.progress.json").write_text("{}")
    src2.write_text("".join(lines), encoding="utf-8")
    with pytest.warns(UserWarning, match="from the start"):
        report = build_store(path2, [str(src2)], tok, BLOCK, tok.eos_token_id, **kw)
    assert report.documents_reused == 0 and (path2 / TOKENS).read_bytes() == (clean / TOKENS).read_bytes()

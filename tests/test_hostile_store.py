"""The token store is not trusted as written (issue 19, class 2): its files must be regular files of the store,
its index must agree with the run, its ids must fit the model; a full disk is one sentence.

Table-driven. `STORE_ROWS`: each row damages a freshly built store (block_size 8) and asks the builder for
block_size `run_block`; the user gets either a rebuilt store that agrees with the run, with a warning naming
the file and key ("rebuilt"), or a StoreError naming the file ("refused") while nothing on disk changes (the
store's files, the user's file the damage points at) and nothing can be read from the store.
`API_ROWS`: the other ways in (a waiting rank, the dataset, the id check, the tokenizers, the block size).
Every test runs under test_hostile_files' alarm: a FIFO that blocked a reader would fail it, not hang the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minillm.infra import corpus
from minillm.infra.store import (INDEX, TOKENS, StoreDataset, StoreError, StreamingBlocks, build_store,
                                 check_ids_fit, check_store, is_complete, max_token_id, wait_for_store, _expected)

from test_hostile_files import no_hang  # noqa: E402,F401 (autouse: a hung reader fails the test)

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 8


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(corpus.TOKENIZER_DIR / "tokenizer.json"))


EOS = 0  # <|endoftext|> in the bundled tokenizer


@pytest.fixture
def env(tmp_path, tok):
    """A built store (block_size 8) of 40 sample documents, and a user's file outside it."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(corpus.SAMPLE_PRETRAIN.read_text(encoding="utf-8").splitlines(True)[:40]))
    store = tmp_path / "s.store"
    build_store(store, [str(data)], tok, BLOCK, EOS)
    outside = tmp_path / "user.txt"
    outside.write_bytes(b"the user's own bytes\n" * 50)
    return {"store": store, "data": data, "outside": outside, "tmp": tmp_path}


def edit_index(**changes):
    def mutate(e):
        index = json.loads((e["store"] / INDEX).read_text())
        index.update(changes)
        (e["store"] / INDEX).write_text(json.dumps(index))
    return mutate


def write(name: str, data: bytes):
    def mutate(e):
        (e["store"] / name).write_bytes(data)
    return mutate


def link(name: str, to: str):
    def mutate(e):
        (e["store"] / name).unlink()
        os.symlink(e[to] if to in e else e["store"] / to, e["store"] / name)
    return mutate


def fifo(name: str):
    def mutate(e):
        (e["store"] / name).unlink()
        os.mkfifo(e["store"] / name)
    return mutate


def touch_source(e):
    st = e["data"].stat()
    os.utime(e["data"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def user_file_inside(e):
    (e["store"] / "notes.md").write_text("mine")


def tokens_as_passwd(e):
    """The reported attack: tokens.bin -> /etc/passwd (here the user's file), an index of one-byte ids."""
    link(TOKENS, "outside")(e)
    edit_index(dtype="|u1", n_tokens=e["outside"].stat().st_size, n_blocks=e["outside"].stat().st_size // BLOCK)(e)


IDX, TOK = "{store}/index.json", "{store}/tokens.bin"
# (case, damage, run's block_size, "rebuilt" | "refused", the exact sentence ("..." ends a prefix))
STORE_ROWS = [
    ("index says block 8, the run asks 32", lambda e: None, 32, "rebuilt",
     f"{IDX}: 'block_size' is 8, this run's is 32: rebuilding the token store {{store}}"),
    ("index names another tokenizer", edit_index(tokenizer="0123456789abcdef"), BLOCK, "rebuilt",
     f"{IDX}: 'tokenizer' is '0123456789abcdef', this run's is "),
    ("index names another eos", edit_index(eos_token_id=5), BLOCK, "rebuilt",
     f"{IDX}: 'eos_token_id' is 5, this run's is 0: rebuilding the token store {{store}}"),
    ("index dtype one byte", edit_index(dtype="|u1"), BLOCK, "rebuilt",
     f"{IDX}: 'dtype' is '|u1', expected one of ['<u2', '<u4']: rebuilding the token store {{store}}"),
    ("index dtype too narrow for the tokenizer", edit_index(dtype="<u2", max_token_id=70000), BLOCK, "rebuilt",
     f"{IDX}: 'max_token_id' is 70000, expected an id >= 0 that 'dtype' can hold: rebuilding the token store {{store}}"),
    ("index block_size 0", edit_index(block_size=0), BLOCK, "rebuilt",
     f"{IDX}: 'block_size' is 0, expected an integer >= 1: rebuilding the token store {{store}}"),
    ("index block_size a string", edit_index(block_size="8"), BLOCK, "rebuilt",
     f"{IDX}: 'block_size' is '8', expected an integer >= 1: rebuilding the token store {{store}}"),
    ("index n_tokens bigger than tokens.bin", edit_index(n_tokens=10**9, n_blocks=10**9 // BLOCK), BLOCK, "rebuilt",
     f"{IDX}: 'sources' is [..."),  # the first key found wrong: the files' counts no longer add up
    ("index max_id above max_token_id", edit_index(max_id=10**6), BLOCK, "rebuilt",
     f"{IDX}: 'max_id' is 1000000, expected the largest id stored, at most max_token_id (-1 for no tokens): "
     f"rebuilding the token store {{store}}"),
    ("index is not JSON", write(INDEX, b'{"version": 2, "dty'), BLOCK, "rebuilt",
     f"{IDX}: malformed JSON ("),
    ("index is a list", write(INDEX, b"[1]"), BLOCK, "rebuilt",
     f"{IDX}: is a JSON list, not an object: rebuilding the token store {{store}}"),
    ("index nested 100,000 deep", write(INDEX, b"[" * 100_000 + b"]" * 100_000), BLOCK, "rebuilt",
     f"{IDX}: JSON nested more than 64 levels deep (minillm.infra.corpus.MAX_DEPTH): rebuilding the token store {{store}}"),
    ("tokens.bin truncated", lambda e: os.truncate(e["store"] / TOKENS, 10), BLOCK, "rebuilt",
     f"{TOK}: 10 bytes, but {IDX} says "),
    ("source file changed since the build", touch_source, BLOCK, "rebuilt", f"{IDX}: 'sources' is "),
    ("tokens.bin a symlink to a user's file", link(TOKENS, "outside"), BLOCK, "refused",
     f"{TOK}: is a symlink (to {{outside}}); the store's files are never links: the store is not used; remove "
     "{store} to rebuild it"),
    ("tokens.bin -> user file, one-byte dtype", tokens_as_passwd, BLOCK, "refused",
     f"{TOK}: is a symlink (to {{outside}}); the store's files are never links: the store is not used; remove "
     "{store} to rebuild it"),
    ("index.json a symlink inside the store", link(INDEX, TOKENS), BLOCK, "refused",
     f"{IDX}: is a symlink (to {{store}}/tokens.bin); the store's files are never links: the store is not used; "
     "remove {store} to rebuild it"),
    ("index.json a FIFO", fifo(INDEX), BLOCK, "refused",
     f"{IDX}: is a FIFO (named pipe), not a regular file: the store is not used; remove {{store}} to rebuild it"),
    ("tokens.bin a FIFO", fifo(TOKENS), BLOCK, "refused",
     f"{TOK}: is a FIFO (named pipe), not a regular file: the store is not used; remove {{store}} to rebuild it"),
    ("a user's file inside the store dir", user_file_inside, 32, "refused",
     "{store}: holds notes.md, which a token store never holds: the store is not used and nothing in it deleted; "
     "move them away or remove the directory"),
]


def snapshot(d: Path) -> dict:
    """Every entry under d as (kind, bytes or link target); FIFOs are not opened."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            out[p.name] = ("link", os.readlink(p))
        elif p.is_fifo():
            out[p.name] = ("fifo", None)
        elif p.is_file():
            out[p.name] = ("file", p.read_bytes())
    return out


def fill(text: str, e: dict) -> str:
    return text.format(store=e["store"], outside=e["outside"])


@pytest.mark.parametrize("case,damage,run_block,outcome,sentence", STORE_ROWS, ids=[r[0] for r in STORE_ROWS])
def test_store_that_disagrees_is_rebuilt_or_refused(env, tok, case, damage, run_block, outcome, sentence):
    damage(env)
    files, store = [str(env["data"])], env["store"]
    user_before = env["outside"].read_bytes()
    if outcome == "rebuilt":
        with pytest.warns(UserWarning) as caught:
            build_store(store, files, tok, run_block, EOS)
        said = [str(w.message) for w in caught if "rebuilding the token store" in str(w.message)]
        assert len(said) == 1 and said[0].startswith(fill(sentence.split("...")[0], env)), said
        check_store(store, files, tok, run_block, EOS)  # agrees with the run now
        ds = StoreDataset(store, block_size=run_block)
        assert ds[0]["input_ids"].shape == (run_block,)  # rows of the run's block size, not the index's
        fresh = env["tmp"] / "fresh.store"
        build_store(fresh, files, tok, run_block, EOS)
        assert (store / TOKENS).read_bytes() == (fresh / TOKENS).read_bytes()
    else:
        before = snapshot(store)
        with pytest.raises(StoreError) as e:
            build_store(store, files, tok, run_block, EOS)
        assert str(e.value) == fill(sentence, env)
        assert snapshot(store) == before  # nothing deleted or rewritten
        assert not is_complete(store) or case.startswith("a user's file")
        with pytest.raises((StoreError, FileNotFoundError)):  # nothing can be trained on it either
            wait_for_store(store, timeout_s=0.2, poll_s=0.05,
                           expected=_expected(files, tok, run_block, EOS, False))
    assert env["outside"].read_bytes() == user_before


# ---- the other ways in ------------------------------------------------------------------------------------------

def gap_tokenizer():
    """A WordLevel tokenizer whose vocabulary has gaps: 3 entries, ids up to 70,000 (uint16 would wrap them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 70000}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return t


def row_waiting_rank_sees_block_8(env, tok):
    """A waiting rank (not the builder) never reads a store of block 8 for a run of 32: it waits, then says why."""
    with pytest.raises(TimeoutError) as e:
        wait_for_store(env["store"], timeout_s=0.3, poll_s=0.05,
                       expected=_expected([str(env["data"])], tok, 32, EOS, False))
    s = env["store"]
    return str(e.value), (f"waited 0s for the token store {s} to be built by the main process (no build has started: "
                          f"{s}.partial; last seen: {s}/index.json: 'block_size' is 8, this run's is 32); if that "
                          "process died, rerun, and the build resumes from its finished files")


def row_dataset_asked_for_32(env, tok):
    with pytest.raises(StoreError) as e:
        StoreDataset(env["store"], block_size=32)
    return str(e.value), f"{env['store']}/index.json: 'block_size' is 8, this run's is 32"


def row_ids_past_model_vocab(env, tok):
    ds = StoreDataset(env["store"])
    check_ids_fit(ds, tok.get_vocab_size())  # the tokenizer's own model: fits
    with pytest.raises(StoreError) as e:
        check_ids_fit(ds, 16)
    m = ds.max_id
    return str(e.value), (f"{env['store']}/index.json ('max_id'): token ids go up to {m}, past the model's vocabulary "
                          f"of 16 (ids 0..15): train with the tokenizer the model was made for, or a model with "
                          f"vocab_size >= {m + 1}")


def row_streaming_ids_past_model_vocab(env, tok):
    with pytest.raises(StoreError) as e:
        check_ids_fit(StreamingBlocks([str(env["data"])], tok, BLOCK, EOS), 16)
    return str(e.value), ("the tokenizer (its largest id, added tokens included): token ids go up to 4095, past the "
                          "model's vocabulary of 16 (ids 0..15): train with the tokenizer the model was made for, or "
                          "a model with vocab_size >= 4096")


def row_tokens_changed_after_build(env, tok):
    """Ids written into tokens.bin after the build (same size: the index still matches) are never a batch."""
    ds = StoreDataset(env["store"])
    with open(env["store"] / TOKENS, "r+b") as f:
        f.seek(BLOCK * 2 * 3)
        f.write(np.full(BLOCK, 65535, np.uint16).tobytes())  # block 3
    ds[2]
    with pytest.raises(StoreError) as e:
        ds[3]
    return str(e.value), (f"{env['store']}/tokens.bin: block 3 holds id 65535, not what {env['store']}/index.json "
                          f"records ('n_tokens', 'max_id' {ds.max_id}): the file changed after the build; remove "
                          f"{env['store']} to rebuild it")


def row_ids_past_65535_from_a_small_vocab(env, tok):
    """get_vocab_size() is 3 but an id is 70,000: stored as uint32, not wrapped to 4,464."""
    t = gap_tokenizer()
    data = env["tmp"] / "ab.jsonl"
    data.write_text("".join(json.dumps({"text": "a b b a"}) + "\n" for _ in range(4)))
    store = env["tmp"] / "gap.store"
    build_store(store, [str(data)], t, 4, None)
    ds = StoreDataset(store)
    assert t.get_vocab_size() == 3 and max_token_id(t) == 70000 and ds.dtype == np.uint32
    assert ds[0]["input_ids"].tolist() == [1, 70000, 70000, 1] and ds.max_id == 70000
    with pytest.raises(StoreError) as e:
        check_ids_fit(ds, 3)
    return str(e.value), f"{store}/index.json ('max_id'): token ids go up to 70000, past the model's vocabulary of 3 "


def row_block_size_0_build(env, tok):
    with pytest.raises(StoreError) as e:
        build_store(env["tmp"] / "z.store", [str(env["data"])], tok, 0, EOS)
    assert not (env["tmp"] / "z.store").exists() and not (env["tmp"] / "z.store.partial").exists()
    return str(e.value), "block_size must be an integer >= 1, got 0"


def row_block_size_0_streaming(env, tok):
    with pytest.raises(StoreError) as e:
        StreamingBlocks([str(env["data"])], tok, 0, EOS)
    return str(e.value), "block_size must be an integer >= 1, got 0"


def row_block_size_0_dataset(env, tok):
    with pytest.raises(StoreError) as e:
        StoreDataset(env["store"], block_size=0)
    return str(e.value), "block_size must be an integer >= 1, got 0"


def row_symlink_planted_in_the_build_dir(env, tok):
    """A link where the build writes its part (in <store>.partial) is never written through."""
    partial = env["tmp"] / "p.store.partial"
    partial.mkdir()
    os.symlink(env["outside"], partial / "part-00000.bin.tmp")
    with pytest.raises(StoreError) as e:
        build_store(env["tmp"] / "p.store", [str(env["data"])], tok, BLOCK, EOS)
    assert not (env["tmp"] / "p.store").exists()
    return str(e.value), (f"{partial}/part-00000.bin.tmp: is a symlink (to {env['outside']}); the store's files are "
                          "never links: refusing to write through it")


FULL_DISK = """
import resource, signal, sys
from tokenizers import Tokenizer
from minillm.infra.corpus import TOKENIZER_DIR
from minillm.infra.store import StoreError, build_store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # no file may grow past 4 KB: the disk is "full"
tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
try:
    build_store(sys.argv[1], [sys.argv[2]], tok, 8, 0)
except StoreError as e:  # what a script prints before exiting 1
    print(e)
    sys.exit(1)
"""


def row_full_disk_during_build(env, tok):
    """A write that fails mid-build (here: the file-size limit, EFBIG; a full disk is ENOSPC) is one sentence;
    nothing appears under the store's name, and a rerun with room resumes and finishes."""
    store, data = env["tmp"] / "d.store", env["tmp"] / "big.jsonl"
    data.write_text("".join(corpus.SAMPLE_PRETRAIN.read_text(encoding="utf-8").splitlines(True)[:400]))
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(store), str(data)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not store.exists() and (env["tmp"] / "d.store.partial").exists()
    build_store(store, [str(data)], tok, BLOCK, EOS)  # room again: finishes
    assert is_complete(store)
    return out.stdout.strip(), (f"{store}.partial: File too large while building the token store {store} (nothing "
                                f"installed there); free space, or fix the cause, and rerun: the build resumes from "
                                f"{store}.partial")


API_ROWS = [row_waiting_rank_sees_block_8, row_dataset_asked_for_32, row_ids_past_model_vocab,
            row_streaming_ids_past_model_vocab, row_tokens_changed_after_build, row_ids_past_65535_from_a_small_vocab,
            row_block_size_0_build, row_block_size_0_streaming, row_block_size_0_dataset,
            row_symlink_planted_in_the_build_dir, row_full_disk_during_build]


@pytest.mark.parametrize("row", API_ROWS, ids=[r.__name__[4:] for r in API_ROWS])
def test_other_ways_in(env, tok, row):
    """Each row returns (what the user got, the sentence expected: whole, or a prefix where it ends with a space)."""
    user_before = env["outside"].read_bytes()
    got, want = row(env, tok)
    assert (got.startswith(want) if want.endswith(" ") else got == want), (got, want)
    assert env["outside"].read_bytes() == user_before

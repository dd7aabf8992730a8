"""parity.mutants' runner on a few tiny mutants (the whole set is `make mutants`, minutes): a planted bug is applied in
a scratch copy only, caught when a check fails there, survives when none does, and a snippet that no longer
matches is STALE, not caught. Plus the curated set's shape: >= 25 mutants, every hand-written part covered."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from parity import mutants as pm
from parity.__main__ import AREAS

ROOT = Path(__file__).resolve().parents[1]
# `python -m minillm.chunk` imports the module from the scratch copy and does nothing: rc 0 unless the mutant breaks it
IMPORT_CHUNK = "minillm.chunk"


def test_the_set_covers_every_hand_written_part():
    names = [m.name for m in pm.MUTANTS]
    assert len(names) >= 25 and len(set(names)) == len(names)
    for part in ("rope-", "attn-", "mask-", "norm-", "cache-", "positions-", "sampling-", "generate-", "loss-",
                 "fused-", "chunk-", "sft-", "lora-", "ckpt-", "glue-", "ia3-", "houlsby-", "dpo-", "pref-"):
        assert any(n.startswith(part) for n in names), part
    for kind in ("linear", "dynamic", "yarn", "llama3", "mscale", "temperature", "top-k", "top-p", "dora", "rslora"):
        assert any(kind in n for n in names), kind
    for m in pm.MUTANTS:
        assert m.old != m.new and m.checks and m.bug, m.name
        assert (ROOT / m.file).is_file(), m.name
        for check in m.checks:
            words = check.split()
            assert words[0] in ("parity", "pytest"), (m.name, check)
            if words[0] == "parity":
                area = words[words.index("--only") + 1]
                assert area in AREAS, f"{m.name}: `python -m parity --only {area}` is not an area ({AREAS})"
            else:
                for node in (w for w in words[1:] if not w.startswith("-") and w != "no:cacheprovider"):
                    assert (ROOT / node.split("::")[0]).is_file(), (m.name, node)


def test_apply_plants_once_and_reports_stale(tmp_path):
    pm.copy_tree(tmp_path)
    for name in pm.COPIED:
        assert (tmp_path / name).exists(), name
    m = next(m for m in pm.MUTANTS if m.name == "sampling-temperature")
    before = (tmp_path / m.file).read_text()
    assert pm.apply(m, tmp_path) is None
    after = (tmp_path / m.file).read_text()
    assert after == before.replace(m.old, m.new) and after != before
    assert (ROOT / m.file).read_text().count(m.old) == 1  # the repository itself is untouched
    assert "found 0 times" in pm.apply(m, tmp_path)  # applied already: the snippet is gone
    twice = pm.Mutant("twice", m.file, "import ", "import  ", (IMPORT_CHUNK,), "ambiguous")
    assert "must be once" in pm.apply(twice, tmp_path)
    missing = pm.Mutant("missing", "minillm/nope.py", "x", "y", (IMPORT_CHUNK,), "no file")
    assert "does not exist" in pm.apply(missing, tmp_path)


@pytest.mark.parametrize("new, verdict", [
    ("IGNORE_INDEX = -100\nraise SystemExit(3)", "caught"),  # the check fails in the scratch copy
    ("IGNORE_INDEX = -100  # a comment changes nothing", "SURVIVED"),
])
def test_run_mutant_caught_or_survived_in_a_scratch_copy(tmp_path, new, verdict):
    assert importlib.util.find_spec(IMPORT_CHUNK) is not None
    m = pm.Mutant("probe", "minillm/chunk.py", "IGNORE_INDEX = -100", new, (IMPORT_CHUNK,), "probe")
    r = pm.run_mutant(m, tmp_path, timeout=60)
    assert r.verdict == verdict, r
    assert r.caught_by == (IMPORT_CHUNK if verdict == "caught" else "-")
    assert not (tmp_path / "probe").exists()  # the scratch copy is removed
    assert "raise SystemExit(3)" not in (ROOT / "minillm/chunk.py").read_text()


def test_stale_is_not_caught(tmp_path):
    m = pm.Mutant("stale", "minillm/chunk.py", "this snippet is not in the file", "x", (IMPORT_CHUNK,), "stale")
    r = pm.run_mutant(m, tmp_path, timeout=60)
    assert r.verdict == "STALE" and r.caught_by == "-"
    assert "STALE" in pm.format_results([r])


def test_every_hypothesis_draw_is_the_same_however_the_tests_are_started():
    """Issue 25 item 11: tests/conftest.py loads a derandomized profile, which explicit @settings inherit, and
    parity's harness derandomizes every row: a check draws the same examples alone, in its file, in the whole suite
    and under `make mutants` (which runs single node ids and parity rows), so they all catch the same bugs."""
    import random

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from parity.harness import property_rows

    assert settings.default.derandomize and settings.default.database is None

    def draws() -> list:
        seen = []

        @settings(max_examples=15)  # as the tests write it: derandomize is not named, the profile supplies it
        @given(st.integers(0, 10**9))
        def prop(x):
            seen.append(x)

        prop()
        return seen

    def row_draws() -> list:
        seen = []
        property_rows([("probe", "-", "chunk")], st.integers(0, 10**9), lambda x: seen.append(x) or [0.0], 15)
        return seen

    first, first_rows = draws(), row_draws()
    random.seed(12345)  # whatever ran before (another test, another order) advances the global random state
    random.random()
    assert draws() == first and row_draws() == first_rows

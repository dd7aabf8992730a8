"""The README's "Read it" table is true of this commit: the files exist, their line counts are the ones shown, the
total is within the 3,000 lines a reader is promised; and every module of minillm/ is named in the Layout."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _read_it_rows() -> list[tuple[str, int]]:
    section = README[README.index("## Read it"):]
    section = section[:section.index("\nThen, when")]
    return [(f, int(n)) for f, n in re.findall(r"^\| \d+ \| `([^`]+)` \| (\d+) \|", section, flags=re.M)]


def test_read_it_counts_are_this_commits():
    rows = _read_it_rows()
    assert len(rows) >= 8
    for path, lines in rows:
        actual = sum(1 for _ in open(ROOT / path, encoding="utf-8"))
        assert actual == lines, f"README's Read it says {path} has {lines} lines; it has {actual}"
    total = sum(n for _, n in rows)
    assert f"**{total}**" in README and f"{total:,} lines" in README
    assert total <= 3000


def test_layout_names_every_minillm_module():
    layout = README[README.index("## Layout"):README.index("## Read it")]
    for path in sorted((ROOT / "minillm").rglob("*.py")):
        if path.name != "__init__.py":
            assert path.name in layout, f"README's Layout does not name {path.relative_to(ROOT)}"


def test_use_it_snippet_runs_as_printed(tmp_path, monkeypatch):
    """The README's first code block, executed as a user would paste it (in an empty working directory)."""
    section = README[README.index("## Use it"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Use it)", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "out/tiny/model.safetensors").is_file()
    assert (tmp_path / "out/tiny-lora/adapter_config.json").is_file()

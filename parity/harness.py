"""The parity table: one Row per check, and a runner for hypothesis-drawn property checks.

A check draws configs with hypothesis, computes max |Δ| between minillm and the reference for each,
and fails (with hypothesis' shrunk counterexample) when one exceeds the tolerance. The row records
how many configs were tried and the worst |Δ| seen over all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from parity.tolerances import tol


# `python -m parity --rows TEXT` (repeatable): only properties with a row whose name contains one of these
# texts (case-insensitive) are run; the others return no rows without drawing a config. Set by select_rows.
_ROW_FILTER: list[str] = []


def select_rows(patterns: list[str] | None) -> None:
    _ROW_FILTER[:] = [p.lower() for p in patterns or []]


# `python -m parity --fail-fast`: report the first failing draw as drawn, without hypothesis' shrinking (which
# reruns the check many times to find a minimal config: worth it to debug, not to learn *whether* it fails).
_PHASES: list[Phase] = list(Phase)


def fail_fast(on: bool = True) -> None:
    _PHASES[:] = [p for p in Phase if not (on and p in (Phase.shrink, Phase.explain))]


def selected(check: str) -> bool:
    return not _ROW_FILTER or any(p in check.lower() for p in _ROW_FILTER)


@dataclass
class Row:
    check: str
    reference: str
    configs: int
    max_delta: float
    tolerance: float
    passed: bool
    note: str = ""
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        if self.note.startswith("skipped"):
            return "SKIP"
        return "PASS" if self.passed else "FAIL"


def property_rows(
    specs: list[tuple[str, str, str]],
    strategy: st.SearchStrategy,
    measure: Callable[[Any], list[float]],
    max_examples: int,
) -> list[Row]:
    """Several rows from one property: `measure(drawn)` returns one max |Δ| per (check, reference, tol_name)
    in `specs` (e.g. logits, loss and grads of the same forward/backward). Fails on the first draw where any
    |Δ| exceeds its tolerance, after hypothesis has shrunk it to a minimal config."""
    if not any(selected(check) for check, _, _ in specs):
        return []  # not selected (--rows): nothing drawn, nothing measured
    limits = [tol(t) for _, _, t in specs]
    deltas: list[list[float]] = []
    t0 = time.perf_counter()

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,  # reproducible tables: the same configs on every run
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        phases=list(_PHASES),
    )
    @given(strategy)
    def prop(drawn):
        got = [float(d) for d in measure(drawn)]
        deltas.append(got)
        bad = [f"{c}: |Δ| = {d:.3g} > {lim:g}" for (c, _, _), d, lim in zip(specs, got, limits) if not d <= lim]
        assert not bad, f"{'; '.join(bad)} for {drawn!r}"

    note = ""
    try:
        prop()
    except AssertionError as e:  # hypothesis re-raises the shrunk failure
        note = str(e).splitlines()[0][:300]
    seconds = time.perf_counter() - t0
    columns = [[d[i] for d in deltas] for i in range(len(specs))]
    within = [bool(col) and all(d <= lim for d in col) for col, lim in zip(columns, limits)]
    if note and all(within):
        within = [False] * len(specs)  # the measurement itself failed (an assert inside measure): every row fails
    return [Row(check, reference, len(col), max(col, default=float("nan")), limit, ok, "" if ok else note,
                seconds / len(specs))
            for (check, reference, _), col, limit, ok in zip(specs, columns, limits, within)]


def property_check(check: str, reference: str, tol_name: str, strategy: st.SearchStrategy,
                   measure: Callable[[Any], float], max_examples: int) -> Row:
    """One row: `measure(drawn)` returns max |Δ| for one hypothesis-drawn input (a SKIP row if not selected)."""
    rows = property_rows([(check, reference, tol_name)], strategy, lambda d: [measure(d)], max_examples)
    return rows[0] if rows else Row(check, reference, 0, float("nan"), tol(tol_name), True, "skipped (not selected)")


def fixed_check(check: str, reference: str, tol_name: str, deltas: list[float], note: str = "", t0: float | None = None) -> Row:
    """A Row from a list of |Δ| measured over fixed cases (e.g. a user's checkpoint)."""
    limit = tol(tol_name)
    worst = max(deltas, default=float("nan"))
    return Row(check, reference, len(deltas), worst, limit, bool(deltas) and worst <= limit, note,
               0.0 if t0 is None else time.perf_counter() - t0)


def _tol_text(t: float) -> str:
    short = f"{t:.0e}"
    return short if float(short) == t or t != t else f"{t:g}"  # 1e-06 as 1e-06, 1.5 as 1.5 (not 2e+00)


def named_check(check: str, reference: str, tol_name: str, fn: Callable[[Any], float], named: dict[str, Any]) -> Row:
    """A Row from `fn(case)` over named fixed cases; a failing row names its worst case."""
    t0 = time.perf_counter()
    deltas = {label: fn(case) for label, case in named.items()}
    worst = max(deltas, key=deltas.get)
    return fixed_check(check, reference, tol_name, list(deltas.values()), t0=t0,
                       note="" if deltas[worst] <= tol(tol_name) else f"worst: {worst}")


def format_table(rows: list[Row]) -> str:
    head = ("check", "reference", "configs", "max |Δ|", "tolerance", "verdict")
    body = [
        (r.check, r.reference, str(r.configs), f"{r.max_delta:.2e}", _tol_text(r.tolerance),
         r.verdict + (f" ({r.note})" if r.note else ""))
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *map(line, body)])

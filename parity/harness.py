"""The parity table: one Row per check, and a runner for hypothesis-drawn property checks.

A check draws configs with hypothesis, computes max |Δ| between minillm and the reference for each,
and fails (with hypothesis' shrunk counterexample) when one exceeds the tolerance. The row records
how many configs were tried and the worst |Δ| seen over all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.tolerances import tol


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


@dataclass
class _Tracker:
    deltas: list[float] = field(default_factory=list)


def property_check(
    check: str,
    reference: str,
    tol_name: str,
    strategy: st.SearchStrategy,
    measure: Callable[[Any], float],
    max_examples: int,
    seed: int = 0,
) -> Row:
    """Run `measure(drawn)` (returns max |Δ|) on `max_examples` hypothesis draws; build the Row."""
    limit = tol(tol_name)
    tracker = _Tracker()
    t0 = time.perf_counter()

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,  # reproducible tables: the same configs on every run
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(strategy)
    def prop(drawn):
        delta = float(measure(drawn))
        tracker.deltas.append(delta)
        assert delta <= limit, f"|Δ| = {delta:.3g} > {limit:g} for {drawn!r}"

    note = ""
    try:
        prop()
        passed = True
    except AssertionError as e:  # hypothesis re-raises the shrunk failure
        passed, note = False, str(e).splitlines()[0][:200]
    return Row(
        check=check,
        reference=reference,
        configs=len(tracker.deltas),
        max_delta=max(tracker.deltas, default=float("nan")),
        tolerance=limit,
        passed=passed,
        note=note,
        seconds=time.perf_counter() - t0,
    )


def fixed_check(check: str, reference: str, tol_name: str, deltas: list[float], note: str = "", t0: float | None = None) -> Row:
    """A Row from a list of |Δ| measured over fixed cases (e.g. a user's checkpoint)."""
    limit = tol(tol_name)
    worst = max(deltas, default=float("nan"))
    return Row(check, reference, len(deltas), worst, limit, bool(deltas) and worst <= limit, note,
               0.0 if t0 is None else time.perf_counter() - t0)


def format_table(rows: list[Row]) -> str:
    head = ("check", "reference", "configs", "max |Δ|", "tolerance", "verdict")
    body = [
        (r.check, r.reference, str(r.configs), f"{r.max_delta:.2e}", f"{r.tolerance:.0e}",
         r.verdict + (f" ({r.note})" if r.note else ""))
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *map(line, body)])

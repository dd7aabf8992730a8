"""`python -m parity`: every check of minillm against transformers/peft, one table, exit 1 on failure.

    python -m parity              # the standard budget (a few minutes on 2 cores)
    python -m parity --budget 3   # 3x more hypothesis-drawn configs per check
    python -m parity --only model # one area: model, data, lora
    python -m parity --only model --rows generate --budget 0.3   # a subset, quickly
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from parity.harness import fail_fast, format_table, select_rows, selected

AREAS = ("model", "data", "lora", "generate", "dtype", "peft_methods", "eval", "dpo")  # parity/<area>.py: each has rows(budget)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity", description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1.0, help="multiplier on the number of drawn configs")
    ap.add_argument("--only", choices=AREAS, action="append", help="run only these areas")
    ap.add_argument("--rows", action="append", metavar="TEXT",
                    help="only checks whose name contains TEXT (case-insensitive, repeatable); other drawn checks "
                         "are not run (what `python -m parity.mutants` uses to run a subset quickly)")
    ap.add_argument("--fail-fast", action="store_true",
                    help="a failing check reports its first failing config without shrinking it (much faster)")
    args = ap.parse_args(argv)
    select_rows(args.rows)
    fail_fast(args.fail_fast)

    rows, t0 = [], time.perf_counter()
    areas = args.only or list(AREAS)
    print(f"parity: {len(areas)} area(s), one at a time ({', '.join(areas)}); its rows as they are measured, "
          "then the table (a few minutes in all on 2 cores, longer under load)", flush=True)
    for i, area in enumerate(areas, 1):
        started = time.perf_counter()
        print(f"== area {i}/{len(areas)} {area}: started ({started - t0:.0f} s in)", flush=True)
        module = importlib.import_module(f"parity.{area}")
        n = len(rows)
        for row in module.rows(args.budget):
            if not selected(row.check):
                continue
            rows.append(row)
            print(f"[{len(rows):2d}] {row.verdict:4s} {row.check:<38s} max|Δ|={row.max_delta:.2e} "
                  f"tol={row.tolerance:.0e} configs={row.configs} ({row.seconds:.1f}s)", flush=True)
        bad = sum(r.verdict == "FAIL" for r in rows[n:])
        print(f"== area {i}/{len(areas)} {area}: finished, {len(rows) - n} rows"
              + (f", {bad} FAILED" if bad else "") + f" in {time.perf_counter() - started:.0f} s", flush=True)
    print()
    print(format_table(rows))
    failed = [r for r in rows if r.verdict == "FAIL"]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed or skipped in {time.perf_counter() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

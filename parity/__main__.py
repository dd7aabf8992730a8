"""`python -m parity`: every check of minillm against transformers/peft, one table, exit 1 on failure.

    python -m parity              # the standard budget (a few minutes on 2 cores)
    python -m parity --budget 3   # 3x more hypothesis-drawn configs per check
    python -m parity --only model # one area: model, data, lora
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from parity.harness import format_table

AREAS = ("model", "data", "lora")  # parity/model.py, parity/data.py, parity/lora.py: each has rows(budget)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity", description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1.0, help="multiplier on the number of drawn configs")
    ap.add_argument("--only", choices=AREAS, action="append", help="run only these areas")
    args = ap.parse_args(argv)

    rows, t0 = [], time.perf_counter()
    for area in args.only or AREAS:
        module = importlib.import_module(f"parity.{area}")
        for row in module.rows(args.budget):
            rows.append(row)
            print(f"[{len(rows):2d}] {row.verdict:4s} {row.check:<38s} max|Δ|={row.max_delta:.2e} "
                  f"tol={row.tolerance:.0e} configs={row.configs} ({row.seconds:.1f}s)", flush=True)
    print()
    print(format_table(rows))
    failed = [r for r in rows if r.verdict == "FAIL"]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed or skipped in {time.perf_counter() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

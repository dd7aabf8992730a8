"""Regenerate train/reference_curves.json: the demo's pretraining and full SFT, run with several seeds.

    python train/reference_curves.py [--seeds 1 2 3] [--nproc 2]     (~2-4 min per seed on 2 CPU cores)

Each seed runs exactly the demo's commands (train/demo.py pretrain_args / sft_args, ZeRO-2 on 2 ranks) with
that --seed (initial weights and data order). The per-step losses of every seed are stored, and each final
model's bits per byte on the bundled held-out text (minillm/data/eval/heldout.yaml, never trained on, scored as
lm-eval's loglikelihood_rolling: `heldout_bpb`); train/doctor.py draws the bands from them and places a user's run
against them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from train.compare import ROOT, launch
from train.doctor import HELDOUT, heldout_bpb
from train.ops import build_ops
from train.demo import pretrain_args, sft_args, shared_args

OUT = ROOT / "train" / "reference_curves.json"


def losses(run_dir: Path) -> list[float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--pretrain_steps", type=int, default=200)
    ap.add_argument("--sft_steps", type=int, default=300)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    build_ops()
    curves = {"pretrain": {"args": pretrain_args(args.pretrain_steps), "seeds": {}, "heldout_bpb": {}},
              "sft": {"args": sft_args("full", Path("PRETRAIN_OUTPUT"), args.sft_steps), "seeds": {},
                      "heldout_bpb": {}}}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            base, sft = Path(tmp, f"pre-{seed}"), Path(tmp, f"sft-{seed}")
            launch("pretrain.py", args.nproc, "torchrun",
                   ["--impl", "minillm", "--output_dir", str(base), *shared_args(seed),
                    *pretrain_args(args.pretrain_steps)],
                   Path(tmp, f"pre-{seed}.log"))
            curves["pretrain"]["seeds"][str(seed)] = losses(base)
            curves["pretrain"]["heldout_bpb"][str(seed)] = heldout_bpb(base)
            launch("finetune.py", args.nproc, "torchrun",
                   [*sft_args("full", base, args.sft_steps), "--output_dir", str(sft), *shared_args(seed)],
                   Path(tmp, f"sft-{seed}.log"))
            curves["sft"]["seeds"][str(seed)] = losses(sft)
            curves["sft"]["heldout_bpb"][str(seed)] = heldout_bpb(sft)
            print(f"seed {seed}: held-out bits per byte {curves['pretrain']['heldout_bpb'][str(seed)]:.4f} (pretrain), "
                  f"{curves['sft']['heldout_bpb'][str(seed)]:.4f} (sft)", flush=True)
    curves["note"] = (f"per-step training loss of the demo's runs (train/demo.py, {args.nproc} ranks, ZeRO-2, fp32) "
                      f"with seeds {args.seeds}, and each final model's bits per byte on {HELDOUT.relative_to(ROOT)} "
                      "(heldout_bpb); written by train/reference_curves.py")
    Path(args.out).write_text(json.dumps(curves, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

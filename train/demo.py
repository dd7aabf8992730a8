"""`make demo`: the whole course on the bundled data, on CPU, in a few minutes.

1. pretrain the tiny model from scratch with --impl minillm and with --impl hf, DeepSpeed ZeRO-2 on
   2 ranks, same seed: the two loss curves are compared step by step (table + plot);
2. LoRA SFT of the minillm pretrain output on the bundled conversations (ZeRO-2, 2 ranks);
3. a few chat replies from the result (`python -m minillm.generate --model ... --adapter ...`).

Everything lands in --out (default out/demo). The model is tiny (0.6M parameters) and trains for a
few minutes, so expect replies that have picked up the data's words and shape, not a chatbot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import ROOT, compare_stage, launch, plot, table  # noqa: E402

PROMPTS = ["What do I need to make apple cake?", "什么是梯度下降?", "What is gradient descent?"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--pretrain_steps", type=int, default=200)
    ap.add_argument("--sft_steps", type=int, default=300)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    zero2 = str(ROOT / "ds_configs" / "zero2.json")
    shared = ["--deepspeed", zero2, "--seed", "42", "--logging_steps", "1", "--report_to", "none",
              "--save_strategy", "no", "--include_num_input_tokens_seen", "true", "--disable_tqdm", "true"]

    print(f"== 1/3 pretrain, --impl minillm and --impl hf, ZeRO-2 on {args.nproc} ranks", flush=True)
    pre = compare_stage("pretrain", "pretrain.py",
                        [*shared, "--config_name", "tiny", "--block_size", "128", "--per_device_train_batch_size", "8",
                         "--max_steps", str(args.pretrain_steps), "--learning_rate", "3e-3", "--warmup_steps", "10",
                         "--lr_scheduler_type", "cosine", "--weight_decay", "0.01"],
                        {}, out, args.nproc, "torchrun")
    md = table([pre])
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps([pre], indent=1))
    plot([pre], out / "compare.png")
    print("\n".join(md.splitlines()[:10]))
    print(f"(per-step table: {out / 'compare.md'}, plot: {out / 'compare.png'})\n", flush=True)

    print(f"== 2/3 LoRA SFT of {out / 'pretrain-minillm'}, ZeRO-2 on {args.nproc} ranks", flush=True)
    sft = out / "sft-minillm"
    wall = launch("finetune.py", args.nproc, "torchrun",
                  ["--impl", "minillm", "--model_name_or_path", str(out / "pretrain-minillm"), "--output_dir", str(sft),
                   "--overwrite_output_dir", *shared, "--use_lora", "--lora_r", "32", "--lora_alpha", "64",
                   "--lora_target_modules", "all-linear", "--max_len", "256", "--per_device_train_batch_size", "8",
                   "--max_steps", str(args.sft_steps), "--learning_rate", "5e-3", "--warmup_steps", "10",
                   "--lr_scheduler_type", "cosine"], out / "sft-minillm.log")
    losses = [e["loss"] for e in json.loads((sft / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    print(f"SFT loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps ({wall:.0f} s)\n", flush=True)

    print("== 3/3 chat with the result: python -m minillm.generate --model ... --adapter ... --prompt ...", flush=True)
    cmd = [sys.executable, "-m", "minillm.generate", "--model", str(out / "pretrain-minillm"), "--adapter", str(sft),
           "--max_new_tokens", "48"]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s; everything is in {out}")
    return 0 if pre["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

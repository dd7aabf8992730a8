"""The benchmark's cases and the issue's targets: one table, which the report (report.py) reads."""

from __future__ import annotations

from typing import NamedTuple

CASES = ("train_tiny", "train_v32k", "train_h512", "train_v152k", "lora_qv", "lora_all", "lora_embed", "prompt_tuning",
         "prefix_tuning", "prefix_proj", "houlsby", "chunker", "chunker_stream", "masker", "generate", "sft_epoch",
         "preprocess", "dpo", "dpo_v152k", "eval")


class Target(NamedTuple):
    case: str
    metric: str  # the table row it applies to (report.table_rows names them)
    op: str  # ">=" or "<="
    value: float
    on: str  # "ratio": minillm / reference; "minillm": minillm's own figure
    note: str  # where the target comes from


TARGETS: list[Target] = [
    Target("train_tiny", "tokens/s", ">=", 1.5, "ratio", "train step, the tiny preset"),
    Target("train_v32k", "tokens/s", ">=", 1.1, "ratio", "train step, Llama 4 layers, hidden 256, vocab 32000"),
    Target("train_v32k", "peak MiB", "<=", 0.6, "ratio", "peak memory at vocab >= 32k and B x T >= 1024"),
    Target("train_h512", "tokens/s", ">=", 1.1, "ratio", "train step, hidden 512"),
    Target("train_h512", "FLOP/matmul", ">=", 0.5, "minillm", "minillm's FLOP rate / the machine's matmul rate"),
    Target("train_v152k", "tokens/s", ">=", 1.0, "ratio", "train step at Qwen's vocab 151936, hidden 512, 4096 "
           "tokens: step time <= 1.0x"),
    Target("train_v152k", "loss peak MiB", "<=", 0.1, "ratio", "lm_head + cross-entropy alone, forward + backward "
           "(anchors: Liger's fused linear CE 4.8x less than HF at V=128k, Apple's Cut Cross-Entropy)"),
    Target("lora_qv", "step s", "<=", 1.0, "ratio", "LoRA step on q_proj + v_proj, vs peft"),
    Target("lora_all", "step s", "<=", 1.0, "ratio", "LoRA step on all linear layers, vs peft"),
    # issue 14: the other PEFT methods' step time and peak memory vs peft (parity/bench/peft_methods.py);
    # houlsby has no target: peft has no adapter tuning (its row is vs minillm's own LoRA q_proj + v_proj)
    Target("lora_embed", "step s", "<=", 1.0, "ratio", "LoRA step on embed_tokens, vs peft's lora_embedding_A/B"),
    Target("lora_embed", "peak MiB", "<=", 1.0, "ratio", "LoRA on embed_tokens, peak memory vs peft"),
    Target("prompt_tuning", "step s", "<=", 1.0, "ratio", "prompt tuning step (16 virtual tokens), vs peft"),
    Target("prompt_tuning", "peak MiB", "<=", 1.0, "ratio", "prompt tuning, peak memory vs peft"),
    Target("prefix_tuning", "step s", "<=", 1.0, "ratio", "prefix tuning step (16 virtual tokens), vs peft"),
    Target("prefix_tuning", "peak MiB", "<=", 1.0, "ratio", "prefix tuning, peak memory vs peft"),
    Target("prefix_proj", "step s", "<=", 1.0, "ratio", "prefix tuning with prefix_projection, vs peft"),
    Target("prefix_proj", "peak MiB", "<=", 1.0, "ratio", "prefix tuning with prefix_projection, peak memory vs peft"),
    Target("chunker", "tokens/s", ">=", 10.0, "ratio", "vs run_clm's group_texts through datasets.map"),
    Target("chunker_stream", "tokens/s", ">=", 10.0, "ratio", "vs run_clm's group_texts through datasets.map"),
    Target("masker", "conv/s", ">=", 5.0, "ratio", "vs the course's SFT preprocess loop"),
    Target("generate", "tokens/s", ">=", 1.0, "ratio", "greedy generation vs transformers' generate"),
    Target("sft_epoch", "vs course", ">=", 3.0, "ratio", "SFT epoch, learned tokens/s: packed vs padding to max_len"),
    Target("sft_epoch", "vs dyn. padding", ">=", 1.7, "ratio", "SFT epoch, learned tokens/s: packed vs "
           "DataCollatorForSeq2Seq"),
    Target("sft_epoch", "loss: packed-unpacked", "<=", 1.0, "ratio", "final held-out loss, mean of 2 seeds, packed "
           "minus unpacked, over the largest seed-to-seed spread: within noise (or lower)"),
    Target("preprocess", "tokens/s", ">=", 1.5, "ratio", "jsonl -> blocks on disk vs the course's datasets.map pipeline"),
    Target("preprocess", "peak MiB", "<=", 0.5, "ratio", "peak PSS of the process tree, same comparison"),
    # issue 21: one DPO step vs TRL 1.16's DPOTrainer, same weights and batch (parity/bench/dpo.py), medians over rounds
    Target("dpo", "step s", "<=", 1.0, "ratio", "DPO step (policy + frozen reference), vocab 32000, vs TRL's DPOTrainer"),
    Target("dpo", "peak MiB", "<=", 0.6, "ratio", "DPO step peak memory vs TRL (fused log-probs: no logits held)"),
    Target("dpo_v152k", "step s", "<=", 1.0, "ratio", "DPO step at Qwen's vocab 151936, hidden 512, vs TRL"),
    Target("dpo_v152k", "peak MiB", "<=", 0.6, "ratio", "DPO step peak memory at vocab 151936 vs TRL"),
    # issue 22: multiple-choice scoring vs lm-eval 0.4's hf model on the same task and checkpoint (parity/bench/eval.py)
    Target("eval", "items/s", ">=", 2.0, "ratio", "multiple-choice items/s vs lm-eval (context encoded once, choices "
           "from the KV cache)"),
]

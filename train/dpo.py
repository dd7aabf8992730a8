"""Preference training (DPO) with --impl minillm|hf: minillm.dpo under the HF Trainer, or TRL's DPOTrainer itself.

    deepspeed --num_gpus 2 train/dpo.py --impl minillm --model_name_or_path out/sft \
        --train_files minillm/data/dpo.jsonl --beta 0.1 --loss_type sigmoid --peft lora \
        --deepspeed ds_configs/zero2.json --output_dir out/dpo
    python train/dpo.py --model_name_or_path out/sft      # bundled preference pairs, CPU

Data: jsonl rows {"prompt", "chosen", "rejected"}, plain text or lists of {"role", "content"} messages
(minillm.preference: tokenised and batched as TRL does; dropped, truncated and tied rows counted; a row that is not
a preference row is named `file:line` and stops the run before any training). Both implementations train on the
same usable rows. The flags are TRL's DPOConfig fields (--beta --loss_type --label_smoothing --max_length
--truncation_mode --precompute_ref_log_probs), plus every TrainingArguments flag; defaults are TRL 1.16's
except the learning rate of a CPU-scale model (DEFAULT_LR, measured) and bf16, which is off unless --bf16 (TRL turns
it on by default, also on a CPU).

Reference model: --peft: the same model with its adapter switched off (minillm.peft.disable_adapter; for --impl
hf TRL is given the peft config, so its reference is peft's disable_adapter() too); full fine-tuning: a frozen
copy of the starting model on every rank (what TRL's ZeRO-2 placement amounts to), or nothing with
--precompute_ref_log_probs (the reference log-probs are computed once, before training, in batches of
--per_device_train_batch_size, and stored in the rows).

Logged metrics are TRL's: each rank's per-pair rewards and log-probs gathered, then averaged over the logging window.
The trajectory check (tests/test_dpo_train.py: 2 ranks, ZeRO-2, 20 steps from a briefly SFT'd tiny model) measured
per step max |delta loss| 9.5e-7 and max |delta rewards/margins| 1.5e-6 against TRL's DPOTrainer (full fine-tuning),
3.6e-7 and 1.0e-6 (LoRA, reference = adapter off on both sides); a resume from checkpoint-10 repeats steps 11-20
exactly. run.json records the DPO settings ("dpo"), and a resume with other ones is refused (--allow_changed_resume).
loss.png carries the reward margin on its own axis.

--packing (minillm only; TRL 1.16's padding_free is unavailable): each batch's 2B sequences are best-fit into rows of
--max_length tokens with positions restarting per sequence and no attention_mask (minillm.pack's packed documents),
log-probs summed per sequence: the padded computation, to fp32 rounding (parity/dpo.py's packed rows).
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from transformers import HfArgumentParser, set_seed

from minillm import dpo, preference
from minillm.config import PRESETS
from minillm.data import DATA_DIR
from minillm.peft import method_of

from train.args import DataTrainingArguments, ModelArguments, TrainingArguments, fail
from train.models import build_model, load_tokenizer, tokenizer_dir
from train.peft_methods import PeftArguments, add_peft, settings
from train.run import (ProcessGroupTimeout, check_resume, find_resume_checkpoint, reporting_lost_ranks, run_record,
                       setup_logging)
from train.trainer import Trainer, train_and_save

logger = logging.getLogger("minillm.train")
SAMPLE_DPO = DATA_DIR / "dpo.jsonl"

# --learning_rate when none is given. TRL's 1e-6 is for billion-parameter models: on the tiny preset (hidden 64) it
# moves nothing. Measured from the demo's SFT model (200 pretraining + 300 full SFT steps, 6/6 chat answers), full
# DPO on the bundled pairs, beta 0.1, batch 16, 60 steps (3 epochs), linear decay; held-out pairs
# (dpo_heldout.jsonl, 48) with the SFT model as reference: DPO loss / reward accuracy / mean margin / share of pairs
# whose chosen answer the policy finds likelier (before: 0.6931 / 0 (rewards all 0) / 0 / 0.75):
#   lr 1e-6 0.6929/0.46/0.0005/0.75  1e-5 0.6907/0.46/0.005/0.75  3e-5 0.6852/0.44/0.017/0.75
#      1e-4 0.6690/0.46/0.055/0.73  2e-4 0.6540/0.54/0.105/0.71  3e-4 0.6513/0.52/0.125/0.71
#      5e-4 0.6717/0.50/0.118/0.65  1e-3 0.7265/0.42/0.161/0.56 (train loss 0.42: it memorises the pairs)
# 3e-4: the lowest held-out loss. Held-out reward accuracy stays near chance overall; split by kind (the demo's
# table, 3e-4): 0.62 on the 37 pairs about numbers (the rejected answer names other numbers: DPO teaches the model to
# repeat the question's), 0.18 on the other 11 (towns, words: the rejected answer is as fluent and as unknown).
# Longer runs fit the training pairs (1e-3 x 200 steps: loss 0.03, accuracy 1.0) and lose held-out loss (1.27).
# LoRA (r 8, alpha 16), same setup (2 ranks x 8 pairs, 60 steps), held-out loss / accuracy / mean margin:
#   all-linear (18,688 trainable): 1e-4 0.6892/0.52/0.008  3e-4 0.6801/0.54/0.028  1e-3 0.6515/0.54/0.105
#      3e-3 0.6199/0.62/0.255  1e-2 0.7396/0.50/0.253  3e-2 0.8332/0.38/-0.196
#   q_proj + v_proj, the default targets (3,584): 3e-3 0.6509/0.62/0.106  1e-2 0.7124/0.48/0.016
# 3e-3 for LoRA. Wider models (hidden > 512) and the other --peft methods (not measured) keep TRL's 1e-6.
DEFAULT_LR = {"none": 3e-4, "lora": 3e-3}  # hidden <= 512, by --peft; otherwise TRL's
TRL_LR = 1e-6


def default_learning_rate(model_args, peft_args) -> float:
    hidden = PRESETS["tiny"].hidden_size
    config = Path(model_args.model_name_or_path or "", "config.json")
    if model_args.model_name_or_path and config.is_file():
        try:
            hidden = int(json.loads(config.read_text()).get("hidden_size", hidden))
        except (OSError, ValueError, TypeError):
            pass  # build_model names a broken config
    lr = DEFAULT_LR.get(peft_args.peft, TRL_LR) if hidden <= 512 else TRL_LR  # --use_lora sets peft "lora"
    logger.warning(f"--learning_rate not given: using {lr:g} for DPO of a hidden_size-{hidden} model "
                   "(train/dpo.py DEFAULT_LR says why)")
    return lr


@dataclass
class DPOArguments:
    """TRL 1.16 DPOConfig's fields that change the numbers, with its defaults."""

    beta: float = field(default=0.1, metadata={"help": "the KL weight: rewards are beta x log-ratios"})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"],
                                 metadata={"help": f"one or more of {list(dpo.LOSS_TYPES)} (summed)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "robust: the assumed label-flip rate in [0, 0.5)"})
    max_length: int | None = field(default=1024, metadata={"help": "prompt + completion tokens per sequence"})
    truncation_mode: str = field(default="keep_start", metadata={"help": "keep_start (rows whose prompt alone "
                                                                         "reaches max_length are dropped) or keep_end"})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "reference log-probs once, before training"})


def read_rows(files: list[str]) -> tuple[list, list[str]]:
    """Every JSON line of `files` and its `file:line` name; a line that is not JSON stops the run."""
    rows, where = [], []
    for name in files:
        try:
            lines = Path(name).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--train_files: cannot read {name} ({e})")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                fail(f"{name}:{i}: not a JSON line ({e.msg})")
            where.append(f"{name}:{i}")
    return rows, where


def usable_rows(tokenizer, files: list[str], cfg: dpo.DPOConfig) -> tuple[list, list[dict]]:
    """(the usable raw rows, their tokenisation); stops with every unusable row named."""
    rows, where = read_rows(files)
    tokenized, stats = preference.tokenize_rows(tokenizer, rows, tokenizer.eos_token, cfg.max_length,
                                                cfg.truncation_mode, where)
    logger.info(f"DPO data from {files}: {stats}")
    if stats.problems:
        fail("unusable preference rows:\n  " + "\n  ".join(stats.problems[:20])
             + (f"\n  ... and {len(stats.problems) - 20} more" if len(stats.problems) > 20 else ""))
    if not tokenized:
        fail(f"no usable preference row in {files} ({stats})")
    return rows, tokenized  # every row is usable; TRL drops the same too-long prompts itself


@torch.no_grad()
def pair_logps(model, tokenizer, rows: list, max_length: int | None = 1024, batch_size: int = 32
               ) -> list[tuple[float, float]]:
    """Each preference row's (chosen, rejected) completion log-probability under `model`, tokenised and batched as
    training does: what the learning-rate sweeps above and the demo's preference table score (rewards are beta x
    the difference of two models' figures)."""
    ids, stats = preference.tokenize_rows(tokenizer, rows, tokenizer.eos_token, max_length)
    if len(ids) != len(rows):
        raise ValueError(f"every row must be scored, but: {stats}")
    out = []
    for s in range(0, len(ids), batch_size):
        batch = preference.collate(ids[s:s + batch_size], tokenizer.pad_token_id, max_length)
        chosen, rejected = dpo.completion_logps(model.eval(), batch).chunk(2)
        out += zip(chosen.tolist(), rejected.tolist())
    return out


class DPOTrainer(Trainer):
    """train.trainer.Trainer whose loss is minillm.dpo's, logging TRL's metrics averaged over each logging window."""

    def __init__(self, *args, dpo_config: dpo.DPOConfig, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpo_config, self.ref_model, self._logged = dpo_config, ref_model, {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = dpo.completion_logps(model, inputs)
        # the reference: precomputed, the frozen copy, or the unwrapped model with its adapter off
        ref = dpo.reference_logps(self.accelerator.unwrap_model(model), inputs, self.ref_model)
        for k, v in dpo.dpo_metrics(self.dpo_config, logps, ref, self.accelerator.gather).items():  # all ranks' pairs
            self._logged.setdefault(k, []).append(v)
        loss = dpo.dpo_loss(self.dpo_config, logps, ref, dpo.completion_lengths(inputs))
        return (loss, {}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs = {**logs, **{k: sum(v) / len(v) for k, v in self._logged.items()}}  # as TRL's log()
        self._logged = {}
        super().log(logs, start_time)


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, PeftArguments, DPOArguments, TrainingArguments))
    parser.set_defaults(output_dir="out/dpo", use_cpu=not torch.cuda.is_available(), logging_steps=10,
                        remove_unused_columns=False)
    argv = sys.argv[1:] if argv is None else argv
    try:
        model_args, data_args, peft_args, dpo_args, training_args = parser.parse_args_into_dataclasses(args=argv)
        cfg = dpo.DPOConfig(beta=dpo_args.beta, loss_type=tuple(dpo_args.loss_type),
                            label_smoothing=dpo_args.label_smoothing, max_length=dpo_args.max_length,
                            truncation_mode=dpo_args.truncation_mode)
    except ValueError as e:
        fail(str(e).strip().splitlines()[0])
    if peft_args.peft == "adapter" and model_args.impl == "hf":
        fail("--peft adapter (Houlsby) is minillm's only: peft has none")
    if data_args.packing and model_args.impl == "hf":
        fail("--packing is minillm's only: TRL 1.16's padding_free is \"temporarily unavailable\"")
    if data_args.packing and peft_args.peft in ("prompt", "prefix"):
        fail(f"--packing with --peft {peft_args.peft}: the virtual tokens are one per row, not per packed sequence")
    setup_logging(training_args)
    if not any(a.split("=")[0] in ("--learning_rate", "--learning-rate") for a in argv):
        training_args.learning_rate = default_learning_rate(model_args, peft_args)
    checkpoint = find_resume_checkpoint(training_args)
    data_args.train_files = data_args.train_files or [str(SAMPLE_DPO)]
    record = run_record("dpo.py", model_args, data_args, {"max_length": cfg.max_length}, peft_args)
    record["dpo"] = {k: v for k, v in asdict(dpo_args).items() if k != "max_length"}
    check_resume(training_args, checkpoint, record)
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args)
    rows, tokenized = usable_rows(tokenizer, data_args.train_files, cfg)
    model = build_model(model_args, tokenizer, training_args.seed)

    if model_args.impl == "hf":
        trainer = hf_trainer(model, rows, tokenizer, model_args, peft_args, dpo_args, training_args, record)
    else:
        model = add_peft(model, "minillm", peft_args, training_args.seed, tokenizer, tokenizer_dir(model_args))
        ref_model = None
        if method_of(model) is None and not dpo_args.precompute_ref_log_probs:
            ref_model = copy.deepcopy(model).requires_grad_(False).eval().to(training_args.device)
        if dpo_args.precompute_ref_log_probs:
            model.to(training_args.device)
            tokenized = dpo.precompute_ref_logps(model, tokenized, tokenizer.pad_token_id, cfg,
                                                 training_args.per_device_train_batch_size,
                                                 ref_model=model if method_of(model) is None else None)

        def collator(batch):
            padded = preference.collate(batch, tokenizer.pad_token_id, cfg.max_length, cfg.truncation_mode)
            return dpo.pack_batch(padded, cfg.max_length) if data_args.packing else padded

        trainer = DPOTrainer(model=model, args=training_args, train_dataset=tokenized, dpo_config=cfg,
                             ref_model=ref_model, base_model_path=model_args.model_name_or_path, run_record=record,
                             data_collator=collator)
    trainer.add_callback(ProcessGroupTimeout())  # DeepSpeed's own process groups get --ddp_timeout too
    with reporting_lost_ranks(training_args):
        train_and_save(trainer, checkpoint, tokenizer, len(tokenized))


def hf_trainer(model, rows, tokenizer, model_args, peft_args, dpo_args, training_args, record):
    """TRL's DPOTrainer on the same rows and flags; with --peft it gets peft's config, so that its reference is the
    adapter switched off (handed a wrapped model, TRL would copy the starting adapter as the reference)."""
    import peft
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer
    known = {f.name for f in fields(TRLConfig) if f.init}  # our TrainingArguments adds flags TRL's has not
    args = TRLConfig(**{k: v for k, v in {**training_args.to_dict(), **asdict(dpo_args)}.items() if k in known})
    peft_config = None
    if peft_args.peft != "none":
        torch.manual_seed(training_args.seed)
        config_class = {"lora": peft.LoraConfig, "prompt": peft.PromptTuningConfig,
                        "prefix": peft.PrefixTuningConfig, "ia3": peft.IA3Config}[peft_args.peft]
        peft_config = config_class(task_type="CAUSAL_LM", **settings(peft_args, tokenizer_dir(model_args)))
    ref_model = None
    if peft_config is None and not dpo_args.precompute_ref_log_probs:
        ref_model = copy.deepcopy(model).eval()  # TRL would reload it from a path, which a new model has not

    class TRLDPOTrainer(Trainer, TRLTrainer):  # TRL's loss and logging; train.trainer's saving and checks
        pass

    return TRLDPOTrainer(model=model, base_model_path=model_args.model_name_or_path, run_record=record,
                         ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config)


if __name__ == "__main__":
    main()

"""The HF Trainer as the scripts use it, and the course's ending of both scripts (train, save, evaluate, tear down).

- `Trainer` saves a minillm model the way transformers saves its own: config.json + model.safetensors (through
  CausalLM.save_pretrained), or a peft-format adapter, so every checkpoint-N and the final output load in
  transformers/peft as well as in minillm.
- A non-finite loss, gradient norm or weight stops the run (train/safety.py's Diverged) before anything of that
  step is saved; checkpoints and the final model are staged and renamed, so a failed save leaves no half-written
  checkpoint-N and the previous model loadable.
- Evaluation adds eval_perplexity and eval_bpb (bits per byte, nanochat's: minillm.evaluate.HeldOutBits) to the
  eval loss, in the logs and on loss.png, whichever --impl.
- Every torch.load is weights-only, DeepSpeed's resume included (train/safety.py says what it may unpickle).
- `teardown()` ends the process group explicitly: gloo's threads torn down at interpreter exit
  occasionally crash a finished run ("terminate called without an active exception").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from transformers import trainer_pt_utils
from transformers.trainer_utils import rotate_checkpoints

from minillm.evaluate import HeldOutBits, token_bytes
from minillm.infra import files
from minillm.infra.checkpoint import WEIGHTS, copy_matching, read_safetensors, staged_dir
from minillm.model import CausalLM
from minillm.peft import load_adapter, method_of, save_adapter

from train import safety
from train.args import fail
from train.peft_methods import load_trainable, minillm_adapted, prompt_learning, save_trainable
from train.plots import save_loss_plot
from train.run import last_checkpoint
from train.safety import Diverged

logger = logging.getLogger("minillm.train")


class Trainer(transformers.Trainer):
    """transformers.Trainer that saves (and, for LoRA, reloads) a minillm CausalLM in HF/peft format, stops a
    diverging run, and writes every checkpoint under a temporary name first.

    For a model that is not a PreTrainedModel the stock Trainer writes only model.safetensors (and fails
    on tied weights); here checkpoints and the final model get config.json + model.safetensors, or a
    peft-format adapter for LoRA, like transformers' own models.
    Divergence: every optimizer step checks that the micro-steps' losses and the gradient norm are finite
    (DeepSpeed reports a non-finite norm as -1), agreed across ranks so all of them stop together, and
    raises Diverged before anything of that step is saved; a save also refuses non-finite weights.
    """

    def __init__(self, *args: Any, base_model_path: str | None = None, run_record: dict | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.base_model_path = base_model_path  # recorded in a saved adapter's config
        self.run_record = run_record  # copied into every checkpoint (what it was trained on)
        self._bad_loss: float | None = None
        self._staging: str | None = None
        self.token_bytes: list[int] | None = None  # per token id (minillm.evaluate.token_bytes): set, eval has BPB
        self._bits: HeldOutBits | None = None

    # ---- divergence ----
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._bad_loss is None and not torch.isfinite(loss).all():
            self._bad_loss = loss.detach().float().mean().item()
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm)
        value = float(norm) if norm is not None else 0.0
        bad = self._bad_loss is not None or not math.isfinite(value) or value < 0
        flag = torch.tensor([float(bad)], device=self.args.device)
        if self.args.world_size > 1:  # a NaN on one rank must stop every rank, or the others hang
            flag = self.accelerator.gather(flag)
        if flag.max().item() > 0:
            shown = "non-finite" if value < 0 else f"{value:.4g}"  # DeepSpeed's -1 means inf/nan
            loss = f"loss {self._bad_loss}, " if self._bad_loss is not None else ""
            raise Diverged(f"training diverged at step {self.state.global_step + 1}: {loss}gradient norm {shown}")
        return norm

    def check_weights_finite(self) -> None:
        """Before a save, on every rank: the weights are finite (an update can overflow with a finite gradient).
        Under ZeRO-3 a rank sees only its partitions' placeholders here; the save itself checks what it writes."""
        model = self.accelerator.unwrap_model(self.model)
        bad = [n for n, p in model.named_parameters() if p.numel() and not torch.isfinite(p).all()]
        flag = torch.tensor([float(bool(bad))], device=self.args.device)
        if self.args.world_size > 1:
            flag = self.accelerator.gather(flag)
        if flag.max().item() > 0:
            raise Diverged(f"training diverged at step {self.state.global_step}: non-finite weights "
                           f"({', '.join(bad[:3]) if bad else 'on another rank'})")

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        if self.control.should_save:  # set by the step's callbacks just before: a checkpoint is about to be written
            self.check_weights_finite()
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    # ---- evaluation: loss, perplexity and bits per byte ----
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._bits is None or model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if getattr(outputs, "logits", None) is not None:  # (--use_liger_kernel skips them: no BPB then)
            # the logits the eval loss came from; gathered over ranks as the loss is, dropping the rows repeated
            # to even out the last batches
            self._bits.add(self.gather_function(self._bits.per_row(outputs.logits, inputs["labels"])))
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The Trainer's evaluation, plus PREFIX_perplexity (exp of the loss, as run_clm) and PREFIX_bpb (total nats
        over total bytes of the target tokens, every rank's rows: nanochat's bits per byte)."""
        self._bits = HeldOutBits(self.token_bytes) if self.token_bytes else None
        try:
            out = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        finally:
            bits, self._bits = self._bits, None
        if (loss := out.metrics.get(f"{metric_key_prefix}_loss")) is not None:
            out.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(loss, 50))
        if bits is not None and bits.bytes > 0:
            out.metrics[f"{metric_key_prefix}_bpb"] = bits.bpb()
        return out

    # ---- saving ----
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        if not isinstance(model, CausalLM) and not minillm_adapted(model):
            bad = safety.non_finite_tensors(state_dict if state_dict is not None else model.state_dict())
            if bad:
                raise Diverged(f"refusing to save non-finite weights ({', '.join(bad[:3])}) at step "
                               f"{self.state.global_step}")
            super()._save(output_dir, state_dict)
            if self._staging and prompt_learning(model):  # peft cannot resume a projected prefix from its file
                save_trainable(model, output_dir)
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info(f"Saving minillm model to {output_dir}")
        if state_dict is None or not zero3(self):
            # ZeRO-0/1/2 and plain runs: every rank holds the full weights in the module itself
            state_dict = model.state_dict()
        if bad := safety.non_finite_tensors(state_dict):
            raise Diverged(f"refusing to save non-finite weights ({', '.join(bad[:3])}) at step "
                           f"{self.state.global_step}")
        method = method_of(model)  # minillm's fine-tuning method; None: a full fine-tune or pretraining
        if method is not None:
            # Under ZeRO-3 the live adapter parameters are partitions (empty on this rank): take them from the
            # consolidated state dict the Trainer gathered (stage3_gather_16bit_weights_on_model_save).
            save_adapter(model, output_dir, base_model_name_or_path=self.base_model_path,
                         state_dict=state_dict if zero3(self) else None)
            if self._staging and not method.adapter_restores_training:  # a checkpoint: what a resume restores
                save_trainable(model, output_dir)
        else:
            model.save_pretrained(output_dir, state_dict=state_dict)  # config.json + model.safetensors
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, self._staging) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """checkpoint-N is written as <staging>/checkpoint-N, <staging> minillm's staging name for checkpoint-N
        (rank 0's, shared by every rank), and renamed once every rank has finished: a killed or failing save never
        leaves a checkpoint-N that a resume would pick, and what it leaves is recognisably minillm's."""
        run_dir = self._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging = [files.staging_path(os.path.join(run_dir, name)).name]
        if self.args.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(staging, src=0)
        self._staging = staging[0]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        staged, final = os.path.join(run_dir, staging[0]), os.path.join(run_dir, name)
        if self.args.should_save and self.run_record is not None:
            safety.write_run_record(os.path.join(staged, name), self.run_record)
        self.accelerator.wait_for_everyone()  # DeepSpeed and the RNG files are written by every rank
        if self.args.should_save:
            files.normalise_modes(os.path.join(staged, name))
            if os.path.isdir(final):  # a checkpoint of this run's (find_resume_checkpoint refused any other)
                shutil.rmtree(final)
            os.replace(os.path.join(staged, name), final)
            shutil.rmtree(staged)
            best = self.state.best_model_checkpoint
            if best and files.is_staging(Path(best).parent.name):  # the Trainer noted the staged path
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(final, "trainer_state.json"))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def save_metrics(self, split: str, metrics: dict[str, Any], combined: bool = True) -> None:
        """transformers' save_metrics, each file written atomically (a kill leaves the old file or the new one, never a
        truncated all_results.json); an unreadable all_results.json is named and replaced by this run's metrics."""
        if not self.is_world_process_zero():
            return
        out = Path(self.args.output_dir)
        files.write_atomic(out / f"{split}_results.json", json.dumps(metrics, indent=4, sort_keys=True))
        if combined:
            every = {}
            if os.path.lexists(out / "all_results.json"):
                try:
                    every = files.read_json_object(files.checked_file(out, "all_results.json", "metrics"))
                except (OSError, ValueError) as e:
                    logger.warning(f"{e}: replaced by this run's metrics")
            files.write_atomic(out / "all_results.json", json.dumps({**every, **metrics}, indent=4, sort_keys=True))

    def save_state(self) -> None:
        if self.is_world_process_zero():
            files.write_atomic(Path(self.args.output_dir, "trainer_state.json"),
                               json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n")

    def _load_best_model(self) -> None:
        """--load_best_model_at_end without DeepSpeed: an adapter run reloads the best checkpoint as a resume does
        (the stock Trainer looks for pytorch_model.bin, or for peft a table it cannot load into a projected prefix)."""
        target = self.accelerator.unwrap_model(self.model)
        if self.is_deepspeed_enabled or not (minillm_adapted(target) or prompt_learning(target)):
            return super()._load_best_model()
        logger.info(f"Loading best model from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.accelerator.unwrap_model(model or self.model)
        method = method_of(target)
        if method is not None and method.adapter_restores_training:  # the stock Trainer only knows peft's files
            try:
                load_adapter(target, resume_from_checkpoint)  # into the method already applied: in place
            except (OSError, ValueError) as e:  # a LoRA file of another shape, non-finite values, a link out
                fail(f"cannot resume from {resume_from_checkpoint}: {e}")
            return
        if method is None and isinstance(target, CausalLM):
            load_weights(target, resume_from_checkpoint)
            return
        if method is not None or prompt_learning(target):  # minillm's prefix tuning, peft's prompt/prefix
            try:
                load_trainable(target, resume_from_checkpoint)
            except ValueError as e:
                fail(str(e))
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def load_weights(model: CausalLM, checkpoint: str) -> None:
    """A checkpoint's model.safetensors into `model` in place, every tensor checked first (the stock Trainer's
    load_state_dict path ends in an AttributeError for a model that is not a PreTrainedModel): the same names and
    shapes, finite values, else one sentence naming the file."""
    try:
        saved = read_safetensors(checkpoint)
        params = dict(model.state_dict())
        if model.config.tie_word_embeddings:  # the file holds the embedding only, as transformers saves it
            params.pop("lm_head.weight", None), saved.pop("lm_head.weight", None)
        if bad := safety.non_finite_tensors(saved):
            raise ValueError(f"{Path(checkpoint, WEIGHTS)}: {bad[0]} holds NaN or infinite values")
        copy_matching(params, saved, Path(checkpoint, WEIGHTS))
    except (OSError, ValueError) as e:
        fail(f"cannot resume from {checkpoint}: {str(e).splitlines()[0]}")


def zero3(trainer: transformers.Trainer) -> bool:
    return bool(trainer.is_deepspeed_enabled and
                trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)


def save_final(trainer: Trainer, tokenizer, output_dir: str) -> None:
    """The final model in HF format (or the adapter in peft format) with the tokenizer files alongside.

    Written into a staging directory beside output_dir, then each file renamed into it (minillm.infra.checkpoint's
    staged_dir): a save that fails (a full disk, non-finite weights) leaves the previous model loadable.
    """
    if trainer.args.should_save:
        with staged_dir(output_dir) as staged:
            trainer.save_model(str(staged))
            tokenizer.save_pretrained(staged)
        logger.info(f"Saved the final model and tokenizer to {output_dir}")
    else:
        trainer.save_model(output_dir)  # its part of the collectives (ZeRO-3 gathers the weights); writes nothing
    trainer.accelerator.wait_for_everyone()


def train_and_save(trainer: Trainer, checkpoint: str | None, tokenizer, train_samples: int | None,
                   eval_extra=None) -> None:
    """The course's ending of both scripts: train (resuming if asked), save the final model with the tokenizer,
    log and save the metrics and state, evaluate when there is a validation set, tear down.
    eval_extra(metrics) may add derived eval metrics (pretraining adds perplexity)."""
    check_step_fits_data(trainer)
    if trainer.eval_dataset is not None and hasattr(tokenizer, "backend_tokenizer"):  # a fast (Rust) tokenizer
        trainer.token_bytes = token_bytes(tokenizer.backend_tokenizer)
    if checkpoint:
        step = safety.read_trainer_state(checkpoint)["global_step"]  # checked by check_resume
        if step >= planned_steps(trainer):
            return already_complete(trainer, checkpoint, step)
    logger.info("Starting training" + (f", resuming from {checkpoint}" if checkpoint else ""))
    safe = safety.resume_safe_globals() if trainer.is_deepspeed_enabled else []
    try:
        with torch.serialization.safe_globals(safe):  # what DeepSpeed's checkpoints may unpickle, nothing more
            result = trainer.train(resume_from_checkpoint=checkpoint)
            trainer.check_weights_finite()
            save_final(trainer, tokenizer, trainer.args.output_dir)
    except pickle.UnpicklingError as e:
        with trainer_pt_utils.safe_globals():  # numpy's RNG state, which the Trainer allow-lists for rng_state_*.pth
            bad = safety.unloadable_files(checkpoint, safe) if checkpoint else []
        fail(f"refusing to load {', '.join(bad) if bad else checkpoint}: it holds pickled objects other than "
             f"tensors and plain data, and loading them could run code ({str(e).splitlines()[0][:200]})")
    except Diverged as e:
        last = last_checkpoint(trainer.args.output_dir)
        teardown()
        fail(f"{e}. Stopped; the final model was not saved"
             + (f"; the last good checkpoint is {last}" if last else "; no checkpoint was saved before it")
             + ". Try a lower --learning_rate")
    metrics = {**result.metrics, "peak_memory_mb": peak_memory_mb()}
    if train_samples is not None:
        metrics["train_samples"] = train_samples
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        if eval_extra is not None:
            eval_extra(metrics)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if trainer.args.should_save:
        save_loss_plot(trainer.state.log_history, Path(trainer.args.output_dir) / "loss.png")
    teardown()


def check_step_fits_data(trainer: Trainer) -> None:
    """One optimizer step must fit in an epoch: with more --gradient_accumulation_steps than an epoch has batches, every
    step is a partial one and the Trainer reports samples/s for samples that never existed (1e9 gave 1.27e7/s)."""
    data, a = trainer.train_dataset, trainer.args
    if not hasattr(data, "__len__"):
        return  # a stream: as long as --max_steps makes it
    batches = math.ceil(len(data) / (a.per_device_train_batch_size * a.world_size))  # per rank, as the Trainer counts
    if a.gradient_accumulation_steps > batches:
        fail(f"--gradient_accumulation_steps {a.gradient_accumulation_steps}: one optimizer step would accumulate that "
             f"many batches, but the training data ({len(data)} samples, {a.per_device_train_batch_size} per device x "
             f"{a.world_size} rank(s)) makes {batches} per epoch; use at most {batches}")


def planned_steps(trainer: Trainer) -> int:
    """The optimizer steps this run makes in all, as the Trainer counts them (set_initial_training_values)."""
    a = trainer.args
    if a.max_steps > 0 or not hasattr(trainer.train_dataset, "__len__"):
        return a.max_steps
    batches = math.ceil(len(trainer.train_dataset) / (a.per_device_train_batch_size * a.world_size))
    return math.ceil(a.num_train_epochs * max(math.ceil(batches / a.gradient_accumulation_steps), 1))


def already_complete(trainer: Trainer, checkpoint: str, step: int) -> None:
    """A finished run started again into its directory: nothing to train, so nothing is written and no figure
    printed (the Trainer would report train_loss 0.0); a final model or metrics file the run did not finish is named."""
    out = Path(trainer.args.output_dir)
    problem = None
    if not any((out / f).is_file() for f in ("config.json", "adapter_config.json")):
        problem = (f"its final model was never saved (the run was stopped after {checkpoint}): the trained weights "
                   f"are in {checkpoint}")
    elif os.path.lexists(out / "all_results.json"):
        try:
            files.read_json_object(files.checked_file(out, "all_results.json", "metrics"))
        except (OSError, ValueError) as e:
            problem = (f"{e}: the run was stopped while writing its metrics, which are lost (trainer_state.json keeps "
                       "the logged losses)")
    teardown()
    if problem:
        fail(f"{out} holds a complete run ({checkpoint}, step {step}): nothing to train; but {problem}. Use "
             "--overwrite_output_dir to train afresh")
    if trainer.is_world_process_zero():
        print(f"{out}: this run is already complete ({checkpoint}, step {step} of {planned_steps(trainer)}); "
              "nothing to train. Use --overwrite_output_dir to train afresh, or a larger --max_steps / "
              "--num_train_epochs to continue it", flush=True)


def peak_memory_mb() -> float:
    """This process's peak memory: CUDA allocations on a GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

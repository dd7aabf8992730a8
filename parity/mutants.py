"""`python -m parity.mutants` (`make mutants`): does the proof catch bugs? Realistic one-line bugs, planted one at a time.

    python -m parity.mutants                  # every mutant: a table mutant / caught by / seconds; exit 1 if one survives
    python -m parity.mutants --only rope      # mutants whose name starts with "rope" (repeatable)
    python -m parity.mutants --list           # each mutant, its file and its checks; applies nothing
    python -m parity.mutants --apply-only     # does every snippet still apply? (no checks run; seconds)

Each mutant names a file, an exact snippet of it (which must occur exactly once), its replacement, and the
checks that should catch it: `python -m parity` restricted to an area and to rows by name (`--rows`, at a
small `--budget`), or pytest node ids. The runner copies the repository's code (minillm/, parity/, tests/,
train/, pyproject.toml) to a scratch directory, applies the mutant there, and runs the checks in order with
the scratch copy first on PYTHONPATH, stopping at the first that fails (the mutant is caught by it); all of a
mutant's checks together get `--timeout` seconds (60). A snippet that no longer matches is STALE (the code
moved on: update the mutant), never counted as caught. Before the mutants, every check is run once on an
unmutated copy: a check that fails there would "catch" anything, so it is left out of every mutant's checks
(and the run exits 1).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("minillm", "parity", "tests", "train", "pyproject.toml")
BUDGET = 0.25  # python -m parity --budget for the checks: ~10 drawn configs per sdpa row instead of 40


def parity(area: str, *rows: str, budget: float = BUDGET) -> str:
    """A check: `python -m parity --only AREA --rows ROW ...` (rows matched by substring)."""
    return " ".join(["parity", "--only", area, *(f"--rows {shlex.quote(r)}" for r in rows), f"--budget {budget}",
                     "--fail-fast"])


def pytest(*node_ids: str) -> str:
    """A check: `python -m pytest -x NODE_ID ...`."""
    return " ".join(["pytest", "-q", "-x", "-p", "no:cacheprovider", *map(shlex.quote, node_ids)])


@dataclass(frozen=True)
class Mutant:
    name: str  # <part>-<what>: the hand-written part first (--only selects by prefix)
    file: str  # relative to the repository root
    old: str  # an exact snippet of `file`, occurring exactly once
    new: str
    checks: tuple[str, ...]  # run in order until one fails
    bug: str  # what the planted bug is, in words


T_MODEL = "tests/test_model.py"
MUTANTS: list[Mutant] = [
    # ---- RoPE, every rope type --------------------------------------------------------------------------
    Mutant("rope-rotate-half-sign", "minillm/model.py",
           "return torch.cat((-x2, x1), dim=-1)", "return torch.cat((x2, -x1), dim=-1)",
           (parity("model", "logits fp32 (sdpa)"),), "rotate_half with the sign on the wrong half"),
    Mutant("rope-linear-factor", "minillm/model.py",
           "return inv_freq / factor, 1.0", "return inv_freq * factor, 1.0",
           (parity("model", "RoPE tables"), parity("model", "logits fp32 (sdpa)")),
           "linear scaling multiplies the frequencies instead of dividing"),
    Mutant("rope-dynamic-base", "minillm/model.py",
           '- (rs["factor"] - 1)) ** (dim / (dim - 2))', '- rs["factor"] - 1) ** (dim / (dim - 2))',
           (parity("model", "RoPE tables"), parity("model", "dynamic RoPE", "logits fp32 (sdpa)")),
           "dynamic NTK base: a dropped parenthesis"),
    Mutant("rope-dynamic-per-call", "minillm/model.py",
           "if seq_len > cached:  # growth", "if seq_len > self.original_max_seq_len:  # growth",
           (parity("model", "dynamic RoPE"),),
           "dynamic RoPE recomputed for every call's length instead of keeping the grown table across calls"),
    Mutant("rope-yarn-ramp", "minillm/model.py",
           "extrapolation = 1 - ramp  # 1 where", "extrapolation = ramp  # 1 where",
           (parity("model", "RoPE tables"), parity("model", "logits fp32 (sdpa)")),
           "YaRN ramp inverted: interpolates the high frequencies"),
    Mutant("rope-yarn-mscale", "minillm/model.py",
           "float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all))",
           "float(get_mscale(factor, mscale_all) / get_mscale(factor, mscale))",
           (parity("model", "RoPE tables", budget=1.0),), "YaRN mscale / mscale_all_dim swapped"),
    Mutant("rope-llama3-smooth", "minillm/model.py",
           "smoothed = (1 - smooth) * scaled / factor + smooth * scaled",
           "smoothed = (1 - smooth) * scaled + smooth * scaled / factor",
           (parity("model", "RoPE tables"), parity("model", "logits fp32 (sdpa)")),
           "llama3 smoothing weights swapped"),
    # ---- attention, GQA, masks ----------------------------------------------------------------------------
    Mutant("attn-gqa-interleave", "minillm/model.py",
           "return x[:, :, None].expand(B, K, n_rep, S, D).reshape(B, K * n_rep, S, D)",
           "return x[:, None].expand(B, n_rep, K, S, D).reshape(B, K * n_rep, S, D)",
           (parity("model", "logits fp32 (eager)"),), "repeat_kv interleaves: query head h reads kv head h % K"),
    Mutant("attn-scale-hidden", "minillm/model.py",
           "self.scaling = D ** -0.5", "self.scaling = (C // H) ** -0.5",
           (parity("model", "logits fp32 (sdpa)"),), "attention scale from hidden/heads, wrong with explicit head_dim"),
    Mutant("mask-causal-diagonal", "minillm/model.py",
           "mask = torch.arange(S, device=device)[None, :] <= (torch.arange(T, device=device) + past)[:, None]",
           "mask = torch.arange(S, device=device)[None, :] < (torch.arange(T, device=device) + past)[:, None]",
           (parity("model", "logits fp32 (sdpa)"),), "the causal mask hides each token from itself"),
    Mutant("mask-padding-axis", "minillm/model.py",
           "mask = mask & pad[:, None, None, :]", "mask = mask & pad[:, None, :, None]",
           (parity("model", "logits fp32 (sdpa)", "greedy generate"),), "padding masks queries instead of keys"),
    Mutant("mask-packed-starts", "minillm/model.py",
           "dim=-1) != 1  # (B, T)", "dim=-1) < 0  # (B, T)",
           (parity("model", "packed rows: logits (sdpa)", budget=1.0),),
           "packed documents found only where positions decrease (misses a restart after a 1-token document)"),
    Mutant("mask-sdpa-causal-decode", "minillm/model.py",
           "is_causal = T > 1 and mask is None", "is_causal = mask is None",
           (parity("model", "greedy generate"),),
           "SDPA's is_causal also for a 1-token decode step (top-left aligned: it sees only the first key)"),
    # ---- norms ----------------------------------------------------------------------------------------------
    Mutant("norm-cast-order", "minillm/model.py",
           "return self.weight * x32.to(dtype)", "return (self.weight * x32).to(dtype)",
           (parity("dtype", "model bf16, exact path"),),
           "RMSNorm multiplies by the weight before casting back (changes bf16 only)"),
    Mutant("norm-eps-outside", "minillm/model.py",
           "x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)",
           "x32 = x32 / (x32.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)",
           (parity("model", "logits fp32 (sdpa)"),), "RMSNorm eps added outside the square root"),
    Mutant("norm-qk-shared", "minillm/model.py",
           "q, k = self.q_norm(q), self.k_norm(k)", "q, k = self.q_norm(q), self.q_norm(k)",
           (parity("model", "logits fp32 (sdpa)"),), "Qwen3 k_norm uses q_norm's weight"),
    # ---- KV cache and positions -------------------------------------------------------------------------------
    Mutant("cache-length", "minillm/model.py",
           "cache.length += T", "cache.length += 1",
           (parity("model", "greedy generate"),), "the cache advances one token per call, also after a prompt"),
    # (positions shifted by a constant per row, e.g. off by one or left padding ignored, change nothing: RoPE
    # attention depends on position differences only)
    Mutant("positions-decode-slice", "minillm/generation.py",
           ".masked_fill(mask == 0, 1)[:, -step_ids.shape[1]:]", ".masked_fill(mask == 0, 1)[:, :step_ids.shape[1]]",
           (parity("model", "greedy generate"),), "decode steps take the first positions instead of the last"),
    # ---- sampling warpers and stopping ---------------------------------------------------------------------
    Mutant("sampling-temperature", "minillm/generation.py",
           "logits = logits / temperature", "logits = logits * temperature",
           (parity("generate", "temperature/top-k/top-p"),), "temperature multiplies the logits"),
    Mutant("sampling-top-k-ties", "minillm/generation.py",
           "logits.masked_fill(logits < kth, -float(\"inf\"))", "logits.masked_fill(logits <= kth, -float(\"inf\"))",
           (parity("generate", "temperature/top-k/top-p"),), "top-k drops the k-th token (keeps k-1)"),
    Mutant("sampling-top-p-threshold", "minillm/generation.py",
           "remove = cum <= (1 - top_p)", "remove = cum > top_p",
           (parity("generate", "temperature/top-k/top-p"),),
           "top-p uses the descending-sort rule on an ascending sort"),
    Mutant("generate-eos-restart", "minillm/generation.py",
           "unfinished &= ~torch.isin(next_tokens, eos)", "unfinished = ~torch.isin(next_tokens, eos)",
           (pytest(f"{T_MODEL}::test_generate_stops_at_eos_and_pads_finished_rows"),
            parity("generate", "eos stops")), "a finished row is unfinished again after its next token"),
    # ---- loss and its denominator ------------------------------------------------------------------------------
    Mutant("loss-shift-direction", "minillm/loss.py",
           "return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()",
           "return F.pad(labels, (1, 0), value=ignore_index)[..., :-1].contiguous()",
           (parity("model", "loss fp32 (sdpa)"),), "labels shifted right instead of left"),
    Mutant("loss-num-items-mean", "minillm/loss.py",
           'loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")',
           'loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean")',
           (pytest(f"{T_MODEL}::test_num_items_in_batch_matches_transformers"),),
           "with num_items_in_batch the mean is divided again (gradient accumulation loss too small)"),
    Mutant("fused-denominator-all-tokens", "minillm/loss.py",
           "denominator = (target != IGNORE_INDEX).sum().float()",
           "denominator = torch.tensor(float(target.numel()), device=h.device)",
           (parity("model", "loss fp32 (fused training path)"),), "fused loss divides by every token, ignored ones too"),
    Mutant("fused-dw-overwrite", "minillm/loss.py",
           "        acc.addmm_(a, b)\n    elif a.is_cuda:", "        acc.copy_(a @ b)\n    elif a.is_cuda:",
           (parity("dtype", "fused CE fp32, many chunks"),),
           "fused loss: each chunk overwrites d W instead of accumulating (only a multi-chunk row sees it)"),
    Mutant("fused-loss-overwrite", "minillm/loss.py",
           "total += ((sumexp.log() - z_target).squeeze(1) * valid).sum()",
           "total = ((sumexp.log() - z_target).squeeze(1) * valid).sum()",
           (parity("dtype", "fused CE fp32, many chunks"),),
           "fused loss keeps only the last chunk's sum"),
    # ---- chunker ------------------------------------------------------------------------------------------------
    Mutant("chunk-separator-mask", "minillm/chunk.py",
           'value = eos_token_id if name == "input_ids" else (1 if name == "attention_mask" else 0)',
           'value = eos_token_id if name == "input_ids" else 0',
           (parity("data", "group_texts(eos)"),), "the EOS separator gets attention_mask 0"),
    Mutant("chunk-stream-drops-rest", "minillm/chunk.py",
           "self._rest = {k: v[n_blocks * self.block_size :].copy() for k, v in flat.items()}",
           "self._rest = {k: v[:0].copy() for k, v in flat.items()}",
           (pytest("tests/test_chunk.py::test_streaming_in_k_batches_equals_one_batch"),),
           "the streaming chunker drops each batch's remainder (the course's behaviour)"),
    # ---- SFT masker ------------------------------------------------------------------------------------------------
    Mutant("sft-im-end-unlabelled", "minillm/sft.py",
           "+ seg_ids[start:] + [im_end] + nl_ignore", "+ seg_ids[start:] + [IGNORE_INDEX] + nl_ignore",
           (parity("data", "sft: mask == apply_chat_template, bundled"),), "the reply's <|im_end|> is not trained"),
    Mutant("sft-keeps-unlabelled", "minillm/sft.py",
           "if first_label is None or first_label >= max_len:", "if first_label is None:",
           (parity("data", "sft: mask == apply_chat_template, bundled"),),
           "a sample whose replies were all cut by max_len is kept with no label"),
    # ---- LoRA, DoRA, rsLoRA ---------------------------------------------------------------------------------------
    Mutant("lora-rslora-scaling", "minillm/peft/lora.py",
           "return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r",
           "return self.lora_alpha / self.r",
           (pytest("tests/test_lora.py::test_lora_linear_matches_formula_and_merge"),
            parity("lora", "lora logits (drawn cases)")), "rsLoRA ignored: alpha / r instead of alpha / sqrt(r)"),
    Mutant("lora-dora-norm-grad", "minillm/peft/lora.py",
           "norm = self._weight_norm(weight, lora_weight.detach(), self.scaling).detach()",
           "norm = self._weight_norm(weight, lora_weight, self.scaling)",
           (parity("lora", "lora grads"),),
           "DoRA's row norm is not detached: gradients flow through it"),
    Mutant("lora-merge-unscaled", "minillm/peft/lora.py",
           "return (self.lora_B.weight @ self.lora_A.weight) * self.scaling",
           "return self.lora_B.weight @ self.lora_A.weight",
           (pytest("tests/test_lora.py::test_lora_linear_matches_formula_and_merge"),
            parity("lora", "lora merged weights (drawn cases)")), "merge forgets the scaling"),
    Mutant("lora-init-gain", "minillm/peft/lora.py",
           "nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))",
           "nn.init.kaiming_uniform_(self.lora_A.weight, a=5)",
           (pytest("tests/test_lora.py::test_lora_linear_init_and_dropout"), parity("lora", "lora init")),
           "A drawn with another gain than peft's"),
    Mutant("lora-tied-merge-moves-embedding", "minillm/peft/lora.py",
           "            layer.untie_on_merge = True\n", "",
           (pytest("tests/test_lora.py::test_tied_lm_head_layer_merge_and_unmerge"), parity("lora", "tied lm_head")),
           "merging LoRA on a tied lm_head moves the input embedding too"),
    # ---- checkpoints: tying and sharding ---------------------------------------------------------------------------
    Mutant("ckpt-shards-overwrite", "minillm/infra/checkpoint.py",
           "            tensors.update(found)\n", "            tensors = found\n",
           (pytest("tests/test_hostile_files.py::test_sharded_checkpoint_loads"),
            parity("model", "transformers save (sharded)")), "a sharded checkpoint keeps only its last shard"),
    Mutant("ckpt-tie-after-load", "minillm/infra/checkpoint.py",
           "assign=True)\n    if config.tie_word_embeddings:\n        model.lm_head.weight = model.model.embed_tokens.weight\n",
           "assign=True)\n",
           (pytest(f"{T_MODEL}::test_save_load_round_trip"), parity("model", "transformers save (sharded)")),
           "a tied model is not re-tied after loading"),
    Mutant("ckpt-default-dtype-stored", "minillm/infra/checkpoint.py",
           "    if dtype is None:\n        dtype = torch.float32\n", '    if dtype is None:\n        dtype = "auto"\n',
           (pytest(f"{T_MODEL}::test_from_pretrained_default_dtype_is_float32_on_a_low_precision_checkpoint"),),
           "from_pretrained's default loads a bf16/fp16 checkpoint in its stored dtype instead of float32"),
    # ---- the issue-25 blind spots: the incoming gradient, generate's side effects, boundaries, tails --------------
    Mutant("fused-backward-drops-grad-dw", "minillm/loss.py",
           "None if dw is None else dw.mul_(grad_out.float())", "None if dw is None else dw",
           (parity("model", "drawn k (fused path)"), parity("dtype", "GradScaler")),
           "the fused loss's d W ignores the incoming gradient (loss scaling, k * loss, a divided loss)"),
    Mutant("fused-backward-drops-grad-dh", "minillm/loss.py",
           "None if dh is None else dh.mul_(grad_out.to(dh.dtype))", "None if dh is None else dh",
           (parity("model", "drawn k (LoRA, fused)"),),
           "the fused loss's d h ignores the incoming gradient (what LoRA trains through)"),
    Mutant("generate-mode-not-restored", "minillm/generation.py",
           "    finally:\n        model.train(was_training)\n    return out", "    finally:\n        pass\n    return out",
           (pytest("tests/test_generation.py::test_generate_hands_the_model_back_in_its_mode"),),
           "generate() leaves a train-mode model in eval mode (dropout off for the rest of training)"),
    Mutant("generate-decodes-in-train-mode", "minillm/generation.py",
           "    model.eval()\n    try:", "    try:",
           (pytest("tests/test_generation.py::test_generate_decodes_in_eval_mode_whatever_the_mode_given"),),
           "generate() decodes a train-mode model with dropout on"),
    Mutant("generate-pad-last-eos", "minillm/generation.py",
           "pad = int(eos[0]) if len(eos) else 0", "pad = int(eos[-1]) if len(eos) else 0",
           (parity("generate", "several eos ids"),),
           "no pad id and several eos ids: pads with the last eos (transformers takes the first)"),
    Mutant("sft-boundary-keeps-unlabelled", "minillm/sft.py",
           "if first_label is None or first_label >= max_len:", "if first_label is None or first_label > max_len:",
           (pytest("tests/test_sft.py::test_masker_properties"),
            pytest("tests/test_sft.py::test_truncation_at_the_first_learned_token_drops_and_counts")),
           "a conversation whose first learned token falls exactly at max_len is kept with no label"),
    Mutant("corpus-prefix-space-cut", "minillm/infra/corpus.py",
           'all(p["type"] in _SAFE_PRE_TOKENIZERS and not p.get("add_prefix_space") for p in pre)',
           'all(p["type"] in _SAFE_PRE_TOKENIZERS for p in pre)',
           (pytest("tests/test_chunk.py::test_prefix_space_tokenizer_is_not_cut"),),
           "long documents cut into pieces under ByteLevel(add_prefix_space=True): each piece gets a space"),
    Mutant("pack-tail-extra-multiple", "minillm/pack.py",
           "for _ in range(-rows % self.rows_multiple_of):",
           "for _ in range(self.rows_multiple_of - rows % self.rows_multiple_of):",
           (pytest("tests/test_pack.py::test_streaming_tail_pads_each_shard_to_the_multiple"),),
           "a shard whose rows are already a multiple still gets rows_multiple_of empty rows"),
    Mutant("pack-tail-counts-last-window", "minillm/pack.py",
           "                for row in self._pack(window, seed):\n                    rows += 1\n                    yield row\n"
           "                seed",
           "                for row in self._pack(window, seed):\n                    yield row\n                seed",
           (pytest("tests/test_pack.py::test_streaming_tail_pads_each_shard_to_the_multiple"),),
           "the empty-row tail counts only the last window's rows (full windows forgotten)"),
    # ---- training glue ---------------------------------------------------------------------------------------------
    Mutant("glue-loss-type", "minillm/model.py",
           'loss_type = "ForCausalLM"', "loss_type = None",
           (pytest(f"{T_MODEL}::test_trainer_counts_shifted_labels"),),
           "the Trainer counts num_items_in_batch over unshifted labels"),
    Mutant("glue-fused-drops-num-items", "minillm/model.py",
           "linear_cross_entropy(h, self.lm_head.weight, labels, num_items_in_batch)",
           "linear_cross_entropy(h, self.lm_head.weight, labels)",
           (pytest(f"{T_MODEL}::test_num_items_in_batch_on_the_fused_training_path"),),
           "the fused training loss ignores num_items_in_batch (wrong under gradient accumulation)"),
    # ---- (IA)^3, switching methods off, adapter configs, Houlsby precision and init --------------------------
    Mutant("ia3-merge-bias-unscaled", "minillm/peft/ia3.py",
           "base.bias.data = torch.mul(base.bias.data, self.ia3_l.data.reshape(base.bias.shape)).to(base.bias.dtype)",
           "pass", (parity("peft_methods", "ia3 merge_and_unload"),),
           "merging an output scaling leaves the bias unscaled"),
    Mutant("ia3-unmerge-multiplies", "minillm/peft/ia3.py",
           "base.weight.data = torch.div(base.weight.data, self.ia3_l.data + 1e-8)",
           "base.weight.data = torch.mul(base.weight.data, self.ia3_l.data + 1e-8)",
           (parity("peft_methods", "ia3 unmerge"),), "unmerge multiplies by l instead of dividing"),
    Mutant("ia3-output-bias-unscaled", "minillm/peft/ia3.py",
           "        return (y * l).to(y.dtype)",
           "        b = self.base_layer.bias\n        return (torch.nn.functional.linear(x, self.base_layer.weight) * l"
           " + (0 if b is None else b)).to(y.dtype)",
           (parity("peft_methods", "ia3 logits"), pytest("tests/test_ia3.py::test_scaling_output_with_bias_or_input")),
           "the output scaling does not multiply the bias"),
    Mutant("ia3-disable-ignored", "minillm/peft/ia3.py", "layer.disabled = not enabled", "layer.disabled = False",
           (parity("peft_methods", "disable_adapter: ia3"),), "disable_adapter leaves (IA)^3 on"),
    Mutant("prompt-disable-ignored", "minillm/peft/base.py", "model.disabled = not enabled", "model.disabled = False",
           (parity("peft_methods", "disable_adapter: prompt"),), "disable_adapter leaves the virtual tokens on"),
    Mutant("lora-disable-ignored", "minillm/peft/lora.py", "layer.disabled = not enabled", "layer.disabled = False",
           (parity("peft_methods", "disable_adapter: lora"),), "disable_adapter leaves LoRA on"),
    Mutant("peft-config-no-type-not-lora", "minillm/peft/methods.py", 'kind = d.get("peft_type", "LORA")',
           'kind = d["peft_type"]', (pytest("tests/test_peft_methods.py::test_config_without_peft_type_loads_as_lora"),),
           "an adapter_config.json without peft_type is refused instead of read as LoRA (issue 25 item 8)"),
    Mutant("houlsby-adapter-base-dtype", "minillm/peft/houlsby.py",
           "dtype=torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype)", "dtype=w.dtype)",
           (pytest("tests/test_peft_methods.py::test_houlsby_low_precision_base_adapter_in_fp32"),),
           "Houlsby adapters kept in bf16/fp16 next to a low-precision base (issue 25 item 9)"),
    Mutant("houlsby-computes-in-base-dtype", "minillm/peft/houlsby.py",
           "        return self.adapter(y.to(self.adapter.down.weight.dtype)).to(y.dtype)",
           "        a = self.adapter\n        return y + F.linear(a.act(F.linear(y, a.down.weight.to(y.dtype), "
           "a.down.bias.to(y.dtype))), a.up.weight.to(y.dtype), a.up.bias.to(y.dtype))",
           (pytest("tests/test_peft_methods.py::test_houlsby_low_precision_base_adapter_in_fp32"),),
           "fp32 adapter weights but the bottleneck computed in the base dtype (issue 25 item 9)"),
    Mutant("houlsby-init-default-bounds", "minillm/peft/houlsby.py",
           "nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)", "nn.init.trunc_normal_(lin.weight, std=1e-2)",
           (pytest("tests/test_peft_methods.py::test_houlsby_init_truncation_bounds"),),
           "init='houlsby' truncated at the default +-2, i.e. not at all (issue 25 item 10)"),
    # ---- DPO (issue 21): minillm/dpo.py, minillm/preference.py ------------------------------------------
    Mutant("dpo-completion-mask-unshifted", "minillm/dpo.py", "completion_mask[:, 1:].bool()",
           "completion_mask[:, :-1].bool()", (pytest("tests/test_dpo.py::test_logps_count_only_completion_tokens"),
                                              parity("dpo", "dpo logps per sequence")),
           "the completion mask not shifted: the last prompt token's prediction counted, the last completion token's not"),
    Mutant("dpo-beta-twice", "minillm/dpo.py", "per_pair = -F.logsigmoid(cfg.beta * delta)",
           "per_pair = -F.logsigmoid(cfg.beta * cfg.beta * delta)",
           (pytest("tests/test_dpo.py::test_label_smoothing_is_ignored_by_sigmoid_and_used_by_robust"),
            parity("dpo", "dpo loss sigmoid")), "sigmoid loss with beta applied twice"),
    Mutant("dpo-ipo-no-length-norm", "minillm/dpo.py",
           "per_pair = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * cfg.beta)) ** 2",
           "per_pair = (chosen - rejected - 1 / (2 * cfg.beta)) ** 2",
           (pytest("tests/test_dpo.py::test_one_draw_equals_trl"),), "IPO on summed log-ratios, not per-token averages"),
    Mutant("dpo-margin-swapped", "minillm/dpo.py", '"rewards/margins": gather(chosen_rewards - rejected_rewards)',
           '"rewards/margins": gather(rejected_rewards - chosen_rewards)',
           (pytest("tests/test_dpo.py::test_metrics_are_trl_names_and_values"),), "rewards/margins logged as rejected - chosen"),
    Mutant("dpo-pack-positions-continue", "minillm/dpo.py", 'out["position_ids"][r, at:at + n] = torch.arange(n)',
           'out["position_ids"][r, at:at + n] = torch.arange(at, at + n)',
           (pytest("tests/test_dpo.py::test_packed_equals_padded_loss_and_grads"),),
           "packed DPO rows without restarting positions: each sequence attends to the ones before it in its row"),
    Mutant("pref-eos-not-appended", "minillm/preference.py",
           "(c if c.endswith(eos_token) else c + eos_token for c in", "(c for c in",
           (pytest("tests/test_dpo.py::test_plain_row_gets_eos_and_completion_follows_prompt"),),
           "plain-text completions without EOS (TRL appends it): the model never learns to stop"),
    Mutant("pref-keep-end-for-keep-start", "minillm/preference.py",
           'slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)',
           'slice(-max_length, None) if truncation_mode == "keep_start" else slice(None, max_length)',
           (pytest("tests/test_dpo.py::test_collate_layout_chosen_then_rejected_right_padded"),),
           "truncation modes swapped: keep_start cuts the prompt's beginning"),
]


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------

def copy_tree(dest: Path) -> None:
    """The code a check needs, without caches or the venv."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def apply(mutant: Mutant, tree: Path) -> str | None:
    """Plant the mutant in `tree`; None if applied, else why it is stale."""
    path = tree / mutant.file
    if not path.exists():
        return f"{mutant.file} does not exist"
    text = path.read_text()
    n = text.count(mutant.old)
    if n != 1:
        return f"snippet found {n} times in {mutant.file}" + (" (must be once)" if n else "")
    path.write_text(text.replace(mutant.old, mutant.new))
    return None


def run_check(check: str, tree: Path, timeout: float) -> tuple[bool | None, float, str]:
    """(passed, seconds, tail of output); passed is None on timeout."""
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", *shlex.split(check)], cwd=tree, env=env, capture_output=True,
                              text=True, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, time.perf_counter() - t0, out[-500:]
    return proc.returncode == 0, time.perf_counter() - t0, (proc.stdout + proc.stderr)[-500:]


@dataclass
class Result:
    mutant: Mutant
    verdict: str  # caught, SURVIVED, TIMEOUT, STALE, NO CHECK
    caught_by: str
    seconds: float
    detail: str = ""


def run_mutant(mutant: Mutant, scratch: Path, timeout: float, broken: set[str] = frozenset()) -> Result:
    """Plant `mutant` in a fresh copy and run its checks (but those in `broken`, which fail unmutated)."""
    checks = [c for c in mutant.checks if c not in broken]
    if not checks:
        return Result(mutant, "NO CHECK", "-", 0.0, "every check fails without the mutant")
    tree = scratch / mutant.name
    copy_tree(tree)
    t0 = time.perf_counter()
    try:
        stale = apply(mutant, tree)
        if stale:
            return Result(mutant, "STALE", "-", 0.0, stale)
        for check in checks:
            left = timeout - (time.perf_counter() - t0)
            if left <= 1:
                return Result(mutant, "TIMEOUT", "-", time.perf_counter() - t0, "no time left for " + check)
            passed, _, tail = run_check(check, tree, left)
            if passed is None:
                return Result(mutant, "TIMEOUT", "-", time.perf_counter() - t0, f"{check} ran past {timeout:.0f}s")
            if not passed:
                return Result(mutant, "caught", check, time.perf_counter() - t0)
        return Result(mutant, "SURVIVED", "-", time.perf_counter() - t0, "every check passed")
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def baseline(checks: list[str], scratch: Path, timeout: float) -> Iterator[tuple[str, bool | None, float, str]]:
    """Every distinct check on an unmutated copy: each must pass, or it proves nothing about a mutant."""
    tree = scratch / "baseline"
    copy_tree(tree)
    try:
        for check in checks:
            yield (check, *run_check(check, tree, timeout * 3))
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def format_results(results: list[Result]) -> str:
    head = ("mutant", "file", "verdict", "caught by", "seconds")
    body = [(r.mutant.name, r.mutant.file, r.verdict + (f" ({r.detail})" if r.detail and r.verdict != "caught" else ""),
             r.caught_by.replace(" -q -x -p no:cacheprovider", "").replace(f" --budget {BUDGET} --fail-fast", ""),
             f"{r.seconds:.0f}") for r in results]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def select(only: list[str] | None) -> list[Mutant]:
    if not only:
        return list(MUTANTS)
    chosen = [m for m in MUTANTS if any(m.name == o or m.name.startswith(o) for o in only)]
    if not chosen:
        raise SystemExit(f"--only {only}: no such mutant; names: {', '.join(m.name for m in MUTANTS)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.mutants", description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="mutant name or prefix (repeatable)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for all of one mutant's checks")
    ap.add_argument("--list", action="store_true", help="print the mutants and their checks, run nothing")
    ap.add_argument("--apply-only", action="store_true", help="only check that every snippet still applies")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the checks on an unmutated copy")
    args = ap.parse_args(argv)
    mutants = select(args.only)
    if args.list:
        for m in mutants:
            print(f"{m.name:34s} {m.file:22s} {m.bug}\n{'':34s} checks: {' ; '.join(m.checks)}")
        return 0
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minillm-mutants-") as tmp:
        scratch = Path(tmp)
        if args.apply_only:
            tree = scratch / "tree"
            copy_tree(tree)
            bad = []
            for m in mutants:  # each on a fresh copy of its file (several mutants share a file)
                why = apply(m, tree)
                if why:
                    bad.append((m.name, why))
                elif (ROOT / m.file).exists():
                    shutil.copy2(ROOT / m.file, tree / m.file)
            for n, why in bad:
                print(f"STALE {n}: {why}")
            print(f"{len(mutants) - len(bad)}/{len(mutants)} mutants apply")
            return 1 if bad else 0
        broken: set[str] = set()
        if not args.no_baseline:
            checks = list(dict.fromkeys(c for m in mutants for c in m.checks))
            print(f"baseline: {len(checks)} checks on an unmutated copy", flush=True)
            for check, passed, seconds, tail in baseline(checks, scratch, args.timeout):
                print(f"  {'ok  ' if passed else 'FAIL'} {seconds:5.1f}s {check}", flush=True)
                if not passed:
                    broken.add(check)
                    print("    " + tail.strip().replace("\n", "\n    ")[-400:], flush=True)
            if broken:
                print(f"{len(broken)} check(s) fail without a mutant (they would catch anything): "
                      "left out of every mutant's checks below", flush=True)
        results = []
        for i, m in enumerate(mutants, 1):
            r = run_mutant(m, scratch, args.timeout, broken)
            results.append(r)
            print(f"[{i:2d}/{len(mutants)}] {r.verdict:8s} {m.name:34s} {r.seconds:5.1f}s  {r.caught_by}"
                  + (f"  ({r.detail})" if r.detail and r.verdict != "caught" else ""), flush=True)
    print()
    print(format_results(results))
    caught = sum(r.verdict == "caught" for r in results)
    print(f"\n{caught}/{len(results)} mutants caught, each within {args.timeout:.0f}s; "
          f"{time.perf_counter() - t_start:.0f}s in all" + (f"; {len(broken)} check(s) failed unmutated" if broken else ""))
    return 0 if caught == len(results) and not broken else 1


if __name__ == "__main__":
    sys.exit(main())

"""finetune.py --peft prefix|prompt|adapter|lora (embeddings): both implementations, ZeRO-2, resume, refusals.

The 2-rank runs are real torchrun launches under ds_configs/zero2.json (~25 s each, mostly start-up), so there
are few: prompt tuning (init from text) and prefix tuning with its projection MLP, each with --impl minillm and
--impl hf (peft), and the Houlsby adapter (minillm only; peft has none) once uninterrupted and once resumed from
its checkpoint. Prefix tuning without the projection, LoRA on embed_tokens and the resumes without DeepSpeed
run in-process. The base is a seeded random tiny model: parity needs equal starting weights, not a trained one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import LOSS_TOL, ROOT, _assert_same_curve, _losses, _main, _run  # noqa: E402

ZERO2 = str(ROOT / "ds_configs" / "zero2.json")
ZERO3 = str(ROOT / "ds_configs" / "zero3.json")
COMMON = ["--max_len", "64", "--per_device_train_batch_size", "2", "--max_steps", "6", "--learning_rate", "5e-3",
          "--logging_steps", "1", "--seed", "7", "--disable_tqdm", "true", "--report_to", "none",
          "--save_steps", "3"]
METHODS = {"prompt": ["--peft", "prompt", "--num_virtual_tokens", "6", "--prompt_tuning_init_text",
                      "Answer the question"],
           "prefix_proj": ["--peft", "prefix", "--num_virtual_tokens", "5", "--prefix_projection",
                           "--encoder_hidden_size", "24"],
           "prefix": ["--peft", "prefix", "--num_virtual_tokens", "5"],
           "lora_embed": ["--peft", "lora", "--lora_target_modules", "embed_tokens", "q_proj", "v_proj"],
           "adapter": ["--peft", "adapter", "--adapter_bottleneck", "8"]}
ADAPTER_TOL = 1e-4  # trained adapters of the two impls after 6 AdamW steps from equal weights (observed ~1e-7)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A seeded random tiny model in HF format, with the bundled tokenizer beside it."""
    from train.args import ModelArguments
    from train.models import load_tokenizer, model_config

    from minillm.infra import corpus
    from minillm.model import CausalLM

    d = tmp_path_factory.mktemp("peft") / "base"
    tok = load_tokenizer(ModelArguments())
    torch.manual_seed(0)
    CausalLM(model_config(ModelArguments(config_name="tiny"), tok)).save_pretrained(d)
    for f in corpus.TOKENIZER_DIR.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def ds_runs(base) -> Path:
    """2-rank ZeRO-2: prompt and projected prefix with both impls; the Houlsby adapter with minillm."""
    tmp = base.parent
    for method in ("prompt", "prefix_proj"):
        for impl in ("minillm", "hf"):
            _run("finetune.py", ["--impl", impl, "--model_name_or_path", str(base), *METHODS[method], *COMMON,
                                 "--deepspeed", ZERO2, "--output_dir", str(tmp / f"{method}-{impl}")],
                 tmp / "cache", tmp / f"{method}-{impl}.log")
    _run("finetune.py", ["--model_name_or_path", str(base), *METHODS["adapter"], *COMMON, "--deepspeed", ZERO2,
                         "--output_dir", str(tmp / "adapter-minillm")], tmp / "cache", tmp / "adapter-minillm.log")
    return tmp


def _adapter_delta(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _logits_both_ways(base: Path, adapter: Path) -> float:
    """The adapter loaded by minillm (peft_format.load_adapter) and by peft: max |Δ| of their logits."""
    import peft
    from transformers import AutoModelForCausalLM

    from minillm import peft as peft_format
    from minillm.model import CausalLM

    ours = peft_format.load_adapter(CausalLM.from_pretrained(base), adapter).eval()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    x = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours(x).logits - theirs(input_ids=x).logits).abs().max().item()


@pytest.mark.parametrize("method", ["prompt", "prefix_proj"])
def test_zero2_both_impls_train_alike_and_files_move_both_ways(ds_runs, base, method):
    a, b = ds_runs / f"{method}-minillm", ds_runs / f"{method}-hf"
    assert len(_losses(a)) == 6
    _assert_same_curve(_losses(a), _losses(b))
    assert _adapter_delta(a, b) < ADAPTER_TOL
    for out in (a, b):  # each side's file loads in both, with the same outputs
        assert _logits_both_ways(base, out) < 1e-5
    log = (ds_runs / f"{method}-minillm.log").read_text()
    assert "trainable params: " in log and "Total train batch size (w. parallel, distributed & accumulation) = 4" in log
    run = json.loads((a / "run.json").read_text())
    assert run["peft"]["method"] == method.removesuffix("_proj")


def test_zero2_houlsby_adapter_trains_and_resumes(ds_runs, base):
    """The adapter run lowers the loss and saves minillm's adapter format; killed after checkpoint-3 (here: only
    checkpoint-3 kept) and rerun, it ends with the same adapter as the uninterrupted run."""
    from minillm import peft as peft_format
    from minillm.peft.houlsby import AdaptedLinear
    from minillm.model import CausalLM

    ref = ds_runs / "adapter-minillm"
    losses = _losses(ref)
    assert losses[6] < losses[1]
    model = peft_format.load_adapter(CausalLM.from_pretrained(base), ref)
    assert sum(isinstance(m, AdaptedLinear) for m in model.modules()) == 2 * model.config.num_hidden_layers
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "adapter.up" in n)  # trained off zero
    out = ds_runs / "adapter-resumed"
    out.mkdir()
    shutil.copytree(ref / "checkpoint-3", out / "checkpoint-3")
    shutil.copy(ref / "run.json", out / "run.json")
    _run("finetune.py", ["--model_name_or_path", str(base), *METHODS["adapter"], *COMMON, "--deepspeed", ZERO2,
                         "--output_dir", str(out)], ds_runs / "cache", ds_runs / "adapter-resumed.log")
    assert "RESUMING from" in (ds_runs / "adapter-resumed.log").read_text()
    assert abs(_losses(out)[6] - losses[6]) < 1e-6
    assert _adapter_delta(ref, out) < 1e-6


def _sft(monkeypatch, out: Path, base: Path, *args: str) -> None:
    _main("finetune.py", ["--model_name_or_path", str(base), *COMMON, "--cache_dir", str(out.parent / "cache"),
                          "--output_dir", str(out), *args], monkeypatch)


@pytest.mark.parametrize("method", ["prefix", "lora_embed"])
def test_single_process_both_impls_agree(base, tmp_path, monkeypatch, method):
    for impl in ("minillm", "hf"):
        _sft(monkeypatch, tmp_path / impl, base, "--impl", impl, *METHODS[method])
    _assert_same_curve(_losses(tmp_path / "minillm"), _losses(tmp_path / "hf"))
    assert _adapter_delta(tmp_path / "minillm", tmp_path / "hf") < ADAPTER_TOL
    assert _logits_both_ways(base, tmp_path / "minillm") < 1e-5
    if method == "lora_embed":
        w = load_file(tmp_path / "minillm" / "adapter_model.safetensors")
        assert any("lora_embedding_A" in k for k in w) and any("lora_embedding_B" in k for k in w)


@pytest.mark.parametrize("impl,method", [("minillm", "prefix_proj"), ("hf", "prefix_proj"), ("minillm", "prompt"),
                                         ("minillm", "adapter")])
def test_resume_without_deepspeed_restores_what_was_trained(base, tmp_path, monkeypatch, impl, method):
    """A projected prefix is saved as its table (peft's rule), from which the MLP cannot be rebuilt: the stock
    Trainer's resume of peft's own checkpoint fails there. Those checkpoints carry trainable.safetensors instead;
    minillm's prompt tuning and Houlsby adapters resume from the adapter file itself (it holds every trained
    tensor), and all of them continue the uninterrupted run."""
    args = ["--impl", impl, *METHODS[method]]
    _sft(monkeypatch, tmp_path / "ref", base, *args)
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(tmp_path / "ref" / "checkpoint-3", out / "checkpoint-3")
    shutil.copy(tmp_path / "ref" / "run.json", out / "run.json")
    assert (out / "checkpoint-3" / "trainable.safetensors").is_file() == (method == "prefix_proj")
    _sft(monkeypatch, out, base, *args)
    assert abs(_losses(out)[6] - _losses(tmp_path / "ref")[6]) < LOSS_TOL
    assert _adapter_delta(tmp_path / "ref", out) < 1e-6


def test_prefix_with_gradient_checkpointing_trains_the_same(base, tmp_path, monkeypatch):
    """minillm's prefix tuning with --gradient_checkpointing gets non-re-entrant checkpointing; the numbers do not
    change. (transformers' checkpointed layers drop the cache holding peft's prefix: --impl hf is refused.)"""
    for gc in ([], ["--gradient_checkpointing"]):
        _sft(monkeypatch, tmp_path / f"gc{len(gc)}", base, "--max_steps", "2", *METHODS["prefix"], *gc)
    _assert_same_curve(_losses(tmp_path / "gc0"), _losses(tmp_path / "gc1"))


@pytest.mark.parametrize("args,message", [
    (["--impl", "hf", "--peft", "adapter"], "--peft adapter: peft has no Houlsby adapters"),
    (["--peft", "prompt", "--packing", "--use_cache", "false"], "--packing cannot be used with --peft prompt"),
    (["--peft", "prefix", "--packing", "--use_cache", "false"], "--packing cannot be used with --peft prefix"),
    (["--peft", "prefix", "--prompt_tuning_init_text", "hi"], "--prompt_tuning_init_text is for --peft prompt"),
    (["--peft", "prompt", "--lora_r", "4"], "--lora_r is for --peft lora"),
    (["--use_lora", "--peft", "prefix"], "--use_lora means --peft lora"),
    (["--peft", "prompt", "--num_virtual_tokens", "0"], "--num_virtual_tokens 0: must be a positive int"),
    (["--peft", "adapter", "--adapter_bottleneck", "0"], "--adapter_bottleneck 0: must be a positive int"),
    (["--peft", "prefix", "--gradient_checkpointing", "--gradient_checkpointing_kwargs", '{"use_reentrant": true}'],
     "re-entrant activation checkpointing"),
    (["--impl", "hf", "--peft", "prefix", "--gradient_checkpointing"], "drop the KV cache that holds peft's prefix"),
    (["--peft", "prompt", "--deepspeed", ZERO3], "--peft prompt under ZeRO-3 is not supported"),
    (["--impl", "hf", "--peft", "prefix", "--deepspeed", ZERO3], "--peft prefix under ZeRO-3 is not supported"),
    (["--peft", "adapter", "--num_virtual_tokens", "5"], "--num_virtual_tokens is for --peft prefix/prompt"),
    (["--peft", "adapter", "--adapter_bottleneck", "64"], "--adapter_bottleneck 64: must be smaller than the "
     "model's hidden_size 64"),
    (["--peft", "prompt", "--num_virtual_tokens", "100", "--max_len", "1000"], "exceeds the model's "
     "max_position_embeddings"),
])
def test_bad_peft_arguments_are_refused(base, tmp_path, monkeypatch, args, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        _main("finetune.py", ["--model_name_or_path", str(base), "--output_dir", str(tmp_path / "o"), *args],
              monkeypatch)
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_resume_with_another_method_is_refused(base, tmp_path, monkeypatch):
    out = tmp_path / "o"
    _sft(monkeypatch, out, base, *METHODS["prompt"], "--max_steps", "3")
    with pytest.raises(SystemExit, match="would continue a different run: peft"):
        _sft(monkeypatch, out, base, *METHODS["prefix"], "--max_steps", "6")


@pytest.mark.parametrize("impl,method", [("minillm", "prompt"), ("hf", "prefix_proj"), ("minillm", "lora_embed")])
def test_load_best_model_at_end_reloads_the_best_adapter(base, tmp_path, monkeypatch, impl, method):
    """--load_best_model_at_end (the stock Trainer looks for pytorch_model.bin, or loads a projected prefix's table
    into its MLP and fails): the final adapter is the best checkpoint's."""
    val = tmp_path / "val.jsonl"
    val.write_text("".join(open(ROOT / "minillm" / "data" / "sft.jsonl", encoding="utf-8").readlines()[:8]))
    out = tmp_path / "o"
    _sft(monkeypatch, out, base, "--impl", impl, *METHODS[method], "--validation_files", str(val),
         "--eval_strategy", "steps", "--eval_steps", "3", "--load_best_model_at_end")
    state = json.loads((out / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"])
    assert best.parent == out and best.is_dir()
    assert _adapter_delta(out, best) == 0.0
    others = [c for c in out.glob("checkpoint-*") if c.name != best.name]
    assert others and all(_adapter_delta(out, c) > 0 for c in others)  # a real choice was made


def test_resume_across_deepspeed_and_plain_is_refused(ds_runs, base, monkeypatch):
    """A DeepSpeed checkpoint keeps its optimizer and schedule in DeepSpeed's files: resumed without DeepSpeed the
    Trainer would restart them silently (and the other way round it finds no checkpoint)."""
    out = ds_runs / "cross"
    out.mkdir()
    shutil.copytree(ds_runs / "prompt-minillm" / "checkpoint-3", out / "checkpoint-3")
    shutil.copy(ds_runs / "prompt-minillm" / "run.json", out / "run.json")
    with pytest.raises(SystemExit, match="was saved by a run with DeepSpeed: resume it with the same --deepspeed"):
        _sft(monkeypatch, out, base, *METHODS["prompt"])


def test_model_dir_that_is_an_adapter_is_named(base, tmp_path, monkeypatch, ds_runs):
    with pytest.raises(SystemExit, match="is a prompt-tuning adapter, not a model; .* fine-tune from its base model"):
        _main("finetune.py", ["--model_name_or_path", str(ds_runs / "prompt-minillm"), "--output_dir",
                              str(tmp_path / "o")], monkeypatch)

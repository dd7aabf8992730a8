"""minillm.generation vs transformers' generate: eos stopping on peaked weights, sampling warpers, sampled decoding.

Rows:
- greedy generation over drawn weights whose output distributions are peaked (the final norm scaled up,
  as training does to a model) with a left-padded batch and eos ids chosen so that rows stop at
  different steps: the same tokens, the same stop positions, the same padding after them.
- greedy generation with several eos ids and no pad id set anywhere: transformers pads finished rows with the
  first eos id, and so must minillm (issue 25 item 3).
- temperature / top-k / top-p filtering: `minillm.generation.warp_logits` against the processors that
  transformers' `generate` itself builds (`_get_logits_processor`, so its composition order is what is
  compared too), on drawn logits with ties, -inf entries and peaked rows, and drawn parameters, including
  values where cumulative probabilities hit 1 - top_p exactly (equal logits, power-of-two counts), so an
  off-by-one in top-p (`<` for `<=`, one token kept too many or too few) cannot pass. Exact: 0 differences.
- sampled generation: the same seed on both sides gives the same tokens. transformers draws with
  `torch.multinomial(probs, 1)` once per step for the whole batch from the global RNG; minillm does the same
  (no `generator`), so the draws are the same draws.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
import transformers
from hypothesis import strategies as st

from minillm import ModelConfig
from minillm.generation import warp_logits
from parity.harness import Row, property_rows
from parity.model import hf_copy, random_model

transformers.logging.set_verbosity_error()


@st.composite
def model_cases(draw) -> dict:
    model_type = draw(st.sampled_from(["llama", "qwen2", "qwen3"]))
    kv = draw(st.sampled_from([1, 2]))
    cfg = ModelConfig(model_type=model_type, vocab_size=draw(st.sampled_from([48, 97])), hidden_size=32,
                      intermediate_size=48, num_hidden_layers=draw(st.integers(1, 2)), num_attention_heads=4,
                      num_key_value_heads=kv, tie_word_embeddings=draw(st.booleans()), max_position_embeddings=64,
                      pad_token_id=None, eos_token_id=None)
    B, T = draw(st.integers(2, 4)), draw(st.integers(2, 8))
    return {"cfg": cfg, "seed": draw(st.integers(0, 2**16)), "B": B, "T": T,
            "lengths": [T] + [draw(st.integers(1, T)) for _ in range(B - 1)],  # left padding, one full row
            "peak": draw(st.sampled_from([1.0, 4.0, 16.0])),  # final-norm scale: logits x peak
            "stop_step": draw(st.integers(0, 10)), "two_eos": draw(st.booleans()),
            "pad": draw(st.sampled_from(["eos", "own"])), "new": 16}


def _models_and_batch(case: dict):
    ours = random_model(case["cfg"], case["seed"]).eval()
    with torch.no_grad():
        ours.model.norm.weight.mul_(case["peak"])  # peaked next-token distributions, as in a trained model
    ref = hf_copy(ours).eval()
    ref.generation_config = transformers.GenerationConfig()  # nothing but what is passed below
    B, T, V = case["B"], case["T"], case["cfg"].vocab_size
    g = torch.Generator().manual_seed(case["seed"])
    ids = torch.randint(4, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] >= T - torch.tensor(case["lengths"])[:, None]).long()
    return ours, ref, ids, mask


def _rules(case: dict, ours, ids, mask) -> tuple[list[int], int]:
    """eos ids that make row 0 stop at `stop_step` (its own greedy token there) and maybe a second one from
    row 1, so rows stop at different steps; pad is eos[0] (transformers' fallback) or an id of its own."""
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=case["new"], eos_token_id=[], pad_token_id=0)
    new = free[:, ids.shape[1]:]
    eos = [int(new[0, case["stop_step"]])]
    if case["two_eos"] and int(new[1, -1]) not in eos:
        eos.append(int(new[1, -1]))
    pad = eos[0] if case["pad"] == "eos" else next(i for i in range(4) if i not in eos)
    return eos, pad


def _mismatches(a: torch.Tensor, b: torch.Tensor) -> float:
    n = max(a.shape[1], b.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, n - x.shape[1]), value=-1)
    return float((pad(a) != pad(b)).sum().item())


def greedy_eos_delta(case: dict) -> float:
    ours, ref, ids, mask = _models_and_batch(case)
    eos, pad = _rules(case, ours, ids, mask)
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=case["new"], eos_token_id=eos, pad_token_id=pad)
    b = ref.generate(ids, attention_mask=mask, max_new_tokens=case["new"], do_sample=False, eos_token_id=eos,
                     pad_token_id=pad)
    # the case is built so that row 0 stops by stop_step: check the stop really happened (on transformers' side)
    assert bool(torch.isin(b[0, ids.shape[1]:ids.shape[1] + case["stop_step"] + 1], torch.tensor(eos)).any()), \
        "row 0 did not stop at eos: the case does not exercise eos stopping"
    return _mismatches(a, b)


def no_pad_delta(case: dict) -> float:
    """Several eos ids and no pad id anywhere (argument, config, generation config): transformers pads finished
    rows with the first eos id (`_prepare_special_tokens`); so must minillm. Row 0 stops at `stop_step`, a second
    eos id comes from row 1, and the rows that go on make the padding of row 0 visible."""
    ours, ref, ids, mask = _models_and_batch(case)
    eos, _ = _rules({**case, "two_eos": True}, ours, ids, mask)
    assert ours.config.pad_token_id is None and ref.generation_config.pad_token_id is None
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=case["new"], eos_token_id=eos)
    b = ref.generate(ids, attention_mask=mask, max_new_tokens=case["new"], do_sample=False, eos_token_id=eos)
    return _mismatches(a, b)


def sampled_delta(case: dict) -> float:
    ours, ref, ids, mask = _models_and_batch(case)
    eos, pad = _rules(case, ours, ids, mask)
    w = case["warp"]
    torch.manual_seed(case["seed"])
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=case["new"], eos_token_id=eos, pad_token_id=pad,
                      do_sample=True, temperature=w["temperature"], top_k=w["top_k"], top_p=w["top_p"])
    torch.manual_seed(case["seed"])
    b = ref.generate(ids, attention_mask=mask, max_new_tokens=case["new"], eos_token_id=eos, pad_token_id=pad,
                     **hf_sampling(w))
    return _mismatches(a, b)


# ---- warpers on drawn logits -----------------------------------------------------------------------------
TOP_P = [None, 1.0, 0.999, 0.95, 0.9, 0.75, 0.5, 0.3, 0.25, 0.125, 0.1, 1e-3]  # 0.75/0.5/0.25/0.125: exact sums


@st.composite
def warps(draw, vocab: int = 64) -> dict:
    return {"temperature": draw(st.sampled_from([None, 1.0, 0.25, 0.5, 0.7, 1.3, 2.0])),
            "top_k": draw(st.sampled_from([None, 0, 1, 2, 3, 8, vocab - 1, vocab, vocab + 5])),
            "top_p": draw(st.sampled_from(TOP_P))}


def hf_sampling(w: dict) -> dict:
    """The same request in transformers' terms: its unset top_k means 50, minillm's None means no top-k."""
    return {"do_sample": True, "temperature": w["temperature"], "top_k": w["top_k"] or 0, "top_p": w["top_p"]}


@st.composite
def logits_cases(draw) -> dict:
    B, V = draw(st.integers(1, 4)), draw(st.sampled_from([16, 64, 257]))
    kind = draw(st.sampled_from(["normal", "peaked", "ties", "flat", "masked"]))
    return {"B": B, "V": V, "kind": kind, "seed": draw(st.integers(0, 2**16)), "warp": draw(warps(V))}


def drawn_logits(case: dict) -> torch.Tensor:
    B, V, kind = case["B"], case["V"], case["kind"]
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(B, V, generator=g)
    if kind == "peaked":
        x = x * 12.0
    elif kind == "ties":  # few distinct values: many exact ties at the top-k / top-p boundary
        x = torch.round(x * 2) / 2
    elif kind == "flat":  # 2^j equal maxima, the rest impossible: probabilities (and their sums) are exact
        j = int(torch.randint(0, int(math.log2(V)) + 1, (1,), generator=g))
        x = torch.full((B, V), -float("inf"))
        for r in range(B):
            x[r, torch.randperm(V, generator=g)[: 2**j]] = 1.5
    elif kind == "masked":  # some entries already -inf (e.g. filtered by an earlier processor)
        x = x.masked_fill(torch.rand(B, V, generator=g) < 0.5, -float("inf"))
        x[:, 0] = 0.0  # at least one finite entry per row
    return x


_REF = {}


def _reference_processors(w: dict):
    """The LogitsProcessorList transformers' generate builds for these sampling arguments."""
    if "model" not in _REF:
        cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                       num_attention_heads=1, num_key_value_heads=1)
        _REF["model"] = transformers.LlamaForCausalLM(cfg).eval()
        _REF["model"].generation_config = transformers.GenerationConfig()
    model = _REF["model"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen_cfg, _ = model._prepare_generation_config(None, **hf_sampling(w))
    return model._get_logits_processor(generation_config=gen_cfg, input_ids_seq_length=1,
                                       logits_processor=transformers.LogitsProcessorList(), device="cpu",
                                       model_kwargs={})


def warper_delta(case: dict) -> float:
    """Entries where minillm's filtered logits differ from transformers' (kept set or value): must be 0."""
    x = drawn_logits(case)
    w = case["warp"]
    ours = warp_logits(x.clone(), w["temperature"], w["top_k"], w["top_p"])
    ref = _reference_processors(w)(torch.zeros(x.shape[0], 1, dtype=torch.long), x.clone())
    kept_a, kept_b = torch.isfinite(ours), torch.isfinite(ref)
    differ = (kept_a != kept_b) | (kept_a & kept_b & (ours != ref))
    return float(differ.sum().item())


@st.composite
def sampling_cases(draw) -> dict:
    case = draw(model_cases())
    case["warp"] = draw(warps(case["cfg"].vocab_size))
    return case


def _one_thread(fn, *args):
    """fn(*args) on one intra-op thread: these models are tiny, and a second thread only adds synchronisation
    (10x slower per matmul on a busy 2-core machine); both sides run under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def rows(budget: float = 1.0) -> Iterator[Row]:
    n = lambda k: max(1, int(round(k * budget)))
    ref = f"transformers {transformers.__version__} generate"
    yield from _one_thread(property_rows, [("greedy, peaked weights, eos stops (mism.)", ref, "generate")],
                           model_cases(), lambda c: [greedy_eos_delta(c)], n(12))
    yield from _one_thread(property_rows, [("greedy, several eos ids, no pad set (mism.)", ref + " (pad = eos[0])",
                                             "generate")], model_cases(), lambda c: [no_pad_delta(c)], n(12))
    yield from _one_thread(property_rows, [("temperature/top-k/top-p filtering", ref + " logits warpers", "warpers")],
                           logits_cases(), lambda c: [warper_delta(c)], n(300))
    yield from _one_thread(property_rows, [("sampled generate, same seed (mism.)", ref + "(do_sample)", "sampling")],
                           sampling_cases(), lambda c: [sampled_delta(c)], n(12))

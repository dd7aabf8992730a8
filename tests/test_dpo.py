"""minillm.dpo and minillm.preference: the loss formulas at known points, the fused log-probs, the reference as
the adapter switched off, precomputed reference log-probs, hostile preference rows, and one draw against TRL."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tokenizers import Tokenizer

from minillm import dpo, preference
from minillm.config import ModelConfig
from minillm.infra.corpus import TOKENIZER_DIR
from minillm.model import CausalLM

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


def tiny(seed: int = 0, vocab: int = 4096) -> CausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    return CausalLM(cfg, attn_implementation="eager")


ROWS = [{"prompt": "The sun is", "chosen": " hot.", "rejected": " cold and blue."},
        {"prompt": "太阳是", "chosen": "热的。", "rejected": "冷的。"}]


def batch_of(tok, rows=ROWS, max_length=64):
    kept, _ = preference.tokenize_rows(tok, rows, EOS, max_length)
    return kept, preference.collate(kept, pad_token_id=3, max_length=max_length)


def perturbed(model: CausalLM, seed: int = 1) -> CausalLM:
    policy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return policy


# ---- data ------------------------------------------------------------------------------------------
def test_plain_row_gets_eos_and_completion_follows_prompt(tok):
    ids = preference.tokenize_row(tok, ROWS[0], EOS)
    eos = tok.token_to_id(EOS)
    assert ids["prompt_ids"] == tok.encode("The sun is").ids
    assert ids["chosen_ids"][-1] == eos and ids["rejected_ids"][-1] == eos
    assert ids["prompt_ids"] + ids["chosen_ids"] == tok.encode("The sun is hot." + EOS).ids
    # an EOS already there is not doubled
    assert preference.tokenize_row(tok, {**ROWS[0], "chosen": " hot." + EOS}, EOS) == ids


def test_conversational_row_prompt_has_generation_prompt(tok):
    row = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
           "rejected": [{"role": "assistant", "content": "Go away."}]}
    ids = preference.tokenize_row(tok, row, EOS)
    assert tok.decode(ids["prompt_ids"], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert "You are a helpful assistant." in tok.decode(ids["prompt_ids"], skip_special_tokens=False)
    assert tok.decode(ids["chosen_ids"], skip_special_tokens=False) == "Hello.<|im_end|>\n"


def test_collate_layout_chosen_then_rejected_right_padded(tok):
    kept, b = batch_of(tok)
    B = len(kept)
    assert b["input_ids"].shape[0] == 2 * B
    for i, r in enumerate(kept):
        for j, key in ((i, "chosen_ids"), (B + i, "rejected_ids")):
            n = len(r["prompt_ids"]) + len(r[key])
            assert b["input_ids"][j, :n].tolist() == r["prompt_ids"] + r[key]
            assert b["attention_mask"][j].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
            assert b["completion_mask"][j, :n].tolist() == [0] * len(r["prompt_ids"]) + [1] * len(r[key])
    short = preference.collate(kept, 3, max_length=4, truncation_mode="keep_end")
    assert short["input_ids"][0].tolist() == (kept[0]["prompt_ids"] + kept[0]["chosen_ids"])[-4:]
    for mode in ("keep_start", "keep_end"):  # no max_length: nothing cut
        assert torch.equal(preference.collate(kept, 3, None, mode)["input_ids"], b["input_ids"])


def test_hostile_rows_are_counted_or_named(tok):
    rows = [ROWS[0],
            {"prompt": "x", "chosen": "y"},  # missing field
            {"prompt": "x", "chosen": 3, "rejected": "z"},  # non-string
            [1, 2],  # not an object
            {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]},  # conversational after a plain first row
            {"prompt": [{"role": "user"}], "chosen": [], "rejected": []},  # broken messages
            {"prompt": "same", "chosen": " tie", "rejected": " tie"},  # chosen == rejected: kept, counted
            {"prompt": "p", "chosen": "", "rejected": ""},  # empty completions: EOS only, kept
            {"prompt": "word " * 50, "chosen": " a", "rejected": " b"}]  # prompt beyond max_length: dropped
    where = [f"prefs.jsonl:{i + 1}" for i in range(len(rows))]
    kept, stats = preference.tokenize_rows(tok, rows, EOS, max_length=16, where=where)
    assert (stats.rows, stats.kept, stats.ties, stats.dropped_prompt_too_long) == (9, 3, 2, 1)
    assert [p.split(":")[1] for p in stats.problems] == ["2", "3", "4", "5", "6"]
    assert "has no 'rejected'" in stats.problems[0] and "chosen is int" in stats.problems[1]
    assert "first row is plain" in stats.problems[3]
    assert "9 preference rows: 3 kept" in str(stats)
    assert kept[2]["chosen_ids"] == [tok.token_to_id(EOS)]
    with pytest.raises(ValueError, match="truncation_mode"):
        preference.tokenize_rows(tok, ROWS, EOS, truncation_mode="keep_middle")


# ---- losses ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,at_zero", [("sigmoid", math.log(2)), ("hinge", 1.0),
                                               ("ipo", (1 / (2 * 0.1)) ** 2), ("robust", math.log(2))])
def test_losses_where_policy_equals_reference(loss_type, at_zero):
    logps = torch.tensor([-3.0, -5.0, -4.0, -2.0])
    mask = torch.full((4,), 6)  # completion tokens per sequence
    cfg = dpo.DPOConfig(loss_type=loss_type, label_smoothing=0.2)
    assert dpo.dpo_loss(cfg, logps, logps, mask).item() == pytest.approx(at_zero, rel=1e-6)


def test_label_smoothing_is_ignored_by_sigmoid_and_used_by_robust():
    logps, ref, mask = torch.tensor([-3.0, -6.0]), torch.tensor([-4.0, -4.0]), torch.full((2,), 3)
    sig = [dpo.dpo_loss(dpo.DPOConfig(label_smoothing=e), logps, ref, mask).item() for e in (0.0, 0.3)]
    rob = [dpo.dpo_loss(dpo.DPOConfig(loss_type="robust", label_smoothing=e), logps, ref, mask).item()
           for e in (0.0, 0.3)]
    assert sig[0] == sig[1] and rob[0] == pytest.approx(sig[0]) and rob[1] != rob[0]
    with pytest.raises(ValueError, match="not implemented"):
        dpo.DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.DPOConfig(loss_type="robust", label_smoothing=0.5)


def test_metrics_are_trl_names_and_values():
    logps, ref = torch.tensor([-3.0, -2.0, -6.0, -1.0]), torch.tensor([-4.0, -2.0, -4.0, -2.0])
    m = dpo.dpo_metrics(dpo.DPOConfig(beta=0.5), logps, ref)
    assert m == pytest.approx({"rewards/chosen": 0.25, "rewards/rejected": -0.25, "rewards/accuracies": 0.5,
                               "rewards/margins": 0.5, "logps/chosen": -2.5, "logps/rejected": -3.5})


# ---- log-probs ---------------------------------------------------------------------------------------
def test_fused_logps_and_grads_equal_plain(tok):
    _, b = batch_of(tok)
    model = tiny()
    grads = []
    for fused in (False, True):
        model.zero_grad()
        logps = dpo.completion_logps(model, b, fused=fused, chunk_elems=4096 * 5)  # chunks of 5 rows
        (logps * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        grads.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=2e-5, rtol=0)
    for a, c in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, c, atol=2e-5, rtol=2e-5)  # chunked GEMMs: another summation order


def test_logps_count_only_completion_tokens(tok):
    _, b = batch_of(tok)
    model = tiny().eval()
    logits = model(b["input_ids"], attention_mask=b["attention_mask"]).logits
    lp = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    expected = (lp * b["completion_mask"][:, 1:]).sum(1)
    torch.testing.assert_close(dpo.completion_logps(model, b, fused=False).double(), expected, atol=1e-5, rtol=0)


# ---- packed DPO ---------------------------------------------------------------------------------------
def test_pack_batch_layout(tok):
    kept, b = batch_of(tok, ROWS * 3)
    packed = dpo.pack_batch(b, 64)
    lengths = b["attention_mask"].sum(1)
    assert packed["input_ids"].shape[0] < b["input_ids"].shape[0] and "attention_mask" not in packed
    for i, n in enumerate(lengths.tolist()):  # every sequence whole, in one row, positions 0..n-1
        r, cols = (packed["sequence_id"] == i).nonzero(as_tuple=True)
        assert len(set(r.tolist())) == 1 and len(cols) == n and cols.diff().eq(1).all()
        assert packed["input_ids"][r[0], cols].tolist() == b["input_ids"][i, :n].tolist()
        assert packed["position_ids"][r[0], cols].tolist() == list(range(n))
        assert packed["completion_mask"][r[0], cols].tolist() == b["completion_mask"][i, :n].tolist()
    assert torch.equal(dpo.completion_lengths(packed), dpo.completion_lengths(b))
    model = tiny()
    pre = preference.collate(dpo.precompute_ref_logps(model, kept, 3, dpo.DPOConfig(), 2, ref_model=model), 3, 64)
    assert torch.equal(dpo.pack_batch(pre)["ref_chosen_logps"], pre["ref_chosen_logps"])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_packed_equals_padded_loss_and_grads(tok, loss_type):
    _, b = batch_of(tok, ROWS * 3)
    ref_model = tiny().eval()
    policy = perturbed(ref_model)
    cfg = dpo.DPOConfig(loss_type=loss_type)
    out = []
    for batch in (b, dpo.pack_batch(b, 64)):
        policy.zero_grad()
        loss, metrics = dpo.dpo_step(cfg, policy, batch, ref_model=ref_model)
        loss.backward()
        out.append((loss.item(), metrics, [p.grad.clone() for p in policy.parameters()]))
    (la, ma, ga), (lb, mb, gb) = out
    scale = 1.0 if loss_type == "sigmoid" else 25.0  # ipo's loss ~ (1 / (2 beta))^2: its fp32 rounding scales
    assert abs(la - lb) <= 1e-6 * scale and ma == pytest.approx(mb, rel=1e-6, abs=1e-6)
    assert max((x - y).abs().max().item() for x, y in zip(ga, gb)) <= 1e-6 * scale


# ---- the reference -----------------------------------------------------------------------------------
def test_lora_reference_is_the_adapter_switched_off(tok):
    from minillm import peft
    _, b = batch_of(tok)
    base = tiny()
    model = peft.apply(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    loss, m = dpo.dpo_step(dpo.DPOConfig(), model, b)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)  # B = 0 at init: the policy is the reference
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ref = dpo.reference_logps(model, b)
    torch.testing.assert_close(ref, dpo.completion_logps(base, b))
    loss, _ = dpo.dpo_step(dpo.DPOConfig(), model, b)
    loss.backward()
    assert loss.item() != pytest.approx(math.log(2), abs=1e-6)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_precompute_on_equals_off(tok):
    kept, b = batch_of(tok)
    ref_model = tiny().eval()
    policy = perturbed(ref_model)
    cfg = dpo.DPOConfig(max_length=64)
    pre = dpo.precompute_ref_logps(policy, kept, 3, cfg, batch_size=len(kept), ref_model=ref_model)
    on = dpo.dpo_step(cfg, policy, preference.collate(pre, 3, 64))
    off = dpo.dpo_step(cfg, policy, b, ref_model=ref_model)
    assert on[0].item() == off[0].item() and on[1] == off[1]


# ---- against TRL (one fixed draw; `python -m parity.dpo` draws many) ---------------------------------
def test_one_draw_equals_trl():
    pytest.importorskip("trl")
    from parity import dpo as parity_dpo
    from parity.tolerances import tol
    tok = parity_dpo.tokenizer()
    d = parity_dpo.Draw(rows=[*ROWS, {"prompt": "2+2=", "chosen": "4", "rejected": "4"}], max_length=16, beta=0.5)
    deltas = parity_dpo.measure(d, tok)
    for (check, _, name), delta in zip(parity_dpo._specs(), deltas):
        assert delta <= tol(name), (check, delta)

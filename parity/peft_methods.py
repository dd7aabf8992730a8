"""Prompt tuning, prefix tuning, (IA)^3 (vs peft 0.21), Houlsby adapters (vs the paper's equations), and
switching any of them off (minillm.peft.disable_adapter vs peft's `disable_adapter()` and the base model).

Prompt/prefix rows: the minillm model and the transformers model hold the same weights (parity.lora.base_models);
both sides construct their prompt encoder under the same seed, which must give the same initial tensors (a row);
then the trainable tensors are randomised on the peft side and copied over, and logits, loss and the gradient of
every trainable tensor are compared on left-padded batches.

Generation: peft 0.21.2's `generate` on transformers 5.24 does not do prompt learning right, measured here:
with the default use_cache=True its prepare_inputs_for_generation looks for `past_key_values`, which
transformers 5.x calls `cache`, so the prefix never reaches the cache (prefix tuning generates as the base
model with shifted positions) and prompt tuning feeds its virtual tokens again at every step; with
use_cache=False the first step's logits equal its forward's but later steps drift (2e-2 at step 2). Its
forward, which the rows above show equal to minillm's to the bit, is the reference: greedy decoding by
peft's forward over the whole sequence at every step (`peft_greedy`) vs minillm's cached generate.

Houlsby adapters: peft has none; the reference is the paper's two equations written out here with plain
tensor ops on the frozen transformers model's own weights, layer by layer (not minillm's module code).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from minillm.peft import houlsby as ha
from minillm import peft as peft_format
from minillm.model import trainable_summary
from minillm.peft.prefix import PrefixTuningConfig, PrefixTuningLM
from minillm.peft.prompt import PromptTuningConfig, PromptTuningLM
from parity.harness import fixed_check, named_check, property_rows, selected
from parity.lora import Case, _max_abs, base_models


PEFT = "peft 0.21 on transformers"


@dataclass(frozen=True)
class PCase:
    kind: str = "prefix"  # "prompt" | "prefix"
    base: Case = Case()
    P: int = 3
    init: str = "RANDOM"  # prompt tuning: RANDOM | SAMPLE_VOCAB | TEXT
    projection: bool = False
    encoder_hidden: int | None = None
    left_pad: bool = True
    position_ids: bool = False  # pass explicit position_ids (peft: + P for prefix, dropped for prompt)


TEXT = "Answer the question briefly."


def _text_ids() -> list[int]:
    from transformers import AutoTokenizer

    from minillm.infra.corpus import TOKENIZER_DIR
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))(TEXT)["input_ids"]


def pair(c: PCase, seed: int = 0, randomize: bool = True):
    """(minillm wrapper, peft model) over identical base weights; the same seed before each prompt encoder."""
    import peft
    from minillm.infra.corpus import TOKENIZER_DIR
    ours, ref = base_models(c.base, seed)
    torch.manual_seed(seed + 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if c.kind == "prompt":
            text = c.init == "TEXT"
            pm = peft.get_peft_model(ref, peft.PromptTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=c.P, prompt_tuning_init=c.init,
                prompt_tuning_init_text=TEXT if text else None, tokenizer_name_or_path=str(TOKENIZER_DIR) if text else None))
            torch.manual_seed(seed + 10)
            w = PromptTuningLM(ours, PromptTuningConfig(num_virtual_tokens=c.P, prompt_tuning_init=c.init,
                                                         prompt_tuning_init_text=TEXT if text else None,
                                                         init_token_ids=_text_ids() if text else None))
        else:
            pm = peft.get_peft_model(ref, peft.PrefixTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=c.P, prefix_projection=c.projection,
                encoder_hidden_size=c.encoder_hidden))
            torch.manual_seed(seed + 10)
            w = PrefixTuningLM(ours, PrefixTuningConfig(num_virtual_tokens=c.P, prefix_projection=c.projection,
                                                        encoder_hidden_size=c.encoder_hidden))
    theirs, mine = _trainable(pm), _trainable(w)
    init = max(_max_abs(a, b) for a, b in zip(mine, theirs)) if len(mine) == len(theirs) else float("inf")
    if randomize:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for a, b in zip(mine, theirs):
                b.add_(0.1 * torch.randn(b.shape, generator=g))
                a.copy_(b)
    return w, pm, init


def _trainable(m) -> list[torch.Tensor]:
    # same construction order on both sides: embedding (then the projection's two Linears, weight then bias)
    return [p for p in m.parameters() if p.requires_grad]


def _batch(c: PCase, seed: int = 0, T: int = 7):
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randint(0, c.base.vocab, (2, T), generator=g)
    mask = torch.ones_like(x)
    if c.left_pad:
        mask[0, :3] = 0
    labels = x.masked_fill(mask == 0, -100)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1) if c.position_ids else None
    return x, mask, labels, pos


def measure(c: PCase, seed: int = 0) -> list[float]:
    """max |Δ| of logits, loss, the trainable tensors' gradients, and the same-seed initial tensors."""
    w, pm, init = pair(c, seed)
    x, mask, labels, pos = _batch(c, seed)
    kw = {} if pos is None else {"position_ids": pos}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Position ids are not supported ... Ignoring" for prompt tuning
        out_o = w(x, attention_mask=mask, labels=labels, **kw)
        out_r = pm(input_ids=x, attention_mask=mask, labels=labels, **kw)
    out_o.loss.backward()
    out_r.loss.backward()
    mine, theirs = _trainable(w), _trainable(pm)
    grads = max(_max_abs(a.grad, b.grad) for a, b in zip(mine, theirs))
    if out_o.logits.shape != out_r.logits.shape:
        return [float("inf")] * 4
    return [_max_abs(out_o.logits, out_r.logits), _max_abs(out_o.loss, out_r.loss), grads, init]


@st.composite
def cases(draw) -> PCase:
    heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([8, 16]))
    base = Case(model_type=draw(st.sampled_from(["llama", "qwen2", "qwen3"])), hidden=heads * head_dim, heads=heads,
                kv_heads=draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
                layers=draw(st.integers(1, 2)), vocab=draw(st.sampled_from([64, 97])), tie=draw(st.booleans()))
    kind = draw(st.sampled_from(["prompt", "prefix"]))
    return PCase(kind=kind, base=base, P=draw(st.integers(1, 5)),
                 init=draw(st.sampled_from(["RANDOM", "SAMPLE_VOCAB"])) if kind == "prompt" else "RANDOM",
                 projection=kind == "prefix" and draw(st.booleans()),
                 encoder_hidden=draw(st.sampled_from([None, 8, 24])), left_pad=draw(st.booleans()),
                 position_ids=draw(st.booleans()))


NAMED = {
    "prompt, TEXT init (bundled tokenizer)": PCase(kind="prompt", init="TEXT", P=9, base=Case(vocab=4096)),
    "prompt, SAMPLE_VOCAB, qwen3 tied": PCase(kind="prompt", init="SAMPLE_VOCAB",
                                              base=Case(model_type="qwen3", tie=True)),
    "prefix, no projection, GQA 4/2": PCase(kind="prefix"),
    "prefix, projection E=24, MQA, position_ids": PCase(kind="prefix", projection=True, encoder_hidden=24,
                                                        base=Case(kv_heads=1), position_ids=True),
}


# ---------------------------------------------------------------------------------------------------------
# generation (greedy, left padding) and files both ways after a few training steps


def peft_greedy(pm, x: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by peft's forward over the whole sequence at every step (no cache), positions as
    transformers' generate makes them (cumsum of the mask - 1, pads 0; peft adds P for prefix tuning and drops
    them for prompt tuning). The reference, since peft's own generate is unreliable here (module docstring)."""
    seq, m = x, mask
    for _ in range(n):
        pos = (m.long().cumsum(-1) - 1).masked_fill(m == 0, 0)
        nxt = pm(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1].argmax(-1)
        seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, m.new_ones(len(m), 1)], 1)
    return seq


def generation_delta(c: PCase, seed: int = 0) -> float:
    """Greedy tokens: minillm's cached generate vs peft_greedy; the count of differing tokens (0 when equal)."""
    w, pm, _ = pair(c, seed)
    x, mask, _, _ = _batch(c, seed)
    w.eval(), pm.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = w.generate(x, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
        ref = peft_greedy(pm, x, mask, 6)
    return 0.0 if torch.equal(ours, ref) else float((ours != ref).sum())


def _train(model, vocab: int, steps: int = 3, seed: int = 0) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    g = torch.Generator().manual_seed(seed + 3)
    for _ in range(steps):
        x = torch.randint(0, vocab, (2, 9), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def interop(c: PCase, direction: str, seed: int = 0) -> float:
    """Train on one side, save in peft's format, load on the other: logits and greedy tokens (as inf if different)."""
    import peft
    w, pm, _ = pair(c, seed, randomize=False)
    x, mask, _, _ = _batch(c, seed)
    fresh, ref = base_models(c.base, seed)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if direction == "minillm -> peft":
            before = [p.detach().clone() for p in _trainable(w)]
            _train(w, c.base.vocab, seed=seed)
            moved = max(_max_abs(a, b) for a, b in zip(before, _trainable(w)))
            peft_format.save_adapter(w, d)
            ours, theirs = w, peft.PeftModel.from_pretrained(ref, d).eval()
        else:
            before = [p.detach().clone() for p in _trainable(pm)]
            _train(pm, c.base.vocab, seed=seed)
            moved = max(_max_abs(a, b) for a, b in zip(before, _trainable(pm)))
            pm.save_pretrained(d)
            ours, theirs = peft_format.load_adapter(fresh, d).eval(), pm.eval()
        if moved < 1e-3:
            return float("inf")  # training did not move the adapter: the row would prove nothing
        with torch.no_grad():
            delta = _max_abs(ours(x, attention_mask=mask).logits, theirs(input_ids=x, attention_mask=mask).logits)
            g_o = ours.generate(x, max_new_tokens=5, attention_mask=mask, eos_token_id=[])
            g_r = peft_greedy(theirs, x, mask, 5)
    return delta if torch.equal(g_o, g_r) else float("inf")


def bf16_measure(c: PCase) -> float:
    """bf16 base model, fp32 prompt/prefix (cast at use, as peft): max |Δ| over logits, loss and grads."""
    w, pm, _ = pair(c)
    w.base_model.to(torch.bfloat16)
    pm.base_model.to(torch.bfloat16)
    x, mask, labels, _ = _batch(c)
    out_o, out_r = w(x, attention_mask=mask, labels=labels), pm(input_ids=x, attention_mask=mask, labels=labels)
    out_o.loss.backward()
    out_r.loss.backward()
    grads = max(_max_abs(a.grad, b.grad) for a, b in zip(_trainable(w), _trainable(pm)))
    return max(_max_abs(out_o.logits, out_r.logits), _max_abs(out_o.loss, out_r.loss), grads)


def same_line(ours, pm) -> float:
    """peft's print_trainable_parameters line vs minillm's: 0 when the same text."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pm.print_trainable_parameters()
    return 0.0 if buf.getvalue().strip() == trainable_summary(ours) else float("inf")


def trainable_line(c: PCase) -> float:
    return same_line(*pair(c, randomize=False)[:2])


def prefix_ckpt(c: PCase) -> float:
    """Prefix tuning under non-re-entrant activation checkpointing vs none: loss and grads, exact."""
    w, _, _ = pair(c, randomize=False)
    x, mask, labels, _ = _batch(c)
    w.train()
    results = []
    for mode in (None, False):  # re-entrant: refused (minillm/peft/prefix.py says why)
        if mode is not None:
            w.gradient_checkpointing_enable({"use_reentrant": mode})
        w.zero_grad(set_to_none=True)
        loss = w(x, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append([loss.detach(), *[p.grad for p in _trainable(w)]])
    if any(g is None for r in results for g in r):
        return float("inf")
    return max(_max_abs(a, b) for r in results[1:] for a, b in zip(results[0], r))


# ---------------------------------------------------------------------------------------------------------
# Houlsby adapters: the paper's equations, written out on the transformers model's weights


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):  # x (B, H, T, D), rotate_half layout
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    ang = pos[:, None].float() * inv[None]  # (T, D/2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
    return x * cos + rot * sin


def houlsby_reference(hf, adapters: dict, x: torch.Tensor, act) -> torch.Tensor:
    """Logits of a llama-type model with Houlsby adapters, from the equations:

        a = Attn(LN1(h)) W_o;   h = h + a + U_a f(D_a a + d_a) + u_a
        m = FFN(LN2(h));        h = h + m + U_m f(D_m m + d_m) + u_m

    `adapters[i] = ((D_a, d_a, U_a, u_a), (D_m, d_m, U_m, u_m))` as plain tensors; plain causal softmax
    attention (no padding), default RoPE. Independent of minillm.peft.houlsby's modules."""
    cfg = hf.config
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    B, T = x.shape
    h = hf.model.embed_tokens.weight[x]
    pos = torch.arange(T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def bottleneck(y, p):
        Dw, db, Uw, ub = p
        return y + act(y @ Dw.T + db) @ Uw.T + ub

    for i, layer in enumerate(hf.model.layers):
        at = layer.self_attn
        z = _rms(h, layer.input_layernorm.weight, cfg.rms_norm_eps)
        q = (z @ at.q_proj.weight.T + (at.q_proj.bias if at.q_proj.bias is not None else 0)).view(B, T, H, Dh)
        k = (z @ at.k_proj.weight.T + (at.k_proj.bias if at.k_proj.bias is not None else 0)).view(B, T, K, Dh)
        v = (z @ at.v_proj.weight.T + (at.v_proj.bias if at.v_proj.bias is not None else 0)).view(B, T, K, Dh)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = _rope(q, pos, cfg.rope_parameters["rope_theta"]), _rope(k, pos, cfg.rope_parameters["rope_theta"])
        k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
        s = (q @ k.transpose(-1, -2)) / Dh ** 0.5
        y = s.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # (B, H, T, Dh)
        a = y.transpose(1, 2).reshape(B, T, H * Dh) @ at.o_proj.weight.T
        h = h + bottleneck(a, adapters[i][0])
        z = _rms(h, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        mlp = layer.mlp
        m = (F.silu(z @ mlp.gate_proj.weight.T) * (z @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        h = h + bottleneck(m, adapters[i][1])
    h = _rms(h, hf.model.norm.weight, cfg.rms_norm_eps)
    return h @ hf.lm_head.weight.T


def houlsby_measure(seed: int, bottleneck: int, act: str, layers: int, kv: int, init: str) -> list[float]:
    """[minillm vs equations (trained-like random adapters), zero-init minillm vs the plain model]."""
    base = Case(layers=layers, kv_heads=kv, hidden=32, heads=4)
    ours, hf = base_models(base, seed)
    x = torch.randint(0, base.vocab, (2, 6), generator=torch.Generator().manual_seed(seed + 2))
    ours.eval()
    with torch.no_grad():
        plain = ours(x).logits
        ha.apply_adapters(ours, ha.HoulsbyConfig(bottleneck=bottleneck, non_linearity=act, init=init), verbose=False)
        identity = _max_abs(ours(x).logits, plain) if init == "zero" else 0.0
        g = torch.Generator().manual_seed(seed + 5)
        for p in (p for p in ours.parameters() if p.requires_grad):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        adapters = {}
        for i, layer in enumerate(ours.model.layers):
            pa, pm = layer.self_attn.o_proj.adapter, layer.mlp.down_proj.adapter
            adapters[i] = tuple(tuple(t.detach().clone() for t in (ad.down.weight, ad.down.bias, ad.up.weight,
                                                                   ad.up.bias)) for ad in (pa, pm))
        ref = houlsby_reference(hf, adapters, x, ha.ACTS[act])
        return [_max_abs(ours(x).logits, ref), identity]


_fixed = named_check


def rows(budget: float = 1.0):
    n = max(2, round(6 * budget))
    specs = [("prompt/prefix logits (drawn)", PEFT, "lora_logits"),
             ("prompt/prefix loss (drawn)", PEFT, "loss"),
             ("prompt/prefix grads of prompt/prefix", PEFT, "lora_grads"),
             ("prompt/prefix init: same seed", PEFT, "lora_init")]
    yield from property_rows(specs, cases(), measure, n)
    named = NAMED if budget >= 1 else dict(list(NAMED.items())[::3])
    t0 = time.perf_counter()
    results = {label: measure(c) for label, c in named.items()}
    for i, key in enumerate(("logits", "loss", "grads", "init")):
        row = fixed_check(f"prompt/prefix {key}: {len(named)} named", PEFT, ("lora_logits", "loss", "lora_grads",
                                                                            "lora_init")[i],
                          [r[i] for r in results.values()])
        row.seconds = (time.perf_counter() - t0) / 4
        yield row
    gen = {"prompt": PCase(kind="prompt"), "prefix": PCase(), "prefix + projection": PCase(projection=True)}
    if budget < 1:
        gen = dict(list(gen.items())[1:])
    yield _fixed("greedy generate, left padding, cached", "peft forward, step by step", "generate",
                 generation_delta, gen)
    files = {"prompt": PCase(kind="prompt"), "prefix + projection": PCase(projection=True)}
    for direction in ("minillm -> peft", "peft -> minillm"):
        yield _fixed(f"prompt/prefix files {direction}, trained", "peft from_pretrained / save_pretrained",
                     "lora_logits", lambda c, d=direction: interop(c, d), files)
    yield _fixed("prompt/prefix bf16 base: logits, loss, grads", PEFT + " bf16", "lowp_exact", bf16_measure,
                 {"prompt": PCase(kind="prompt"), "prefix proj": PCase(projection=True)})
    yield _fixed("trainable-params line == peft's", "print_trainable_parameters", "generate", trainable_line,
                 {"prompt": PCase(kind="prompt"), "prefix proj": PCase(projection=True)})
    yield _fixed("prefix: checkpointing == none", "minillm without checkpointing", "lora_ckpt", prefix_ckpt,
                 {"prefix proj": PCase(projection=True)})
    hspecs = [("houlsby adapter vs paper equations", "equations on transformers weights", "houlsby"),
              ("houlsby zero-init up: outputs unchanged", "the model without adapters", "houlsby_identity")]
    hcases = st.tuples(st.integers(0, 99), st.sampled_from([1, 4, 8]), st.sampled_from(sorted(ha.ACTS)),
                       st.integers(1, 2), st.sampled_from([1, 2, 4]), st.sampled_from(["zero", "houlsby"]))
    yield from property_rows(hspecs, hcases, lambda t: houlsby_measure(*t), max(2, round(4 * budget)))
    yield from ia3_rows(budget)
    yield from disable_rows(budget)


# ---------------------------------------------------------------------------------------------------------
# (IA)^3 vs peft's IA3Config / get_peft_model
#
# Both sides wrap their targets under the same seed (init_ia3_weights=False: the same torch.randn draws, so the
# same vectors; True: ones on both sides); the vectors are then perturbed on the peft side and copied over by
# name, and logits, loss, the gradient of every ia3_l, merge (in place and merge_and_unload: logits and every
# weight), unmerge (peft divides by l + 1e-8: the same ops, so the same rounding) and files both ways compared.
# Biases are random (qwen2's q/k/v, llama/qwen3 with attention_bias): an output scaling multiplies the bias too.

IA3_TARGETS = {
    "default": (None, None),  # peft's table for the model type, down_proj the feed-forward one
    "list": (["q_proj", "k_proj", "v_proj", "o_proj", "mlp.up_proj", "down_proj"], ["mlp.up_proj", "down_proj"]),
    "kv only": (["k_proj", "v_proj"], None),  # the default feed-forward (down_proj) is then no target
    "regex": (r".*\.(k_proj|v_proj|down_proj)", r".*\.down_proj"),
    "regex, ff list": (r".*layers\.0\..*_proj", ["gate_proj", "up_proj"]),
}


@dataclass(frozen=True)
class ICase:
    base: Case = Case()
    targets: str = "default"
    init_ones: bool = True
    bias: bool = False  # attention_bias (and llama's mlp_bias); qwen2 has q/k/v biases whatever this says


def ia3_base_models(c: ICase, seed: int = 0):
    """(minillm.CausalLM, transformers model) with identical weights, random biases where the model has them."""
    from minillm.config import ModelConfig
    from minillm.model import CausalLM
    from parity.model import hf_copy
    b = c.base
    cfg = ModelConfig(model_type=b.model_type, vocab_size=b.vocab, hidden_size=b.hidden, intermediate_size=b.inter,
                      num_hidden_layers=b.layers, num_attention_heads=b.heads, num_key_value_heads=b.kv_heads,
                      tie_word_embeddings=b.tie, attention_bias=c.bias and b.model_type != "qwen2",
                      mlp_bias=c.bias and b.model_type == "llama")
    torch.manual_seed(seed)
    ours = CausalLM(cfg, attn_implementation="eager", fused=False)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith(".bias"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return ours, hf_copy(ours, "eager")


def _ia3_configs(c: ICase):
    import peft
    from minillm.peft.ia3 import IA3Config
    t, f = IA3_TARGETS[c.targets]
    return (IA3Config(target_modules=t, feedforward_modules=f, init_ia3_weights=c.init_ones),
            peft.IA3Config(task_type="CAUSAL_LM", target_modules=t, feedforward_modules=f,
                           init_ia3_weights=c.init_ones))


def _ia3_params(m) -> dict[str, torch.Tensor]:
    """Every ia3_l by minillm's module name (peft's `base_model.model.X.ia3_l.default` is minillm's `X.ia3_l`)."""
    return {n.removeprefix("base_model.model.").removesuffix(".default"): p for n, p in m.named_parameters()
            if n.endswith(("ia3_l", "ia3_l.default"))}


def ia3_pair(c: ICase, seed: int = 0, randomize: bool = True):
    """(minillm model, peft model, init |Δ|): the same seed before each wrap; vectors perturbed and copied."""
    import peft
    ours, ref = ia3_base_models(c, seed)
    mine_cfg, peft_cfg = _ia3_configs(c)
    torch.manual_seed(seed + 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(ref, peft_cfg)
    torch.manual_seed(seed + 10)
    ours = peft_format.apply(ours, mine_cfg)
    mine, theirs = _ia3_params(ours), _ia3_params(pm)
    if list(mine) != list(theirs) or not mine:
        return ours, pm, float("inf")  # not the same layers, or not in the same order
    init = max(_d(mine[n], theirs[n]) for n in mine)  # inf for a vector of another shape
    if c.init_ones and any(not bool((p == 1).all()) for p in mine.values()):
        init = float("inf")
    if randomize and init < float("inf"):
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in theirs.items():
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
                mine[n].copy_(p)
    return ours, pm, init


def _d(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |Δ|, inf when the shapes differ (a broken side must fail its row, not crash the table)."""
    return _max_abs(a, b) if a.shape == b.shape else float("inf")


def _ia3_batch(c: ICase, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randint(0, c.base.vocab, (2, 7), generator=g)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    return x, mask, x.masked_fill(mask == 0, -100)


def _state_delta(a: dict, b: dict) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(_d(a[k], b[k]) for k in a)


def _base_weights(m) -> dict[str, torch.Tensor]:
    """The weights and biases of the wrapped layers, by minillm's names (what merge/unmerge change)."""
    out = {}
    for n, p in m.named_parameters():
        n = n.removeprefix("base_model.model.")
        if ".base_layer." in n:
            out[n.replace(".base_layer.", ".")] = p.detach().clone()
    return out


def ia3_measure(c: ICase, seed: int = 0) -> list[float]:
    """max |Δ| of [logits, loss, grads of every ia3_l, same-seed init, logits merged in place, weights after
    unmerge, merge_and_unload's weights, merged model's logits]."""
    ours, pm, init = ia3_pair(c, seed)
    x, mask, labels = _ia3_batch(c, seed)
    out_o = ours(x, attention_mask=mask, labels=labels)
    out_r = pm(input_ids=x, attention_mask=mask, labels=labels)
    out_o.loss.backward()
    out_r.loss.backward()
    mine, theirs = _ia3_params(ours), _ia3_params(pm)
    grads = max(_d(mine[n].grad, theirs[n].grad) for n in mine) if list(mine) == list(theirs) else float("inf")
    res = [_d(out_o.logits, out_r.logits), _d(out_o.loss, out_r.loss), grads, init]
    from minillm.peft.ia3 import ia3_layers
    layers = ia3_layers(ours)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Unmerge result can be inaccurate for (IA)^3."
        for layer in layers.values():
            layer.merge()
        pm.merge_adapter()
        res.append(_d(ours(x, attention_mask=mask).logits, pm(input_ids=x, attention_mask=mask).logits))
        for layer in layers.values():
            layer.unmerge()
        pm.unmerge_adapter()
        res.append(_state_delta(_base_weights(ours), _base_weights(pm)))
        merged_o = peft_format.merge_and_unload(ours)
        merged_r = pm.merge_and_unload()
        res.append(_state_delta(merged_o.state_dict(), merged_r.state_dict()))
        res.append(_d(merged_o(x, attention_mask=mask).logits, merged_r(input_ids=x, attention_mask=mask).logits))
    return res


@st.composite
def ia3_cases(draw) -> ICase:
    heads = draw(st.sampled_from([2, 4]))
    base = Case(model_type=draw(st.sampled_from(["llama", "qwen2", "qwen3"])), hidden=heads * 8, heads=heads,
                kv_heads=draw(st.sampled_from([k for k in (1, 2) if heads % k == 0])), layers=draw(st.integers(1, 2)),
                vocab=draw(st.sampled_from([64, 97])), tie=draw(st.booleans()))
    return ICase(base=base, targets=draw(st.sampled_from(sorted(IA3_TARGETS))), init_ones=draw(st.booleans()),
                 bias=draw(st.booleans()))


IA3_NAMED = {
    "llama default, biases, random init": ICase(init_ones=False, bias=True),
    "qwen2 default (q/k/v biases scaled)": ICase(base=Case(model_type="qwen2")),
    "qwen3 regex, tied": ICase(base=Case(model_type="qwen3", tie=True), targets="regex", bias=True),
    "llama kv only (default ff no target)": ICase(targets="kv only", init_ones=False),
}


def ia3_interop(c: ICase, direction: str, seed: int = 0) -> float:
    """Train (IA)^3 on one side, save, load on the other: logits of the loaded adapter vs the trained one
    (inf if training did not move the vectors, or greedy tokens differ)."""
    import peft
    ours, pm, _ = ia3_pair(c, seed, randomize=False)
    x, mask, _ = _ia3_batch(c, seed)
    fresh, ref = ia3_base_models(c, seed)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = ours if direction == "minillm -> peft" else pm
        before = {n: p.detach().clone() for n, p in _ia3_params(trained).items()}
        _train(trained, c.base.vocab, seed=seed)
        moved = max(_d(before[n], p) for n, p in _ia3_params(trained).items())
        try:
            if direction == "minillm -> peft":
                peft_format.save_adapter(ours, d)
                loaded, trained = peft.PeftModel.from_pretrained(ref, d).eval(), ours
            else:
                pm.save_pretrained(d)
                loaded, trained = peft_format.load_adapter(fresh, d).eval(), pm
        except (RuntimeError, ValueError):  # the other side refuses the file (another shape, a setting)
            return float("inf")
        if moved < 1e-3:
            return float("inf")
        with torch.no_grad():
            a, b = loaded(input_ids=x, attention_mask=mask).logits, trained(input_ids=x, attention_mask=mask).logits
            vectors = _state_delta({n: p for n, p in _ia3_params(loaded).items()},
                                   {n: p for n, p in _ia3_params(trained).items()})
    return max(_d(a, b), vectors)


def ia3_trainable_line(c: ICase) -> float:
    return same_line(*ia3_pair(c, randomize=False)[:2])


# ---------------------------------------------------------------------------------------------------------
# switching off: minillm.peft.disable_adapter vs peft's `with pm.disable_adapter():` and the base model


def _out(m, x, mask, labels, peft_side: bool = False):
    out = m(input_ids=x, attention_mask=mask, labels=labels) if peft_side else m(x, attention_mask=mask, labels=labels)
    return out.logits.detach(), out.loss.detach()


def disable_delta(ours, pm, plain, x, mask, labels) -> float:
    """max |Δ| over: minillm switched off vs peft switched off (logits, loss), vs the base model, and minillm
    after the block vs before it. inf if the adapter changes nothing (the row would prove nothing) or is still
    off after the block."""
    ours.eval(), pm.eval(), plain.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = _out(ours, x, mask, labels)
        with peft_format.disable_adapter(ours) as m:
            off = _out(m, x, mask, labels)
        after = _out(ours, x, mask, labels)
        with pm.disable_adapter():
            ref = _out(pm, x, mask, labels, peft_side=True)
        base = _out(plain, x, mask, labels)
    T = x.shape[1]  # prompt tuning: switched on, the logits also cover its virtual tokens
    if _d(before[0][:, -T:], off[0]) < 1e-4:
        return float("inf")
    return max(_d(a, b) for want in (ref, base) for a, b in zip(off, want)) + \
        max(_d(a, b) for a, b in zip(after, before))


def disable_lora(case: Case, seed: int = 0) -> float:
    from parity.lora import lora_pair
    ours, pm = lora_pair(case, seed)
    plain, _ = base_models(case, seed)
    x, mask, labels, _ = _batch(PCase(base=case), seed)
    return disable_delta(ours, pm, plain, x, mask, labels)


def disable_prompt_prefix(c: PCase, seed: int = 0) -> float:
    w, pm, _ = pair(c, seed)
    plain, _ = base_models(c.base, seed)
    x, mask, labels, _ = _batch(c, seed)
    return disable_delta(w, pm, plain, x, mask, labels)


def disable_ia3(c: ICase, seed: int = 0) -> float:
    ours, pm, _ = ia3_pair(c, seed)
    plain, _ = ia3_base_models(c, seed)
    x, mask, labels = _ia3_batch(c, seed)
    return disable_delta(ours, pm, plain, x, mask, labels)


def disable_houlsby(seed: int = 0) -> float:
    """Houlsby (peft has none): switched off == the plain model exactly, and back on after the block."""
    base = Case(layers=2, kv_heads=2, hidden=32, heads=4)
    ours, _ = base_models(base, seed)
    plain, _ = base_models(base, seed)
    ours = peft_format.apply(ours, ha.HoulsbyConfig(bottleneck=4, init="houlsby"))
    randomize_trainable(ours, seed)
    x, mask, labels, _ = _batch(PCase(base=base), seed)
    ours.eval(), plain.eval()
    with torch.no_grad():
        before = _out(ours, x, mask, labels)
        with peft_format.disable_adapter(ours):
            off = _out(ours, x, mask, labels)
        after = _out(ours, x, mask, labels)
        base_out = _out(plain, x, mask, labels)
    if _d(before[0], off[0]) < 1e-4:
        return float("inf")
    return max(_d(a, b) for pair_ in ((off, base_out), (after, before)) for a, b in zip(*pair_))


def randomize_trainable(model, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


DISABLE_LORA = {"lora q/v": Case(), "lora DoRA": Case(dora=True, targets="attn"),
                "lora on embed_tokens, tied": Case(targets="qv+embed_tokens", tie=True)}
DISABLE_PROMPT = {"prompt": PCase(kind="prompt"), "prefix + projection": PCase(projection=True)}
DISABLE_IA3 = {"ia3 qwen2 biases": ICase(base=Case(model_type="qwen2")), "ia3 llama list": ICase(targets="list")}


def ia3_rows(budget: float = 1.0):
    n = max(2, round(4 * budget))
    specs = [("ia3 logits (drawn)", "peft IA3", "ia3_exact"),
             ("ia3 loss (drawn)", "peft IA3", "ia3_exact"),
             ("ia3 grads of every ia3_l", "peft IA3", "ia3_exact"),
             ("ia3 init: same seed -> same vectors", "peft IA3", "lora_init"),
             ("ia3 merged in place: logits", "peft merge_adapter", "ia3_exact"),
             ("ia3 unmerge (/(l+1e-8)): weights", "peft unmerge_adapter", "ia3_exact"),
             ("ia3 merge_and_unload: weights", "peft merge_and_unload", "ia3_exact"),
             ("ia3 merge_and_unload: logits", "peft merge_and_unload", "ia3_exact")]
    yield from property_rows(specs, ia3_cases(), ia3_measure, n)
    if selected("ia3 named"):
        t0 = time.perf_counter()
        results = [ia3_measure(c) for c in IA3_NAMED.values()]
        yield fixed_check(f"ia3 named: {len(IA3_NAMED)} cases, all of the above", "peft IA3", "ia3_exact",
                          [max(r[:3] + r[4:]) for r in results] + [r[3] for r in results], t0=t0)
    files = {"llama default, biases": ICase(bias=True), "qwen2 regex": ICase(base=Case(model_type="qwen2"),
                                                                            targets="regex")}
    # peft saves target_modules=[k_proj, v_proj] with its default feedforward_modules=[down_proj], a file it then
    # refuses to load ("should be a subset"); minillm loads it (peft -> minillm only)
    back = {**files, "llama kv only": ICase(targets="kv only")}
    for direction, named in (("minillm -> peft", files), ("peft -> minillm", back)):
        if selected(f"ia3 files {direction}"):
            yield _fixed(f"ia3 files {direction}, trained", "peft from_pretrained / save_pretrained", "ia3_exact",
                         lambda c, d=direction: ia3_interop(c, d), named)
    if selected("ia3 trainable-params line"):
        yield _fixed("ia3 trainable-params line == peft's", "print_trainable_parameters", "generate",
                     ia3_trainable_line, {"llama default": ICase(), "qwen3 list, tied": ICase(
                         base=Case(model_type="qwen3", tie=True), targets="list")})


def disable_rows(budget: float = 1.0):
    ref = "peft disable_adapter() and the base model"
    if selected("disable_adapter: lora"):
        yield _fixed("disable_adapter: lora, DoRA, embedding", ref, "ia3_exact", disable_lora, DISABLE_LORA)
    if selected("disable_adapter: prompt/prefix"):
        yield _fixed("disable_adapter: prompt/prefix", ref, "ia3_exact", disable_prompt_prefix, DISABLE_PROMPT)
    if selected("disable_adapter: ia3"):
        yield _fixed("disable_adapter: ia3", ref, "ia3_exact", disable_ia3, DISABLE_IA3)
    if selected("disable_adapter: houlsby"):
        yield _fixed("disable_adapter: houlsby == base model", "the model without adapters", "houlsby_identity",
                     lambda s: disable_houlsby(s), {"houlsby init, perturbed": 0})

"""LoRA and DoRA by hand, interchangeable with peft 0.21 in both directions.

LoRA freezes a Linear's weight W (out, in) and learns a low-rank update: y = W x + B A dropout(x) * s,
A (r, in) kaiming-uniform(a=sqrt(5)), B (out, r) zeros, s = alpha / r (alpha / sqrt(r) with rsLoRA).
DoRA also learns a magnitude vector m (one value per output row) and rescales each row of W + s B A
to norm m.

What is unusual here:
- The module tree mirrors peft's, minus the adapter name: a wrapped `q_proj` holds `base_layer`,
  `lora_A`, `lora_B`, `lora_dropout` (and `lora_magnitude_vector` for DoRA), so a state-dict key
  `model.layers.0.self_attn.q_proj.lora_A.weight` is peft's saved key without its
  `base_model.model.` prefix. Saving and loading adapters is a prefix change, no renaming table.
- `apply_lora` creates the adapters in the same order, consuming the random generator exactly as
  peft does, so the same seed gives the same A matrices as `peft.get_peft_model`.
- `modules_to_save` (e.g. lm_head, embed_tokens) are trained in place. peft keeps a frozen copy of
  the original module next to the trained one (`original_module` / `modules_to_save.default`);
  minillm does not, so peft's "all params" count is larger by those modules' size. A parameter that
  is tied to another module (tied embeddings) is cloned first, so training lm_head does not move
  embed_tokens: the same as peft, whose trained copy is untied as well.
- LoRA on a tied lm_head (its weight is embed_tokens'): the adapter changes lm_head only, as in peft.
  peft 0.21 then merges into the shared weight, moving the input embedding as well (merged logits
  differ from unmerged ones; it warns and advises untying first). minillm unties at merge time (a
  copy of the weight for lm_head, `config.tie_word_embeddings = False`), so merged == unmerged.
  peft's `ensure_weight_tying` (a LoRA on the embedding tied to lm_head's) is not implemented.
- LoRA on nn.Embedding (`target_modules` naming embed_tokens): `LoRAEmbedding`, peft's `lora.Embedding`
  (`lora_embedding_A` (r, vocab) = 0, `lora_embedding_B` (dim, r) ~ N(0, 1), no dropout); as peft's
  `save_embedding_layers="auto"`, a targeted embedding's base table is saved with the adapter.
- bias="none" only (peft's default); other peft options (rank_pattern, layers_to_transform, ...)
  are refused with an error when found in a saved adapter rather than silently ignored, and every
  key of adapter_config.json is type-checked (an error names the file and the key).

Training: a LoRA'd model trains under the HF Trainer as is (only adapter parameters require grad;
`Trainer.save_model` writes the whole state dict, base_layer and lora_* keys; `save_adapter` writes the
small peft-format adapter). Activation checkpointing, re-entrant or not, works with the embedding
frozen: `enable_input_require_grads` is hooked in by CausalLM.activation_checkpointing_enable (as
transformers does) and by apply_lora on a model already checkpointing (as peft does).

Saving and loading go through minillm/peft/methods.py (`save_adapter`, `load_adapter`); `LoRA` at the end of this
file is what it calls: the config as peft writes it, the tensors under peft's keys, switching off, merging.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from minillm.model import enable_input_require_grads, trainable_summary
from minillm.peft.base import PEFT_PREFIX, check_tensors, copy_into, is_target

ALL_LINEAR = "all-linear"
DEFAULT_TARGETS = ["q_proj", "v_proj"]  # peft's default for llama, qwen2 and qwen3


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true/false arrive as bool, a subclass of int


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


@dataclass
class LoraConfig:
    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    # list: a module whose full name equals an entry or ends with "." + entry (peft's rule);
    # str: re.fullmatch against the full module name; "all-linear": every nn.Linear but the output layer.
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None  # trained in full and saved with the adapter (name suffix match)
    use_dora: bool = False

    def __post_init__(self) -> None:
        # every value is checked here, once: the layers, the file loader and the training flags build a LoraConfig
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        # NaN would train to all-NaN, 0 would train nothing (the update is scaled by alpha / r)
        if not _is_real(self.lora_alpha) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if not _is_real(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise ValueError(f"LoraConfig.bias={self.bias!r}: minillm supports only bias='none' (peft's default)")
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoraConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.target_modules is None:
            self.target_modules = list(DEFAULT_TARGETS)
        elif isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if not (isinstance(self.target_modules, str) or _is_str_list(self.target_modules)):
            raise ValueError(f"LoraConfig.target_modules must be a string (regex or 'all-linear') or a list of "
                             f"module names, got {self.target_modules!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("LoraConfig.target_modules is an empty list: nothing to adapt")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"LoraConfig.target_modules={self.target_modules!r} is not a valid regex: {e}") from None
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if self.modules_to_save is not None and not _is_str_list(self.modules_to_save):
            raise ValueError(f"LoraConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (and DoRA magnitude), peft's `lora.Linear`."""

    def __init__(self, base_layer: nn.Linear, config: LoraConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        r, self.r, self.lora_alpha, self.use_dora = config.r, config.r, config.lora_alpha, config.use_dora
        self.scaling = config.scaling
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0.0 else nn.Identity()
        # Adapters live in fp32 next to a bf16/fp16 base (peft's autocast_adapter_dtype), on its device.
        w = base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        # Same construction order as peft: both nn.Linear constructors draw their default init from the
        # random generator, then A is drawn again and B zeroed. Keeping the draws identical means the same
        # seed gives peft's A.
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(device=w.device, dtype=dtype)
        self.lora_B.to(device=w.device, dtype=dtype)
        self.merged = False  # True while B A s (or DoRA's rescaling) is folded into base_layer.weight
        self.disabled = False  # switched off (LoRA.set_enabled): the base layer's output exactly
        # Set by apply_lora when base_layer.weight is shared with another module (a tied lm_head): merge() first
        # gives the layer its own copy, so that folding the update in does not move the input embedding too.
        self.untie_on_merge = False
        self._dora_norm: torch.Tensor | None = None  # DoRA: row norms used by merge(), needed by unmerge()
        if self.use_dora:
            with torch.no_grad():
                lora_weight = self.lora_B.weight @ self.lora_A.weight
                norm = self._weight_norm(w.to(dtype), lora_weight, self.scaling)
            self.lora_magnitude_vector = nn.Parameter(norm)  # (out,), = ||W|| row-wise at init (B = 0)
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)

    @staticmethod
    def _weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
        # L2 norm of each output row of W + s * B A (peft's DoraLinearLayer.get_weight_norm)
        return torch.linalg.norm(weight + scaling * lora_weight, dim=1).to(weight.dtype)

    @property
    def weight(self) -> torch.Tensor:
        # the frozen base weight, as peft's tuner layers expose it (e.g. CausalLM.num_parameters reads lm_head.weight)
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """B A s, shape (out, in): what merge() adds to the base weight for plain LoRA."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        result_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        if not self.use_dora:
            result = result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        else:
            result = result + self._dora_delta(x, result)
        return result.to(result_dtype)

    def _dora_delta(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # peft's DoraLinearLayer.forward, op for op. B A is formed as B(A(I)).T (peft avoids a weight
        # matmul for FSDP); the row norm is detached (DoRA paper, section 4.3: no gradient through it).
        eye = torch.eye(self.in_features, device=x.device, dtype=x.dtype)
        lora_weight = self.lora_B(self.lora_A(eye)).T.to(x.dtype)  # (out, in)
        weight = self.base_layer.weight.to(x.dtype)
        norm = self._weight_norm(weight, lora_weight.detach(), self.scaling).detach()
        mag_norm_scale = (self.lora_magnitude_vector / norm).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result = result  # W x + b, reused: subtract the bias below
            bias = self.base_layer.bias
            if bias is not None:
                base_result = base_result - bias
        else:
            # with dropout active the low-rank path and the rescaled base both see dropout(x)
            x = self.lora_dropout(x)
            base_result = F.linear(x, weight)
        lora_result = self.lora_B(self.lora_A(x))
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into base_layer.weight. Idempotent: merging a merged layer does nothing."""
        if self.merged:
            return
        if self.untie_on_merge:
            # peft 0.21 merges into the shared tensor (and warns): the embedding then moves as well and the merged
            # model differs from the unmerged one. peft's warning advises untying first; this is that.
            self.base_layer.weight = nn.Parameter(self.base_layer.weight.detach().clone(), requires_grad=False)
            self.untie_on_merge = False
        weight = self.base_layer.weight
        delta = self.delta_weight()
        if not self.use_dora:
            weight.data += delta.to(weight.dtype)
        else:
            # row norm of the *unmerged* W + ΔW, kept for unmerge (it cannot be recomputed from the merged W)
            norm = self._weight_norm(weight.data, delta, 1.0).detach()
            self._dora_norm = norm
            factor = (self.lora_magnitude_vector / norm).view(-1, 1)
            weight.data = (factor * (weight.data + delta)).to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of base_layer.weight. Idempotent."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        delta = self.delta_weight()
        if not self.use_dora:
            weight.data -= delta.to(weight.dtype)
        else:
            factor = (self.lora_magnitude_vector / self._dora_norm).view(-1, 1)
            weight.data = (weight.data / factor - delta).to(weight.dtype)
            self._dora_norm = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"use_dora={self.use_dora}, merged={self.merged}")


class LoRAEmbedding(nn.Module):
    """A frozen nn.Embedding plus a trainable low-rank update: peft's `lora.Embedding`.

    y = E[x] + (A^T[x] @ B^T) * s with A (r, num_embeddings), B (embedding_dim, r), peft's
    `lora_embedding_A/B` layout. The init is the transpose of Linear's: A = 0, B ~ N(0, 1) (a lookup of
    A's zero columns makes the update zero at init). As in peft, lora_dropout is not applied (there is
    no input vector to drop out, only an index) and the lookup of A honours padding_idx (the pad
    token's column of A receives no gradient).
    """

    def __init__(self, base_layer: nn.Embedding, config: LoraConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        if config.use_dora:
            raise ValueError("use_dora on an embedding (DoRA's embedding variant) is not implemented in minillm")
        self.base_layer = base_layer
        r, self.r, self.lora_alpha, self.use_dora = config.r, config.r, config.lora_alpha, False
        self.scaling = config.scaling
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        w = base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        # peft draws randn for A then B, then zeroes A and redraws B: the same four RNG uses, same seed -> same B
        self.lora_embedding_A = nn.Parameter(torch.randn((r, self.in_features)))
        self.lora_embedding_B = nn.Parameter(torch.randn((self.out_features, r)))
        with torch.no_grad():
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
            self.lora_embedding_A.data = self.lora_embedding_A.data.to(device=w.device, dtype=dtype)
            self.lora_embedding_B.data = self.lora_embedding_B.data.to(device=w.device, dtype=dtype)
        self.merged = False
        self.disabled = False
        self.untie_on_merge = False  # set by apply_lora when the weight is shared with lm_head (tied embeddings)
        base_layer.weight.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        # the frozen table, as peft's tuner layers expose it (code that reads `embed_tokens.weight` keeps working)
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """(B A)^T s, shape (num_embeddings, embedding_dim): what merge() adds to the embedding table."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (B, T, C)
        if self.merged or self.disabled:
            return result
        base = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                              sparse=base.sparse)  # (B, T, r)
        return (result + (after_a @ self.lora_embedding_B.T) * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.untie_on_merge:  # see LoRALinear.merge: lm_head keeps the untouched table
            self.base_layer.weight = nn.Parameter(self.base_layer.weight.detach().clone(), requires_grad=False)
            self.untie_on_merge = False
        w = self.base_layer.weight
        w.data += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.data -= self.delta_weight().to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"


LORA_MODULES = (LoRALinear, LoRAEmbedding)


# ---------------------------------------------------------------------------------------------------------
# Matching target modules (peft's check_target_module_exists, minus the options minillm does not support)


def _matches_modules_to_save(name: str, modules_to_save: list[str] | None) -> bool:
    # peft excludes these from LoRA targeting with this exact pattern
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def _output_layer_names(model: nn.Module) -> set[str]:
    # "all-linear" leaves out the output layer: whatever get_output_embeddings() returns, and lm_head
    out = getattr(model, "get_output_embeddings", None)
    out = out() if callable(out) else None
    names = {n for n, m in model.named_modules() if out is not None and m is out}
    return names | {n for n, _ in model.named_modules() if n == "lm_head" or n.endswith(".lm_head")}


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules `config` adapts, in `named_modules()` order (peft's order)."""
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        skip = _output_layer_names(model)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]
    else:
        names = [n for n, _ in model.named_modules() if n and is_target(n, targets)]
    names = [n for n in names if not _matches_modules_to_save(n, config.modules_to_save)]
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"LoRA target_modules={targets!r} matched no module of {type(model).__name__} "
            f"(modules_to_save={config.modules_to_save!r} are excluded). Linear modules that exist: "
            f"{linears[:6]}{' ...' if len(linears) > 6 else ''}")
    return names


def _holders(model: nn.Module, param: nn.Parameter, outside: str) -> list[str]:
    """Modules other than `outside` (and its children) that hold `param` itself: tied weights."""
    return [n for n, m in model.named_modules() if n != outside and not n.startswith(outside + ".")
            and any(q is param for q in m.parameters(recurse=False))]


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


# ---------------------------------------------------------------------------------------------------------
# Applying, merging, counting


def lora_layers(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_MODULES)}


def apply_lora(model: nn.Module, config: LoraConfig, verbose: bool = True) -> nn.Module:
    """Wrap the matched nn.Linear modules of `model` in LoRALinear, in place; freeze everything else.

    `modules_to_save` stay trainable in full. Returns `model` (with `model.lora_config` set) and prints
    peft's `trainable params: X || all params: Y || trainable%: Z` line when `verbose`.
    """
    if lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA layers; apply_lora once per model")
    names = find_targets(model, config)
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(modules[name], (nn.Linear, nn.Embedding)):
            raise ValueError(f"LoRA target {name!r} is a {type(modules[name]).__name__}; minillm adapts nn.Linear "
                             f"and nn.Embedding only (target_modules={config.target_modules!r})")
        if isinstance(modules[name], nn.Embedding) and config.use_dora:
            raise ValueError(f"LoRA target {name!r} is an nn.Embedding: use_dora on embeddings is not implemented")
    if config.modules_to_save and not _modules_to_save(model, config.modules_to_save):
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module of {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:  # named_modules() order, as peft: the same random draws for the same seed
        parent, child = _split(name)
        base = modules[name]
        tied = _holders(model, base.weight, name)
        cls = LoRAEmbedding if isinstance(base, nn.Embedding) else LoRALinear
        layer = cls(base, config)
        if tied:  # peft warns here too ("a tied layer is part of the adapter")
            warnings.warn(f"LoRA target {name!r} shares its weight with {tied} (tied embeddings): the adapter changes "
                          f"only {name!r}, and merging gives {name!r} its own copy of the weight first so that "
                          f"{tied} do not move (peft merges into the shared weight instead)", stacklevel=2)
            layer.untie_on_merge = True
        setattr(modules[parent] if parent else model, child, layer)
    _make_modules_to_save_trainable(model, config.modules_to_save)
    model.peft_config = config
    if getattr(model, "gradient_checkpointing", False):
        enable_input_require_grads(model)  # as peft.get_peft_model does on a model that already checkpoints
    if verbose:
        print(trainable_summary(model))
    return model


def _modules_to_save(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    # peft's rule for modules_to_save: the full name ends with the entry (no dot required)
    if not modules_to_save:
        return []
    return [n for n, _ in model.named_modules() if n and any(n.endswith(m) for m in modules_to_save)]


def _make_modules_to_save_trainable(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    names = _modules_to_save(model, modules_to_save)
    modules = dict(model.named_modules())
    untied = False
    for name in names:
        module = modules[name]
        for pname, p in list(module.named_parameters(recurse=False)):
            # a weight shared with another module (tied embeddings) gets its own copy, as peft's does
            if _holders(model, p, name):
                setattr(module, pname, nn.Parameter(p.detach().clone()))
                untied = True
        for p in module.parameters():
            p.requires_grad_(True)
    config = getattr(model, "config", None)
    if untied and getattr(config, "tie_word_embeddings", False):
        # the checkpoint must now store lm_head.weight itself, or save_pretrained would drop the trained copy
        config.tie_word_embeddings = False
    return names


def _untie_config(model: nn.Module, layers: dict[str, LoRALinear]) -> None:
    # call before merging: a layer about to get its own copy of a tied weight unties the checkpoint format too,
    # or save_pretrained would drop the merged lm_head.weight and the reload would tie it back to the embedding
    untied = [n for n, layer in layers.items() if layer.untie_on_merge and not layer.merged]
    config = getattr(model, "config", None)
    if untied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        other = "output layer" if all(n.endswith("embed_tokens") for n in untied) else "input embedding"
        warnings.warn(f"merging LoRA into tied {untied}: untied from the {other}, "
                      f"config.tie_word_embeddings set to False", stacklevel=3)


def merge_lora(model: nn.Module) -> nn.Module:
    layers = lora_layers(model)
    _untie_config(model, layers)
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain nn.Linear back: the result is the original model class.

    requires_grad is left as LoRA set it (as peft does); `modules_to_save` keep their trained weights.
    """
    layers = lora_layers(model)
    _untie_config(model, layers)
    for name, layer in layers.items():
        layer.merge()
        parent, child = _split(name)
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    model.__dict__.pop("peft_config", None)
    return model


# ---------------------------------------------------------------------------------------------------------
# Saving and loading in peft's format


# Saved-config keys whose value minillm cannot honour unless it is the default (peft's name: default).
_PEFT_DEFAULTS_REQUIRED: dict[str, Any] = {
    "fan_in_fan_out": False, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
    "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None, "layer_replication": None,
    "trainable_token_indices": None, "target_parameters": None, "use_qalora": False, "use_bdlora": None,
    "alora_invocation_tokens": None, "arrow_config": None, "velora_config": None, "monteclora_config": None,
    "kasa_config": None, "megatron_config": None,
}


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft: a targeted one also has its base weight saved


# The type each key of adapter_config.json must have (JSON null is accepted where peft's default is None).
_CONFIG_TYPES: dict[str, tuple[str, Any]] = {
    "peft_type": ("the string \"LORA\"", lambda v: v == "LORA"),
    "r": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "lora_alpha": ("a finite number", lambda v: _is_real(v) and math.isfinite(v)),
    "lora_dropout": ("a number in [0, 1)", lambda v: _is_real(v) and 0.0 <= v < 1.0),
    "target_modules": ("a string or a list of strings", lambda v: isinstance(v, str) or _is_str_list(v)),
    "modules_to_save": ("null or a list of strings", lambda v: v is None or _is_str_list(v)),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "bias": ("\"none\" (the only bias mode minillm implements)", lambda v: v == "none"),
    "init_lora_weights": ("true, false or \"gaussian\" (the others change the base weights)",
                          lambda v: isinstance(v, bool) or v == "gaussian"),
    "task_type": ("null or a string", lambda v: v is None or isinstance(v, str)),
    "base_model_name_or_path": ("null or a string", lambda v: v is None or isinstance(v, str)),
    # peft 0.21 ties a LoRA on lm_head to one on embed_tokens with this; minillm does not implement that tie
    "ensure_weight_tying": ("false", lambda v: v is False),
}


class LoRA:
    """LoRA (and rsLoRA, DoRA) behind the one interface of minillm/peft/base.py."""

    peft_type, name, config_class = "LORA", "lora", LoraConfig
    title, can_merge = "LoRA adapter", True
    adapter_restores_training = True

    def apply(self, model: nn.Module, config: LoraConfig) -> nn.Module:
        return apply_lora(model, config, verbose=False)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """peft's key -> the live parameter: lora_A/B, DoRA magnitudes, modules_to_save, and the base weight of a
        targeted embedding or lm_head (peft saves those too: save_embedding_layers="auto").

        Under ZeRO-3 these parameters are partitioned (numel 0): gather them around the save, or pass a
        consolidated `state_dict` to minillm.peft.save_adapter."""
        config: LoraConfig = model.peft_config
        state: dict[str, torch.Tensor] = {}
        for name, layer in lora_layers(model).items():
            if isinstance(layer, LoRAEmbedding):  # peft: lora_embedding_A.default -> lora_embedding_A
                state[f"{PEFT_PREFIX}{name}.lora_embedding_A"] = layer.lora_embedding_A
                state[f"{PEFT_PREFIX}{name}.lora_embedding_B"] = layer.lora_embedding_B
                state[f"{PEFT_PREFIX}{name}.base_layer.weight"] = layer.base_layer.weight
                continue
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
            if layer.use_dora:
                state[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
            if name.rpartition(".")[2] in EMBEDDING_LAYER_NAMES:
                state[f"{PEFT_PREFIX}{name}.base_layer.weight"] = layer.base_layer.weight
        if config.modules_to_save:
            modules = dict(model.named_modules())
            for name in _modules_to_save(model, config.modules_to_save):
                for pname, p in modules[name].named_parameters():
                    state[f"{PEFT_PREFIX}{name}.{pname}"] = p  # peft saves them under the module's own name
        return state

    def config_dict(self, model: nn.Module) -> dict[str, Any]:
        config: LoraConfig = model.peft_config
        layers = lora_layers(model)
        if any(layer.merged for layer in layers.values()):
            raise ValueError("save_adapter on a merged model: call unmerge_lora first (the saved A/B would be fine, "
                             "but a merged base would then get the update twice when loaded)")
        targets = config.target_modules
        if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
            targets = sorted(layers)  # peft saves "all-linear" expanded to the full module names
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "revision": None, "inference_mode": True,
                "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                "target_modules": targets, "bias": config.bias, "use_rslora": config.use_rslora,
                "use_dora": config.use_dora, "modules_to_save": config.modules_to_save, "init_lora_weights": True,
                **_PEFT_DEFAULTS_REQUIRED}

    def config_from_dict(self, d: dict[str, Any], model: nn.Module) -> LoraConfig:
        """Every key type-checked (`_CONFIG_TYPES`); a peft option minillm does not implement is refused."""
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in d:
                raise ValueError(f"missing key {key!r}")
        for key, (want, ok) in _CONFIG_TYPES.items():
            if key in d and not ok(d[key]):
                raise ValueError(f"key {key!r} must be {want}, got {d[key]!r}")
        for key, default in _PEFT_DEFAULTS_REQUIRED.items():
            if d.get(key, default) not in (default, None, {}, False):
                raise ValueError(f"key {key!r}={d[key]!r} is not supported by minillm.peft.lora (only {default!r})")
        return LoraConfig(r=d["r"], lora_alpha=d["lora_alpha"], lora_dropout=d.get("lora_dropout", 0.0),
                            target_modules=d["target_modules"], use_rslora=d.get("use_rslora", False),
                            bias=d.get("bias", "none"), modules_to_save=d.get("modules_to_save"),
                            use_dora=d.get("use_dora", False))
        return config

    def load(self, model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], path: str) -> nn.Module:
        """Apply LoRA per the saved config (unless the model has it already: a resume), then copy. Every tensor in
        the file must find its place and every adapter weight of the model must be in the file."""
        if lora_layers(model):
            have: LoraConfig = model.peft_config
            for f in ("r", "lora_alpha", "use_rslora", "use_dora"):
                if getattr(have, f) != getattr(config, f):
                    raise ValueError(f"{path}: adapter has {f}={getattr(config, f)!r} but the model's LoRA has "
                                     f"{f}={getattr(have, f)!r}")
        else:
            # Before apply_lora allocates anything: every module the file names exists, and each A has r rows (a
            # config whose r disagrees with its own file, e.g. r = 2**31, is refused, not allocated).
            names = {n for n, _ in model.named_modules()}
            for key, value in tensors.items():
                module, lora, rest = key.removeprefix(PEFT_PREFIX).partition(".lora_")
                if lora and module not in names:
                    raise ValueError(f"{path}: key {key!r} is for module {module!r}, which "
                                     f"{type(model).__name__} does not have")
                r_axis = 0 if rest == "A.weight" else 1 if rest in ("B.weight", "embedding_B") else None
                if r_axis is not None and (value.dim() != 2 or value.shape[r_axis] != config.r):
                    raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, which does not fit r={config.r}")
            apply_lora(model, config, verbose=False)
        expected = self.state_dict(model)
        # peft saves a targeted lm_head's base weight, older adapters may not have it: optional on load
        check_tensors(expected, tensors, path, optional=(".base_layer.weight",))
        copy_into(expected, tensors)
        for name, layer in lora_layers(model).items():  # a finite file can still overflow: alpha 1e308, huge A, B
            if not torch.isfinite(layer.delta_weight()).all():
                raise ValueError(f"{path}: the update of {name} (B A * {layer.scaling:g}) is not finite")
        return model

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        if model.peft_config.modules_to_save:
            raise ValueError("LoRA with modules_to_save cannot be switched off: minillm trains those modules in "
                             "place and keeps no original copy")
        for layer in lora_layers(model).values():
            if layer.merged:
                raise ValueError("a merged LoRA cannot be switched off: unmerge_lora first")
            layer.disabled = not enabled

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        return merge_and_unload(model)


METHOD = LoRA()

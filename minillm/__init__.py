"""minillm: a from-scratch LLaMA-family decoder, data transforms and LoRA, equal to transformers/peft."""

from minillm.config import PRESETS, ModelConfig
from minillm.model import CausalLM, KVCache, causal_lm_loss

__all__ = ["CausalLM", "KVCache", "ModelConfig", "PRESETS", "causal_lm_loss"]

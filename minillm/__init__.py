"""minillm: a from-scratch LLaMA-family decoder (Llama 2/3, Qwen2, Qwen3), its loss, generation, data transforms and
the course's PEFT methods, proven equal to transformers and peft.

The package root exports the model alone; everything else is imported from the module that defines it
(`minillm.peft` for the fine-tuning methods, `minillm.sft`, `minillm.chunk`, `minillm.pack` for the data).
"""

from minillm.config import PRESETS, ModelConfig
from minillm.generation import KVCache
from minillm.model import CausalLM

__all__ = ["CausalLM", "KVCache", "ModelConfig", "PRESETS"]

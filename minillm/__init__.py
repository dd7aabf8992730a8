"""minillm: a from-scratch LLaMA-family decoder, data transforms and LoRA / prompt / prefix / adapter tuning, equal to
transformers/peft."""

from minillm.chunk import Chunker, group_texts
from minillm.config import PRESETS, ModelConfig
from minillm.corpus import SAMPLE_PRETRAIN, SAMPLE_SFT, TOKENIZER_DIR
from minillm.adapter import HoulsbyConfig, apply_adapters
from minillm.lora import LoraConfig, LoRAEmbedding, LoRALinear, apply_lora, merge_and_unload, merge_lora, unmerge_lora
from minillm.peft_format import load_adapter, print_trainable_parameters, save_adapter
from minillm.prefix import PrefixTuningConfig, PrefixTuningLM
from minillm.prompt_tuning import PromptTuningConfig, PromptTuningLM
from minillm.loss import causal_lm_loss, linear_cross_entropy
from minillm.model import CausalLM, KVCache
from minillm.sft import SFTCollator, SFTMasker, mask_batch, mask_conversation

__all__ = [
    "HoulsbyConfig", "PrefixTuningConfig", "PrefixTuningLM", "PromptTuningConfig", "PromptTuningLM", "apply_adapters",
    "print_trainable_parameters",
    "CausalLM", "Chunker", "KVCache", "LoRAEmbedding", "LoRALinear", "LoraConfig", "ModelConfig", "PRESETS", "SAMPLE_PRETRAIN",
    "SAMPLE_SFT", "SFTCollator", "SFTMasker", "TOKENIZER_DIR", "apply_lora", "causal_lm_loss", "group_texts",
    "linear_cross_entropy", "load_adapter", "mask_batch", "mask_conversation", "merge_and_unload", "merge_lora",
    "save_adapter", "unmerge_lora",
]

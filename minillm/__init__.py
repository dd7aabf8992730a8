"""minillm: a from-scratch LLaMA-family decoder, data transforms and LoRA, equal to transformers/peft."""

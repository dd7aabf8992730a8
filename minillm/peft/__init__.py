"""The course's parameter-efficient fine-tuning methods, one file each, all behind one interface (base.py);
methods.py keeps the table of them and the functions that work on any of them, re-exported here:

    from minillm.peft import LoraConfig, apply, save_adapter, load_adapter, disable_adapter, merge_and_unload
"""

from minillm.peft.houlsby import HoulsbyConfig
from minillm.peft.ia3 import IA3Config
from minillm.peft.lora import LoraConfig
from minillm.peft.methods import (BY_NAME, METHODS, apply, disable_adapter, load_adapter, merge_and_unload,
                                  method_in, method_of, print_trainable_parameters, read_config, save_adapter)
from minillm.peft.prefix import PrefixTuningConfig
from minillm.peft.prompt import PromptTuningConfig

__all__ = ["BY_NAME", "METHODS", "HoulsbyConfig", "IA3Config", "LoraConfig", "PrefixTuningConfig", "PromptTuningConfig", "apply",
           "disable_adapter", "load_adapter", "merge_and_unload", "method_in", "method_of",
           "print_trainable_parameters", "read_config", "save_adapter"]
